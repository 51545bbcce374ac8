"""The trained-model artifact: a finished run's EMA model, saving and loading it, and its own
noise process (generation, and noising + denoising at a given level for the attacks).

Ambient models sample with a mask Ã drawn once per trajectory (Daras et al. 2023): every
denoiser call sees only Ã·x. Every sample i of a request uses its own generator seeded by
(seed, i), so an image depends on its seed and position, never on batch size or device count.
Attacks (ambient/attack/) call only the public methods here: generate, generate_range,
noise_and_denoise, caption_embeddings.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from ambient.config import SAMPLER_OF_LOSS
from ambient.defenses.corruption import build_corruption, sampling_mask
from ambient.models import load_trained_unet
from ambient.precond import DDPMPrecond, EDMPrecond
from ambient.rundir import ModelDir
from ambient.samplers import SAMPLERS, ClassifierFreeGuidance
from ambient.seeding import Stream, seeded_generator


def linear_vp_alpha_bar(timestep: int, num_train_timesteps: int = 1000) -> float:
    """ᾱ_t of DDPM's linear schedule (β from 1e-4 to 0.02, Ho et al. 2020), in float64."""
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return float(torch.cumprod(1 - betas, 0)[timestep])


@dataclass
class TrainedModel:
    """A finished run's EMA model plus what sampling it needs."""

    net: torch.nn.Module
    settings: dict
    scheduler: DDIMScheduler | None = None
    captions: object | None = None  # CaptionEmbeddings of a text-conditional model

    @property
    def is_text(self) -> bool:
        return self.settings.get("conditioning") == "text"

    def caption_embeddings(self, captions: list[str]) -> torch.Tensor:
        if not self.is_text:
            raise ValueError("this model is not text-conditional; it takes no captions")
        return self.captions(list(captions)).to(self.device)

    @property
    def device(self):
        return next(self.net.parameters()).device

    def _noise_and_masks(self, n: int, seed: int, start: int, num_masks: int):
        gens = [seeded_generator(seed, i, Stream.SAMPLE) for i in range(start, start + n)]
        return self._draw(gens, num_masks)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.settings
        return s["channels"], s["resolution"], s["resolution"]

    def _draw(self, gens: list[torch.Generator], num_masks: int = 1):
        """Per generator: noise, then num_masks sampling masks Ã drawn as in training (None for a
        model without a mask channel). Returns noise (B, C, H, W) and masks (K, B, 1, H, W)."""
        s, shape = self.settings, self.shape
        corruption = build_corruption(_Node(s["corruption"])) if s["mask_channel"] else None
        noise, masks = [], []
        for gen in gens:
            noise.append(torch.randn(shape, generator=gen))
            if corruption is not None:
                masks.append(torch.stack([sampling_mask(corruption, s["delta"], shape[1:], gen)
                                          for _ in range(num_masks)]))
        masks = torch.stack(masks, 1).to(self.device) if masks else None
        return torch.stack(noise).to(self.device), masks

    def _condition(self, cond):
        """Class labels (B,) pass through; a list of captions becomes their embeddings."""
        if isinstance(cond, (list, tuple)):
            return self.caption_embeddings(cond)
        return None if cond is None else torch.as_tensor(cond).to(self.device)

    # The loss attack's probe (Carlini et al. 2023, Sec. 5.1): noise at a level, then denoise.
    @torch.no_grad()
    def noise_and_denoise(self, images: torch.Tensor, timestep: int, generators: list[torch.Generator],
                          cond=None) -> torch.Tensor:
        """x0 estimates of `images` ((B, C, H, W) in [-1, 1]) noised to DDPM step `timestep` of the
        model's own noise process, each seen through the model's own sampling mask.

        Image i's noise ε and then its mask are drawn from generators[i]. DDPM models use the
        schedule they were trained with (a pipeline's cosine schedule included):
        x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε. EDM models have no discrete schedule; the level is the σ with
        the same signal-to-noise ratio on the linear DDPM schedule, x + σ·ε with σ = √((1 − ᾱ_t)/ᾱ_t).
        cond: class labels, or one caption per image for a text-conditional model.
        """
        x = images.float().to(self.device)
        eps, masks = self._draw(generators)
        masks = None if masks is None else masks[0]
        cond = self._condition(cond)
        n = len(x)
        if self.settings["objective"] == "edm":
            abar = linear_vp_alpha_bar(timestep)
            sigma = ((1 - abar) / abar) ** 0.5
            return self.net(x + sigma * eps, torch.full((n,), sigma, device=self.device), masks, cond)
        if not 0 <= timestep < len(self.scheduler.alphas_cumprod):
            raise ValueError(f"mia.timestep={timestep} is invalid for this model; allowed: an integer in "
                             f"[0, {len(self.scheduler.alphas_cumprod) - 1}] (its num_train_timesteps)")
        abar = float(self.scheduler.alphas_cumprod[timestep])
        x_t = abar ** 0.5 * x + (1 - abar) ** 0.5 * eps
        return self.net(x_t, torch.full((n,), timestep, device=self.device), masks, cond)

    def generate_range(self, start: int, count: int, seed: int = 0, label: int | None = None,
                       num_steps: int | None = None, num_masks: int = 1, guidance: float = 0.0,
                       caption: str | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """Samples number start .. start+count-1 of the stream for `seed`, in [-1, 1].

        label: a class of a class-conditional model; caption: the prompt of a text-conditional one
        (None = the empty caption), with classifier-free guidance scale cfg_scale (1 = none).
        """
        s = self.settings
        if label is not None and not s.get("num_classes"):
            raise ValueError("this model is not class-conditional; generate with label=None")
        if caption is not None and not self.is_text:
            raise ValueError("this model is not text-conditional; generate with caption=None")
        noise, masks = self._noise_and_masks(count, seed, start, num_masks)
        net, cond = self.net, None if label is None else torch.full((count,), int(label), device=self.device)
        if self.is_text:
            cond_uncond = self.caption_embeddings([caption or "", ""])
            net = ClassifierFreeGuidance(self.net, cond_uncond[:1].expand(count, -1, -1),
                                         cond_uncond[1:].expand(count, -1, -1), cfg_scale)
        settings = {k: v for k, v in s["sampler"].items() if k != "kind"}
        settings["num_steps"] = num_steps or settings["num_steps"]
        if self.scheduler is not None:
            settings["scheduler"] = self.scheduler
        sample = SAMPLERS[s["sampler"].get("kind") or SAMPLER_OF_LOSS[s["objective"]]]
        return sample(net, noise, masks, cond, guidance=guidance, **settings).clamp(-1, 1).cpu()

    def generate(self, n: int, seed: int = 0, label: int | None = None, batch_size: int = 64,
                 num_steps: int | None = None, num_masks: int = 1, guidance: float = 0.0,
                 progress: bool = False, caption: str | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """n images in [-1, 1] for one class label or caption (or unconditional), reproducible from seed."""
        from tqdm.auto import tqdm

        return torch.cat([self.generate_range(start, min(batch_size, n - start), seed, label, num_steps,
                                              num_masks, guidance, caption, cfg_scale)
                          for start in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress)])


class _Node(dict):
    """Attribute access on a plain dict, so saved settings feed the config-driven builders."""

    __getattr__ = dict.__getitem__


def save_trained(model_dir: Path, unet, settings: dict, scheduler=None, captions_file: Path | None = None) -> None:
    """captions_file: the run's training-caption embeddings (the attack prompts with them), copied
    as written at the start: the in-memory cache also holds every randomized caption of training."""
    out = ModelDir(model_dir)
    unet.save_pretrained(out.unet, safe_serialization=True)
    if scheduler is not None:
        scheduler.save_pretrained(out.scheduler)
    if captions_file is not None:
        shutil.copyfile(captions_file, out.captions)
    out.write_settings(settings)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load `<run_dir>/model` (or a model folder itself) written by train.py."""
    model_dir = ModelDir.of(run_dir)
    settings = model_dir.read_settings()
    text = settings.get("conditioning") == "text"
    unet = load_trained_unet(model_dir.unet, text).to(device).eval()
    captions = _caption_embeddings(model_dir, settings) if text else None
    if settings["objective"] == "edm":
        # Runs saved before the switch existed were trained with sigma_data.
        precond = EDMPrecond(unet, settings["sigma_data"], settings["mask_channel"],
                             settings.get("hidden_precond") or "sigma_data")
        return TrainedModel(precond, settings, captions=captions)
    # The net below returns x0 estimates, so the scheduler steps on "sample" predictions.
    scheduler = DDIMScheduler.from_pretrained(model_dir.scheduler, prediction_type="sample")
    net = DDPMPrecond(unet, scheduler.alphas_cumprod, settings["prediction_type"], settings["mask_channel"])
    return TrainedModel(net.to(device), settings, scheduler, captions)


def _caption_embeddings(model_dir: ModelDir, settings: dict):
    """The run's text encoder, with the training captions' embeddings preloaded from the model folder."""
    from ambient.text import CaptionEmbeddings, build_text_encoder

    captions = CaptionEmbeddings(build_text_encoder(settings["text_encoder"]))
    if model_dir.captions.is_file():
        captions.load(model_dir.captions)
    return captions
