"""The trained model: `AmbientPipeline`, a diffusers pipeline, and its own noise process.

A finished run's `model/` folder is this pipeline saved with `save_pretrained`: unet/, scheduler/
(DDPM models), text_encoder/ + tokenizer/ (text models), and model_index.json whose "ambient" key
holds what sampling needs (objective, corruption, sampler, ...). It loads three ways:
- `AmbientPipeline.from_pretrained(folder)`: reads the folder without running any code from it
  (also folders saved before this format: unet/, scheduler/, ambient.json);
- `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`: diffusers' custom-pipeline
  convention; model_index.json's `_class_name` is ["pipeline_ambient", "AmbientPipeline"], resolved
  against the folder's pipeline_ambient.py, which imports this class (so `ambient` must be installed);
- `load_run(run_dir)`, what train.py, evaluate.py and the attacks use.

Ambient models sample with a mask Ã drawn once per trajectory (Daras et al. 2023): every denoiser
call sees only Ã·x. That holds for every model whose corruption masks pixels, with or without a
mask input channel (IF-style fine-tunes have none). Every image i of a request has its own
generator, seeded by (seed, i) in `generate`, so an image depends on its seed and position, never
on batch size or device count. There is one generation path: `__call__`, `generate` and
`generate_range` all end in `_sample`. Attacks (ambient/attack/) call only the public methods:
generate, generate_range, noise_and_denoise, caption_embeddings, and for the deterministic probes
alpha_bar, sigma_of, sampling_masks, denoise_at.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
)

from ambient.config import SAMPLER_OF_LOSS
from ambient.defenses.corruption import build_corruption, sampling_mask
from ambient.models import load_trained_unet
from ambient.precond import DDPMPrecond, EDMPrecond
from ambient.rundir import (
    CARD,
    INDEX,
    PIPELINE_MODULE,
    SCHEDULER,
    ModelDir,
    read_json,
    write_json,
)
from ambient.samplers import SAMPLERS, ClassifierFreeGuidance
from ambient.seeding import Stream, seeded_generator

TEXT_ENCODER, TOKENIZER = "text_encoder", "tokenizer"
CLASS_NAME = "AmbientPipeline"
# The file DiffusionPipeline.from_pretrained(..., trust_remote_code=True) executes: one import.
PIPELINE_SOURCE = f'''"""Custom-pipeline entry for diffusers: DiffusionPipeline.from_pretrained(this_folder,
trust_remote_code=True) loads {CLASS_NAME} from the ambient package (pip install the ambient repository)."""
from ambient.pipeline import {CLASS_NAME}  # noqa: F401
'''


# Why a latent fine-tune has no `inpaint` (the reconstruction attack is skipped, said so in the report).
LATENT_INPAINT = ("pixel inpainting does not carry over to a VAE's latent space: each latent mixes a neighbourhood of "
                  "pixels, so imposing the shown pixels during sampling has no exact latent counterpart (Stable "
                  "Diffusion inpaints with a separately trained inpainting UNet)")


def linear_vp_alpha_bar(timestep: int, num_train_timesteps: int = 1000) -> float:
    """ᾱ_t of DDPM's linear schedule (β from 1e-4 to 0.02, Ho et al. 2020), in float64."""
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return float(torch.cumprod(1 - betas, 0)[timestep])


class _Node(dict):
    """Attribute access on a plain dict, so saved settings feed the config-driven builders."""

    __getattr__ = dict.__getitem__


class _Ticking:
    """A denoiser that advances a progress bar at every call (samplers stay free of UI)."""

    def __init__(self, net, bar):
        self.net, self.bar = net, bar

    def __call__(self, *args):
        out = self.net(*args)
        self.bar.update()
        return out


def _net_calls(kind: str, num_steps: int) -> int:
    return 2 * num_steps - 1 if kind == "edm_heun" else num_steps


class AmbientPipeline(DiffusionPipeline):
    """An ambient-trained diffusion model (EDM or DDPM; unconditional, class- or text-conditional)."""

    _optional_components = ["scheduler", TEXT_ENCODER, TOKENIZER]
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, scheduler=None, text_encoder=None, tokenizer=None, ambient: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(ambient=dict(ambient or {}))
        self._caption_cache = None
        self._captions_file = None  # the run's training-caption embeddings, when loaded from a folder
        self._latent_decoder = None  # a latent fine-tune: its VAE's decoder (set_latent_decoder)

    # --- what the model is
    @property
    def settings(self) -> dict:
        return self.config.ambient

    @property
    def is_text(self) -> bool:
        return self.settings.get("conditioning") == "text"

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.settings
        return s["channels"], s["resolution"], s["resolution"]

    @property
    def lowest_trained_sigma(self) -> float | None:
        """The lowest noise level the denoiser was trained at: σ_n for corruption=noise models trained
        with loss.noisy=ambient (Daras et al. 2024); None when it was trained at every level."""
        return (self.settings.get("noisy") or {}).get("lowest_trained_sigma")

    @property
    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def net(self):
        """The denoiser D(x; level, mask, cond) -> x0 estimate, as trained."""
        return self._denoiser("x0")

    def _denoiser(self, hidden_readout: str):
        s = self.settings
        if s["objective"] == "edm":
            # Runs saved before the switch existed were trained with sigma_data.
            return EDMPrecond(self.unet, s["sigma_data"], s["mask_channel"], s.get("hidden_precond") or "sigma_data")
        return DDPMPrecond(self.unet, self.scheduler.alphas_cumprod, s["prediction_type"], s["mask_channel"],
                           hidden_readout).to(self._device)

    def set_latent_decoder(self, decode) -> None:
        """A latent fine-tune samples VAE latents: with `decode` (latents -> images in [-1, 1], its VAE's
        decoder) every generation path returns decoded images. `ambient.latent_model.LatentModel` sets it."""
        if not self.settings.get("latent"):
            raise ValueError("only a latent-pipeline fine-tune takes a latent decoder")
        self._latent_decoder = decode

    # --- captions
    @property
    def captions(self):
        """CaptionEmbeddings over the model's own text encoder, the training captions preloaded."""
        if self._caption_cache is None and self.is_text:
            self._caption_cache = self._build_captions()
        return self._caption_cache

    def _build_captions(self):
        from ambient.text import CaptionEmbeddings, TextEncoder, build_text_encoder

        s = self.settings
        if self.text_encoder is not None and self.tokenizer is not None:
            encoder = TextEncoder.from_parts(self.text_encoder, self.tokenizer, s["text_encoder"].get("max_length", 16),
                                             s.get("text_encoder_name") or "saved", self._device)
        else:  # saved before the pipeline format: the encoder is rebuilt from its config
            encoder = build_text_encoder(s["text_encoder"])
        captions = CaptionEmbeddings(encoder)
        saved = getattr(self, "_captions_file", None)
        if saved is not None and Path(saved).is_file():
            captions.load(saved)
        return captions

    def caption_embeddings(self, captions: list[str]) -> torch.Tensor:
        if not self.is_text:
            raise ValueError("this model is not text-conditional; it takes no captions")
        return self.captions(list(captions)).to(self._device)

    def _condition(self, cond):
        """Class labels (B,) pass through; a list of captions becomes their embeddings."""
        if isinstance(cond, (list, tuple)):
            return self.caption_embeddings(cond)
        return None if cond is None else torch.as_tensor(cond).to(self._device)

    # --- the model's own randomness
    def _draw(self, gens: list[torch.Generator], num_masks: int = 1):
        """Per generator: noise, then num_masks sampling masks Ã drawn as in training (None when the
        corruption masks no pixels). Returns noise (B, C, H, W) and masks (K, B, 1, H, W)."""
        s, shape = self.settings, self.shape
        corruption = build_corruption(_Node(s["corruption"]))
        noise, masks = [], []
        for gen in gens:
            noise.append(torch.randn(shape, generator=gen))
            if corruption.masks_pixels:
                masks.append(torch.stack([sampling_mask(corruption, s["delta"], shape[1:], gen)
                                          for _ in range(num_masks)]))
        device = self._device
        masks = torch.stack(masks, 1).to(device) if masks else None
        return torch.stack(noise).to(device), masks

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
        device = self._device
        x = images.float().to(device)
        eps, masks = self._draw(generators)
        masks = None if masks is None else masks[0]
        cond = self._condition(cond)
        n, net = len(x), self.net
        if self.settings["objective"] == "edm":
            abar = linear_vp_alpha_bar(timestep)
            sigma = ((1 - abar) / abar) ** 0.5
            return net(x + sigma * eps, torch.full((n,), sigma, device=device), masks, cond)
        alphas_cumprod = self.scheduler.alphas_cumprod
        if not 0 <= timestep < len(alphas_cumprod):
            raise ValueError(f"mia.timestep={timestep} is invalid for this model; allowed: an integer in "
                             f"[0, {len(alphas_cumprod) - 1}] (its num_train_timesteps)")
        abar = float(alphas_cumprod[timestep])
        x_t = abar ** 0.5 * x + (1 - abar) ** 0.5 * eps
        return net(x_t, torch.full((n,), timestep, device=device), masks, cond)

    # --- the noise process in σ form, for the deterministic probes (SecMI, PIA: attack/inversion.py)
    def alpha_bar(self, timestep: int) -> float:
        """ᾱ_t of DDPM step t in the model's own process: its scheduler's (DDPM models, a pipeline's cosine
        schedule included) or the linear DDPM schedule's (EDM models have no discrete steps; the loss attack
        maps t to σ the same way)."""
        if self.settings["objective"] == "edm":
            if not 0 <= timestep < 1000:
                raise ValueError(f"timestep={timestep} is invalid for an EDM model; allowed: an integer in [0, 999] "
                                 "(a step of the linear DDPM schedule, mapped to its σ)")
            return linear_vp_alpha_bar(timestep)
        alphas_cumprod = self.scheduler.alphas_cumprod
        if not 0 <= timestep < len(alphas_cumprod):
            raise ValueError(f"timestep={timestep} is invalid for this model; allowed: an integer in "
                             f"[0, {len(alphas_cumprod) - 1}] (its num_train_timesteps)")
        return float(alphas_cumprod[timestep])

    def sigma_of(self, timestep: int) -> float:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t): the VP state x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε is √ᾱ_t·(x0 + σ_t·ε)."""
        abar = self.alpha_bar(timestep)
        return ((1 - abar) / abar) ** 0.5

    def sampling_masks(self, generators: list[torch.Generator]) -> torch.Tensor | None:
        """The sampling mask Ã a trajectory seeded by each generator uses ((B, 1, H, W), drawn after its
        noise, as in `_sample`); None when the corruption masks no pixels."""
        _, masks = self._draw(list(generators))
        return None if masks is None else masks[0]

    @torch.no_grad()
    def denoise_at(self, x: torch.Tensor, timestep: int, masks: torch.Tensor | None = None, cond=None) -> torch.Tensor:
        """x̂0 = D(x; σ_t) for x in σ form, x = x0 + σ_t·ε (σ_t = sigma_of(timestep)), each image seen through
        its mask. DDPM models: the UNet gets the VP state √ᾱ_t·x = x_t at step t (Song et al. 2021, Sec. 4.3:
        x̄ = x_t/√ᾱ_t, σ = √((1 − ᾱ)/ᾱ)); EDM models: D(x; σ_t). cond: class labels or one caption per image."""
        device = self._device
        x = x.float().to(device)
        n, net, cond = len(x), self.net, self._condition(cond)
        masks = None if masks is None else masks.to(device)
        if self.settings["objective"] == "edm":
            sigma = self.sigma_of(timestep)
            return net(x, torch.full((n,), sigma, device=device), masks, cond)
        abar = self.alpha_bar(timestep)
        return net(abar ** 0.5 * x, torch.full((n,), timestep, device=device), masks, cond)

    # --- generation: one path
    @torch.no_grad()
    def _sample(self, gens: list[torch.Generator], labels=None, captions: list[str] | None = None,
                num_steps: int | None = None, num_masks: int = 1, guidance: float = 0.0,
                cfg_scale: float = 1.0, progress: bool = False, known=None) -> torch.Tensor:
        """One image per generator, in [-1, 1] on the CPU. labels: (B,) class labels; captions: one
        per image (text models; "" is the empty caption), with classifier-free guidance cfg_scale.
        known: (x0, keep) to inpaint: pixels where keep = 1 are imposed from x0 (see `inpaint`).
        A latent fine-tune samples VAE latents and returns them decoded (`set_latent_decoder`)."""
        s, count, decode = self.settings, len(gens), self._latent_decoder
        if s.get("latent") and known is not None:
            raise NotImplementedError(LATENT_INPAINT)
        if s.get("latent") and decode is None:  # its UNet denoises VAE latents; a VAE must decode them
            raise ValueError("this model is a latent-pipeline fine-tune: it would return VAE latents, not images; "
                             "generate with its Stable-Diffusion pipeline (<run_dir>/model/pipeline) or "
                             "ambient.latent_model.LatentModel.from_run(<run_dir>)")
        if labels is not None and not s.get("num_classes"):
            raise ValueError("this model is not class-conditional; generate with label=None")
        if captions is not None and not self.is_text:
            raise ValueError("this model is not text-conditional; generate with caption=None")
        noise, masks = self._draw(gens, num_masks)
        settings = {k: v for k, v in s["sampler"].items() if k not in ("kind", "hidden_readout")}
        if known is not None:  # the replacement noise: drawn after the image's noise and mask
            eps = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(self._device)
            settings["known"] = (known[0].float().to(self._device), known[1].float().to(self._device), eps)
        kind = s["sampler"].get("kind") or SAMPLER_OF_LOSS[s["objective"]]
        settings["num_steps"] = num_steps or settings["num_steps"]
        if s.get("latent"):  # VAE latents are not confined to [-1, 1]: never clip or threshold their x0 estimates
            settings.update(clip_denoised=False, threshold="none")  # (as SD's schedulers: clip_sample=False)
        floor, below = self.lowest_trained_sigma, settings.pop("below_sigma_n", None) or "stop"
        if floor is not None and kind == "edm_heun" and below == "stop":
            # EDM Heun's last step is Euler to 0, i.e. x <- D(x; σ_min): with σ_min = σ_n the trajectory
            # ends with the trained E[x0 | x_σn], the official early stop (ambient-utils sample_with_early_stop).
            settings["sigma_min"] = max(float(settings["sigma_min"]), floor)
        elif floor is not None and below == "stop":  # DDPM: the x0 estimate at the last step ≥ t_n, as official
            from ambient.losses import first_timestep_at_or_above

            settings["t_stop"] = first_timestep_at_or_above(self.scheduler.alphas_cumprod, floor)
        net, cond = self._denoiser(s["sampler"].get("hidden_readout") or "x0"), None
        if labels is not None:
            cond = torch.as_tensor(labels).to(self._device)
        if self.is_text:
            captions = list(captions) if captions is not None else [""] * count
            net = ClassifierFreeGuidance(net, self.caption_embeddings(captions),
                                         self.caption_embeddings([""]).expand(count, -1, -1), cfg_scale)
        if s["objective"] != "edm":
            # The net returns x0 estimates, so the scheduler steps on "sample" predictions.
            step_class = DDPMScheduler if kind == "ddpm_ancestral" else DDIMScheduler
            settings["scheduler"] = step_class.from_config(self.scheduler.config, prediction_type="sample")
            settings["generators"] = gens
        decode = decode or (lambda x: x)  # pixel models: the sample is the image
        if progress:
            with self.progress_bar(total=_net_calls(kind, settings["num_steps"])) as bar:
                return decode(SAMPLERS[kind](_Ticking(net, bar), noise, masks, cond, guidance=guidance,
                                             **settings)).clamp(-1, 1).cpu()
        return decode(SAMPLERS[kind](net, noise, masks, cond, guidance=guidance, **settings)).clamp(-1, 1).cpu()

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 num_inference_steps: int | None = None, class_labels=None, prompt: str | list[str] | None = None,
                 guidance_scale: float = 1.0, output_type: str = "pil", return_dict: bool = True):
        """Generate like any diffusers pipeline.

        generator: one per image (image i is then exactly `generate`'s image i for
        `[seeded_generator(seed, i, Stream.SAMPLE) ...]`), or one generator (per-image seeds are drawn
        from it), or None. class_labels: an int or one per image; prompt: a caption or one per image;
        guidance_scale: classifier-free guidance (1 = none). output_type: "pil", "np" ((B, H, W, C) in
        [0, 1]) or "pt" ((B, C, H, W) in [0, 1]).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}; allowed: pil | np | pt")
        if isinstance(prompt, (list, tuple)):
            batch_size = len(prompt)
        elif isinstance(class_labels, (list, tuple, torch.Tensor)):
            batch_size = len(class_labels)
        gens = _generators(generator, batch_size)
        labels = None if class_labels is None else torch.as_tensor(class_labels).long().expand(batch_size)
        captions = None if prompt is None else ([prompt] * batch_size if isinstance(prompt, str) else list(prompt))
        images = (self._sample(gens, labels, captions, num_inference_steps, cfg_scale=guidance_scale,
                               progress=True) + 1) / 2
        if output_type == "pt":
            out = images
        else:
            out = images.permute(0, 2, 3, 1).numpy()
            out = self.numpy_to_pil(out) if output_type == "pil" else out
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    def inpaint(self, images: torch.Tensor, keep: torch.Tensor, generators: list[torch.Generator], labels=None,
                captions: list[str] | None = None, num_steps: int | None = None, cfg_scale: float = 1.0
                ) -> torch.Tensor:
        """Completions of `images` ((B, C, H, W) in [-1, 1]) given their pixels where keep = 1
        ((B, 1, H, W)): the model's own sampler, noise and sampling mask (one generator per image),
        the known pixels imposed at every level by replacement (RePaint without resampling; for an
        ambient model the denoiser still sees only Ã·x). Returns (B, C, H, W) in [-1, 1]."""
        return self._sample(list(generators), labels, captions, num_steps, cfg_scale=cfg_scale,
                            known=(images, keep))

    def generate_range(self, start: int, count: int, seed: int = 0, label: int | None = None,
                       num_steps: int | None = None, num_masks: int = 1, guidance: float = 0.0,
                       caption: str | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """Images number start .. start+count-1 of the stream for `seed`, in [-1, 1].

        label: a class of a class-conditional model; caption: the prompt of a text-conditional one
        (None = the empty caption), with classifier-free guidance scale cfg_scale (1 = none).
        """
        gens = [seeded_generator(seed, i, Stream.SAMPLE) for i in range(start, start + count)]
        labels = None if label is None else torch.full((count,), int(label))
        captions = None if caption is None else [caption] * count
        return self._sample(gens, labels, captions, num_steps, num_masks, guidance, cfg_scale)

    def generate(self, n: int, seed: int = 0, label: int | None = None, batch_size: int = 64,
                 num_steps: int | None = None, num_masks: int = 1, guidance: float = 0.0,
                 progress: bool = False, caption: str | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """n images in [-1, 1] for one class label or caption (or unconditional), reproducible from seed."""
        from tqdm.auto import tqdm

        return torch.cat([self.generate_range(start, min(batch_size, n - start), seed, label, num_steps,
                                              num_masks, guidance, caption, cfg_scale)
                          for start in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress)])

    # --- saving and loading
    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs):
        """diffusers' layout plus the custom-class entry (pipeline_ambient.py) and the model card."""
        out = Path(save_directory)
        if (out / INDEX).exists():
            raise FileExistsError(f"{out} already holds a pipeline ({INDEX}); not overwriting it")
        super().save_pretrained(out, safe_serialization=safe_serialization, **kwargs)
        index = read_json(out / INDEX)
        index["_class_name"] = [PIPELINE_MODULE, CLASS_NAME]
        write_json(out / INDEX, index)
        (out / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_SOURCE)
        if not (out / CARD).exists():
            from ambient.card import write_model_card

            write_model_card(out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **download) -> AmbientPipeline:
        """A saved AmbientPipeline (or a run directory, or an older run's model folder), read without
        executing code from the folder. A hub id is fetched with huggingface_hub first."""
        path = Path(pretrained_model_name_or_path).expanduser()
        if not path.exists():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(pretrained_model_name_or_path), **download))
        model_dir = ModelDir.of(path)
        settings = model_dir.read_settings()
        unet = load_trained_unet(model_dir.unet, settings.get("conditioning") == "text")
        scheduler = _load_scheduler(model_dir.path / SCHEDULER) if settings["objective"] != "edm" else None
        text_encoder, tokenizer = _load_text_parts(model_dir)
        pipeline = cls(unet, scheduler, text_encoder, tokenizer, ambient=settings)
        pipeline._captions_file = model_dir.captions
        pipeline.unet.eval()
        return pipeline.to(device=device, dtype=torch_dtype) if device or torch_dtype else pipeline


def _generators(generator, count: int) -> list[torch.Generator]:
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"{len(generator)} generators for {count} images; pass one per image")
        return list(generator)
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ()).item()))
    seeds = torch.randint(0, 2 ** 62, (count,), generator=generator).tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _load_scheduler(folder: Path):
    """The scheduler class named in its config (DDPMScheduler for runs trained here)."""
    import diffusers

    name = read_json(folder / "scheduler_config.json").get("_class_name", "DDPMScheduler")
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not name.endswith("Scheduler"):
        raise ValueError(f"{folder}: unknown scheduler class {name!r}")
    return scheduler_class.from_pretrained(folder)


def _load_text_parts(model_dir: ModelDir):
    """The saved text encoder and tokenizer (classes as model_index.json names them), or (None, None)."""
    if not model_dir.index.is_file():
        return None, None
    import transformers

    index, parts = read_json(model_dir.index), []
    for name in (TEXT_ENCODER, TOKENIZER):
        library, class_name = (index.get(name) or [None, None])[:2]
        if library is None:
            return None, None
        part_class = getattr(transformers, class_name, None) if library == "transformers" else None
        if part_class is None:
            raise ValueError(f"{model_dir.index}: {name} is {library}.{class_name}; expected a transformers class")
        extra = {"use_safetensors": True, "dtype": torch.float32} if name == TEXT_ENCODER else {}
        parts.append(part_class.from_pretrained(model_dir.path / name, **extra))
    return tuple(parts)


def save_trained(model_dir: Path, unet, settings: dict, scheduler=None, captions_file: Path | None = None,
                 text_encoder=None) -> AmbientPipeline:
    """Save a finished model as an AmbientPipeline. text_encoder: the run's TextEncoder (its model and
    tokenizer are saved with the pipeline). captions_file: the run's training-caption embeddings (the
    attack prompts with them), copied as written at the start: the in-memory cache also holds every
    randomized caption of training."""
    settings = dict(settings)
    if text_encoder is not None:
        settings["text_encoder_name"] = text_encoder.name
    pipeline = AmbientPipeline(unet, scheduler, text_encoder.model if text_encoder else None,
                               text_encoder.tokenizer if text_encoder else None, ambient=settings)
    out = ModelDir(model_dir)
    pipeline.save_pretrained(out.path)
    if captions_file is not None:
        shutil.copyfile(captions_file, out.captions)
    return pipeline


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> AmbientPipeline:
    """Load `<run_dir>/model` (or a model folder itself) written by train.py."""
    return AmbientPipeline.from_pretrained(run_dir, device=device)


def settings_of(path) -> dict:
    """The ambient settings of a saved model folder or run (no weights loaded)."""
    return ModelDir.of(path).read_settings()


__all__ = ["AmbientPipeline", "load_run", "save_trained", "linear_vp_alpha_bar", "settings_of"]
