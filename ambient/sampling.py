"""Samplers, and loading a finished run to generate images from it.

Ambient models sample with a mask Ã drawn once per trajectory (Daras et al. 2023): every
denoiser call sees only Ã·x. Every sample i of a request uses its own generator seeded by
(seed, i), so an image depends on its seed and position, never on batch size or device count.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

from ambient.corruption import build_corruption, sampling_mask, seeded_generator
from ambient.precond import DDPMPrecond, EDMPrecond

STREAM_SAMPLE = 10
MODEL_DIR, SETTINGS_FILE, CAPTIONS_FILE = "model", "ambient.json", "caption_embeddings.safetensors"


def edm_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: the σ schedule, with a final 0."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def _guided_denoise(net, x, sigma, masks, cond, guidance: float):
    """D with the first mask; with several masks, reconstruction guidance −w∇ₓ½Σ_k‖D₀ − D_k‖²."""
    if masks is None:
        return net(x, sigma, None, cond), None
    if guidance == 0 or masks.shape[0] == 1:
        return net(x, sigma, masks[0], cond), None
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        D = [net(x, sigma, m, cond) for m in masks]
        disagreement = 0.5 * sum(((D[0] - d) ** 2).sum() for d in D[1:])
        grad, = torch.autograd.grad(disagreement, x)
    return D[0].detach(), guidance * grad


# Karras et al. 2022, Algorithm 1 (deterministic Heun), with fixed ambient masks.
@torch.no_grad()
def edm_sample(net, noise, masks=None, cond=None, num_steps=18, sigma_min=0.002, sigma_max=80.0,
               rho=7.0, guidance=0.0):
    t_steps = edm_sigmas(num_steps, sigma_min, sigma_max, rho, noise.device)
    x_next = noise.double() * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        denoised, push = _guided_denoise(net, x_cur.float(), t_cur.float(), masks, cond, guidance)
        d_cur = (x_cur - denoised.double()) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:  # Heun's 2nd-order correction
            denoised, push2 = _guided_denoise(net, x_next.float(), t_next.float(), masks, cond, guidance)
            d_prime = (x_next - denoised.double()) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            push = push2 if push2 is not None else push
        if push is not None:
            x_next = x_next - push.double()
    return x_next.float()


# DDIM (Song et al. 2021) over x0 estimates, with the mask fixed along the trajectory.
@torch.no_grad()
def ddim_sample(net, scheduler: DDIMScheduler, noise, masks=None, cond=None, num_steps=50):
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        x0 = net(x, t, None if masks is None else masks[0], cond)
        x = scheduler.step(x0, t, x, eta=0.0).prev_sample
    return x


class ClassifierFreeGuidance:
    """A denoiser with its caption fixed: D_u + w·(D_c − D_u) (Ho & Salimans 2022), u = the empty caption.

    Callable like the wrapped net, so every sampler (and reconstruction guidance) uses it unchanged.
    """

    def __init__(self, net, cond: torch.Tensor, uncond: torch.Tensor, scale: float):
        self.net, self.cond, self.uncond, self.scale = net, cond, uncond, float(scale)

    def __call__(self, x, sigma, mask=None, _cond=None):
        if self.scale == 1.0:
            return self.net(x, sigma, mask, self.cond)
        both = self.net(torch.cat([x, x]), _repeat(sigma, 2), None if mask is None else torch.cat([mask, mask]),
                        torch.cat([self.uncond, self.cond]))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _repeat(t, times: int):
    t = torch.as_tensor(t)
    return t if t.ndim == 0 else torch.cat([t] * times)


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
        s = self.settings
        shape = (s["channels"], s["resolution"], s["resolution"])
        noise, masks = [], []
        corruption = build_corruption(_Node(s["corruption"])) if s["mask_channel"] else None
        for i in range(start, start + n):
            gen = seeded_generator(seed, i, STREAM_SAMPLE)
            noise.append(torch.randn(shape, generator=gen))
            if corruption is not None:
                masks.append(torch.stack([sampling_mask(corruption, s["delta"], shape[1:], gen)
                                          for _ in range(num_masks)]))
        masks = torch.stack(masks, 1).to(self.device) if masks else None
        return torch.stack(noise).to(self.device), masks

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
        steps = num_steps or s["sampler"]["num_steps"]
        if s["objective"] == "edm":
            x = edm_sample(net, noise, masks, cond, steps, s["sampler"]["sigma_min"],
                           s["sampler"]["sigma_max"], s["sampler"]["rho"], guidance)
        else:
            x = ddim_sample(net, self.scheduler, noise, masks, cond, steps)
        return x.clamp(-1, 1).cpu()

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
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    if scheduler is not None:
        scheduler.save_pretrained(model_dir / "scheduler")
    if captions_file is not None:
        shutil.copyfile(captions_file, model_dir / CAPTIONS_FILE)
    (model_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load `<run_dir>/model` (or a model folder itself) written by train.py."""
    path = Path(run_dir)
    model_dir = path / MODEL_DIR if (path / MODEL_DIR / SETTINGS_FILE).is_file() else path
    if not (model_dir / SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished model ({MODEL_DIR}/{SETTINGS_FILE} missing)")
    settings = json.loads((model_dir / SETTINGS_FILE).read_text())
    text = settings.get("conditioning") == "text"
    unet_class = UNet2DConditionModel if text else UNet2DModel
    unet = unet_class.from_pretrained(model_dir / "unet", use_safetensors=True).to(device).eval()
    captions = _caption_embeddings(model_dir, settings) if text else None
    if settings["objective"] == "edm":
        return TrainedModel(EDMPrecond(unet, settings["sigma_data"], settings["mask_channel"]), settings,
                            captions=captions)
    # The net below returns x0 estimates, so the scheduler steps on "sample" predictions.
    scheduler = DDIMScheduler.from_pretrained(model_dir / "scheduler", prediction_type="sample")
    net = DDPMPrecond(unet, scheduler.alphas_cumprod, settings["prediction_type"], settings["mask_channel"])
    return TrainedModel(net.to(device), settings, scheduler, captions)


def _caption_embeddings(model_dir: Path, settings: dict):
    """The run's text encoder, with the training captions' embeddings preloaded from the model folder."""
    from ambient.text import CaptionEmbeddings, build_text_encoder

    captions = CaptionEmbeddings(build_text_encoder(settings["text_encoder"]))
    if (model_dir / CAPTIONS_FILE).is_file():
        captions.load(model_dir / CAPTIONS_FILE)
    return captions
