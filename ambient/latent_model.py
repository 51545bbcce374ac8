"""A latent fine-tune as the attack's target: `LatentModel`, AmbientPipeline's public methods over a
latent UNet and the VAE that made its training latents.

A latent run (`model=latent_pipeline`, issue 17) saves its UNet as an AmbientPipeline in `model/`
(settings["latent"]: the images' channels and resolution) and a copy of its Stable-Diffusion pipeline
in `model/pipeline/`, whose VAE encoded the training images. evaluate.py attacks it through this thin
adapter (`LatentModel.from_run(run_dir)`):

- generation (`generate`, `generate_range`): AmbientPipeline's one generation path in latent space
  (its own scheduler and sampler, classifier-free guidance, the early stop at σ_n of a noisy-ambient
  run; image i's initial latent from its (seed, position) generator, as for pixel models), decoded by
  the VAE (z / scaling_factor, as StableDiffusionPipeline decodes) into [-1, 1] images at the training
  resolution. The extraction attack, the null reference and the quality figures compare pixels.
- membership probes (`noise_and_denoise`, `denoise_at`, `alpha_bar`, `sigma_of`, `sampling_masks`,
  `caption_embeddings`): the latent UNet's own, on latents, where the model was trained and its loss is
  defined. `encode_set` gives them: members from the run's latent cache (read, never rewritten: exactly
  the latents trained on), other images (held-out ones) encoded by the same VAE the same way
  (posterior mean × scaling factor).
- `inpaint`: not available (`LATENT_INPAINT`); `unsupported` names it with the reason, and evaluate.py
  reports the reconstruction attack as skipped with that reason instead of faking it.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from ambient.data import ImageSet
from ambient.latents import LatentCache, LatentSet, as_latent_set, encode
from ambient.pipeline import LATENT_INPAINT, AmbientPipeline, load_run
from ambient.rundir import ModelDir, RunDir

VAE = "vae"


class LatentModel:
    """A latent-pipeline fine-tune: its latent UNet (an AmbientPipeline) + its VAE, attacked in pixels
    (generations) and in latents (membership probes)."""

    unsupported: ClassVar[dict[str, str]] = {"inpaint": LATENT_INPAINT}  # public method -> why this model has none

    def __init__(self, model: AmbientPipeline, vae, latent_cache: Path | None = None, batch_size: int = 32):
        if not model.settings.get("latent"):
            raise ValueError("LatentModel wraps a latent-pipeline fine-tune (settings['latent']); this model is not one")
        self.model, self.vae, self.latent_cache, self.batch_size = model, vae, latent_cache, batch_size
        model.set_latent_decoder(self.decode)  # from here on its generation paths return decoded images

    @classmethod
    def from_run(cls, run_dir, device: str | torch.device = "cpu") -> LatentModel:
        """`<run_dir>/model` (the latent UNet), `<run_dir>/model/pipeline/vae`, `<run_dir>/latents.safetensors`."""
        from diffusers import AutoencoderKL

        vae_dir = ModelDir.of(run_dir).pipeline / VAE
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(f"{vae_dir}: a latent run's VAE (saved with its pipeline) is missing; the "
                                    f"generations could not be decoded")
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).to(device).eval()
        return cls(load_run(run_dir, device), vae, RunDir(run_dir).latents)

    # --- what the model is: the pixel images it makes; the rest is the latent model's
    @property
    def settings(self) -> dict:
        return self.model.settings

    @property
    def is_text(self) -> bool:
        return self.model.is_text

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the generated images (the latent shape is `latent_shape`)."""
        s = self.settings["latent"]
        return s["image_channels"], s["image_resolution"], s["image_resolution"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.model.shape

    @property
    def lowest_trained_sigma(self) -> float | None:
        return self.model.lowest_trained_sigma  # in latent units

    # --- the VAE
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, C, H, W), nominally in [-1, 1] (the sampler clamps)."""
        vae, out = self.vae, []
        param = next(vae.parameters())
        for start in range(0, len(latents), self.batch_size):
            z = latents[start:start + self.batch_size].to(param.device, param.dtype) / float(vae.config.scaling_factor)
            out.append(vae.decode(z).sample.float())
        return torch.cat(out)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1] (B, C, H, W) that came from uint8 pixels (as every dataset image
        and canary does): rounded back to uint8 and encoded as training encodes, with no cache."""
        pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return encode(self.vae, pixels, self.batch_size)

    def encode_set(self, images: ImageSet) -> LatentSet:
        """`images` with their latents: those in the run's latent cache read from it, the others encoded
        (the cache file is left as it is)."""
        if len(images) == 0:
            return as_latent_set(images, torch.zeros(0, *self.latent_shape))
        if self.latent_cache is None:
            return as_latent_set(images, encode(self.vae, images.images, self.batch_size))
        cache = LatentCache(self.vae, self.latent_cache, self.batch_size, read_only=True)
        return as_latent_set(images, cache(images.images))

    # --- generation: AmbientPipeline's one path, decoded
    def generate_range(self, start: int, count: int, seed: int = 0, label: int | None = None,
                       num_steps: int | None = None, num_masks: int = 1, guidance: float = 0.0,
                       caption: str | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """Images start .. start+count-1 of the stream for `seed`, decoded, (count, C, H, W) in [-1, 1]."""
        return self.model.generate_range(start, count, seed, label, num_steps, num_masks, guidance, caption, cfg_scale)

    def generate(self, n: int, seed: int = 0, label: int | None = None, batch_size: int = 64, **kwargs) -> torch.Tensor:
        return self.model.generate(n, seed, label, batch_size, **kwargs)

    def inpaint(self, *args, **kwargs):
        raise NotImplementedError(LATENT_INPAINT)

    # --- membership probes: in latent space (inputs are latents, e.g. from encode_set)
    def noise_and_denoise(self, latents: torch.Tensor, timestep: int, generators, cond=None) -> torch.Tensor:
        return self.model.noise_and_denoise(latents, timestep, generators, cond)

    def denoise_at(self, latents: torch.Tensor, timestep: int, masks=None, cond=None) -> torch.Tensor:
        return self.model.denoise_at(latents, timestep, masks, cond)

    def alpha_bar(self, timestep: int) -> float:
        return self.model.alpha_bar(timestep)

    def sigma_of(self, timestep: int) -> float:
        return self.model.sigma_of(timestep)

    def sampling_masks(self, generators) -> torch.Tensor | None:
        return self.model.sampling_masks(generators)  # None: latent runs mask nothing

    def caption_embeddings(self, captions: list[str]) -> torch.Tensor:
        return self.model.caption_embeddings(captions)


__all__ = ["LatentModel"]
