"""The VAE latent space of a Stable-Diffusion-style pipeline: the latent cache, the training set of
latents, generation through the saved pipeline, and a tiny pipeline for tests. The folder and
resolution checks are torch-free, in ambient.config (check_latent_pipeline, validate_latent_pipeline).

A latent pipeline folder (diffusers layout) holds vae/, unet/, text_encoder/, tokenizer/, scheduler/
and model_index.json. Training on it encodes every training image once with the VAE: the latents are
cached on disk (`RunDir.latents`, <run_dir>/latents.safetensors, like the caption embeddings), keyed per image by its
exact pixels and tagged with the VAE's weights and the resolution, so a resumed run reuses them and a
changed VAE or resolution re-encodes (with a warning) instead of silently reusing stale latents.

Latents are the posterior *mean* times the VAE's scaling factor (deterministic: any noise the
defense adds — corruption=noise in latent units — is then the only noise in the observation).
The official SD fine-tuning scripts draw `latent_dist.sample()` instead.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ambient.data import ImageSet


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's config and weights: latents encoded by another VAE are not reused. Where it
    was loaded from (`_name_or_path`) and other bookkeeping keys do not count: the same VAE copied into
    a run's saved pipeline keeps its latents."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_") or k == "_class_name"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:32]


def image_key(image: torch.Tensor) -> str:
    """An image's exact pixels (uint8 as stored) and shape, as a hex digest."""
    data = image.contiguous().numpy().tobytes() + str(tuple(image.shape)).encode()
    return hashlib.sha256(data).hexdigest()[:32]


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> scaled latents (N, c, H/f, W/f): the posterior mean × scaling_factor."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out) * float(vae.config.scaling_factor)


class LatentCache:
    """Latents of training images, encoded once each and kept on disk (safetensors, no pickle)."""

    def __init__(self, vae, path, batch_size: int = 32, read_only: bool = False):
        """read_only: images missing from the file are encoded but not added to it (an evaluation
        reads a finished run's cache and never rewrites it)."""
        self.vae, self.path, self.batch_size, self.read_only = vae, Path(path), batch_size, read_only
        self.encoded = 0  # images this object sent through the VAE (the cache's misses)

    def identity(self, resolution: int) -> dict:
        return {"vae": vae_fingerprint(self.vae), "resolution": int(resolution),
                "scaling_factor": float(self.vae.config.scaling_factor)}

    def _read(self, identity: dict) -> dict[str, torch.Tensor]:
        if not self.path.is_file():
            return {}
        with safe_open(str(self.path), framework="pt") as f:
            metadata = f.metadata() or {}
            saved = json.loads(metadata.get("identity", "null"))
            if saved != identity:
                changed = sorted(k for k in identity if (saved or {}).get(k) != identity[k])
                warnings.warn(f"re-encoding every image: the latents in {self.path} were made with another "
                              f"{' and '.join(changed)} ({saved} vs {identity})", stacklevel=3)
                return {}
            keys = json.loads(metadata.get("keys", "[]"))
            latents = f.get_tensor("latents")
        return dict(zip(keys, latents))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Latents for uint8 images (N, C, H, W): cached ones read back, the others encoded and saved."""
        identity = self.identity(images.shape[-1])
        known = self._read(identity)
        keys = [image_key(img) for img in images]
        missing = [i for i, k in enumerate(dict.fromkeys(keys)) if k not in known]
        if missing:
            firsts = {k: i for i, k in reversed(list(enumerate(keys)))}  # one encode per distinct image
            todo = [firsts[k] for k in dict.fromkeys(keys) if k not in known]
            fresh = encode(self.vae, images[todo], self.batch_size)
            self.encoded += len(todo)
            known.update(zip([keys[i] for i in todo], fresh))
            if not self.read_only:
                self._write(known, identity)
        return torch.stack([known[k] for k in keys])

    def _write(self, known: dict[str, torch.Tensor], identity: dict) -> None:
        keys = list(known)
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": torch.stack([known[k] for k in keys]).contiguous()}, str(tmp),
                  metadata={"identity": json.dumps(identity), "keys": json.dumps(keys)})
        tmp.replace(self.path)  # a reader never sees half a file


@dataclass
class LatentSet(ImageSet):
    """Training images as the UNet sees them: `images` are float latents (N, c, H/f, W/f), already in
    the model's range; indices, labels and prompts are the pixel images'."""

    def as_float(self) -> torch.Tensor:
        return self.images.float()


def encode_members(members: ImageSet, pipeline_path, cache_path, device="cpu", batch_size: int = 32) -> LatentSet:
    """The training images' latents through the pipeline's VAE, from (and into) the cache at cache_path."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipeline_path, subfolder="vae", use_safetensors=True).to(device).eval()
    return as_latent_set(members, LatentCache(vae, cache_path, batch_size)(members.images))


def as_latent_set(images: ImageSet, latents: torch.Tensor) -> LatentSet:
    """`images` (indices, labels, prompts, ...) with their latents in place of the pixels."""
    values = {f.name: getattr(images, f.name) for f in fields(ImageSet)}
    values["images"] = latents
    return LatentSet(**values)


@torch.no_grad()
def generate_with_latent_pipeline(path, prompts: list[str], num_inference_steps: int = 10,
                                  guidance_scale: float = 3.0, seed: int = 0, device="cpu") -> torch.Tensor:
    """Images for `prompts` from a saved latent pipeline (decoded by its VAE), (B, C, H, W) in [-1, 1]."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(path, use_safetensors=True).to(device)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipeline(list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pt").images  # [0, 1] after the image processor
    return (images.float() * 2 - 1).clamp(-1, 1).cpu()


def make_tiny_sd_pipeline(out_dir, resolution: int = 16, channels: int = 3, seed: int = 0) -> Path:
    """Save a tiny, randomly initialised StableDiffusionPipeline (safetensors) to `out_dir`; return its path.

    For tests and smoke runs only (no hub): AutoencoderKL with 2 blocks (factor 2, 4 latent channels),
    UNet2DConditionModel, CLIPTextModel from a small config, and a character-level CLIPTokenizer built
    here (every byte is a token; no merges), so any caption tokenizes offline.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)  # SD's caption length
    torch.manual_seed(seed)
    text_width = 32
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=resolution)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width, norm_num_groups=8, attention_head_dim=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    out = Path(out_dir)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out
