"""Any diffusers model as the attack's target: a pipeline or UNet folder this project did not train.

Carlini et al. 2023 attacked public DDPM checkpoints (CIFAR-10) this way: the model is loaded as it
was saved (safetensors weights, its own scheduler) and wrapped as an AmbientPipeline without a
corruption, so generation, the loss attack and the reconstruction attack run through the same
code as for a run of this project:

    python evaluate.py model=DIR train_data=DIR [reference_data=DIR] [prompts=FILE]

Supported: DDPMPipeline / DDIMPipeline folders (unet/ + scheduler/), a bare UNet2DModel folder
(config.json + weights; the DDPM paper's linear schedule is assumed and recorded), class-conditional
UNet2DModels (num_class_embeds), and pixel-space text-to-image pipelines (UNet2DConditionModel +
text_encoder/ + tokenizer/, prompted with the captions of prompts=FILE). Latent pipelines (vae/)
are not supported yet.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ambient.config import ConfigError
from ambient.rundir import read_json

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
UNETS = ("UNet2DModel", "UNet2DConditionModel")
SAMPLERS = {"ddim": 50, "ddpm_ancestral": None}  # kind -> default steps (None: the scheduler's training steps)
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                     "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": True}


def _fail(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _layout(path: Path) -> tuple[Path, Path | None, str]:
    """(unet folder, scheduler folder or None, unet class name) of a pipeline or UNet folder."""
    if not path.is_dir():
        raise _fail("model", str(path), "a diffusers pipeline folder (model_index.json, unet/, scheduler/) "
                                        "or a UNet folder (config.json + safetensors weights)")
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        if "ambient" in index:
            raise _fail("model", str(path), "a model this project trained is evaluated with run_dir=RUN")
        if "vae" in index or (path / "vae").is_dir():
            raise _fail("model", str(path), "latent pipelines (with vae/) are not supported yet; "
                                            "pixel-space pipelines only")
        if not (path / "unet" / "config.json").is_file():
            raise _fail("model", str(path), "its model_index.json names no unet/ folder with a config.json")
        unet_dir, scheduler_dir = path / "unet", path / "scheduler"
        scheduler_dir = scheduler_dir if (scheduler_dir / "scheduler_config.json").is_file() else None
    elif (path / "config.json").is_file():
        unet_dir, scheduler_dir = path, None
    else:
        raise _fail("model", str(path), "a diffusers folder: neither model_index.json nor config.json is there")
    unet_class = read_json(unet_dir / "config.json").get("_class_name")
    if unet_class not in UNETS:
        raise _fail("model", str(path), f"its UNet is {unet_class!r}; supported: {' | '.join(UNETS)}")
    if not any(unet_dir.glob("*.safetensors")):
        raise _fail("model", str(path), f"{unet_dir} holds no .safetensors weights (pickled weights are never "
                                        "loaded: convert them with save_pretrained(safe_serialization=True))")
    return unet_dir, scheduler_dir, unet_class


def _scheduler(scheduler_dir: Path | None):
    import diffusers

    config = read_json(scheduler_dir / "scheduler_config.json") if scheduler_dir else dict(DEFAULT_SCHEDULER)
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise _fail("model", str(scheduler_dir), f"its scheduler is {name!r}; supported: {' | '.join(SCHEDULERS)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise _fail("model", str(scheduler_dir), f"prediction_type {prediction!r}; supported: {' | '.join(PREDICTION_TYPES)}")
    scheduler_class = getattr(diffusers, name)
    return (scheduler_class.from_pretrained(scheduler_dir) if scheduler_dir
            else scheduler_class.from_config(config)), prediction


def fingerprint(path) -> str:
    """sha256 over the folder's configs and weights (.json, .safetensors): which model made the generations."""
    path = Path(str(path)).expanduser()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")):
        digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def load_external(path, sampler: str = "ddim", num_steps: int | None = None, device: str | torch.device = "cpu"):
    """The folder as an AmbientPipeline without corruption (its settings say `external`)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    from ambient.pipeline import AmbientPipeline

    path = Path(str(path)).expanduser()
    if sampler not in SAMPLERS:
        raise _fail("model_sampler", sampler, " | ".join(SAMPLERS))
    unet_dir, scheduler_dir, unet_class = _layout(path)
    scheduler, prediction = _scheduler(scheduler_dir)
    text = unet_class == "UNet2DConditionModel"
    text_encoder = tokenizer = None
    if text:
        text_encoder, tokenizer = _text_parts(path)
        max_length = min(int(getattr(tokenizer, "model_max_length", 77)), 77)  # CLIP's 77; huge "unlimited" values capped
    unet = (UNet2DConditionModel if text else UNet2DModel).from_pretrained(unet_dir, use_safetensors=True)
    config = unet.config
    channels, resolution = int(config.in_channels), config.sample_size
    resolution = int(resolution if isinstance(resolution, int) else resolution[0])
    classes = int(getattr(config, "num_class_embeds", None) or 0)
    steps = num_steps or SAMPLERS[sampler] or int(scheduler.config.num_train_timesteps)
    settings = {
        "external": {"path": str(path), "scheduler": type(scheduler).__name__,
                     "scheduler_assumed": scheduler_dir is None, "unet": unet_class},
        "conditioning": "text" if text else "class" if classes else "none",
        "text_encoder": {"max_length": max_length} if text else None,
        "text_encoder_name": f"{path.name}/text_encoder" if text else None,
        "objective": "ddpm", "prediction_type": prediction, "mask_channel": False,
        "corruption": {"kind": "none", "delta": 0.0}, "delta": 0.0,
        "channels": channels, "resolution": resolution, "num_classes": classes, "class_names": None,
        # The sampler steps on x0 estimates: clip them to [-1, 1], as the pipelines' schedulers do by default.
        "sampler": ({"kind": "ddim", "num_steps": steps, "clip_denoised": bool(scheduler.config.get("clip_sample", True))}
                    if sampler == "ddim" else
                    {"kind": "ddpm_ancestral", "num_steps": steps, "threshold": "clip"
                     if scheduler.config.get("clip_sample", True) else "none"}),
        "dataset": None,
    }
    pipeline = AmbientPipeline(unet, scheduler, text_encoder, tokenizer, ambient=settings)
    pipeline.unet.eval()
    return pipeline.to(device)


def _text_parts(path: Path):
    import transformers

    if not ((path / "text_encoder").is_dir() and (path / "tokenizer").is_dir()):
        raise _fail("model", str(path), "a text-conditional UNet needs the pipeline's text_encoder/ and tokenizer/")
    index = read_json(path / "model_index.json")
    parts = []
    for name in ("text_encoder", "tokenizer"):
        library, class_name = (index.get(name) or [None, None])[:2]
        part_class = getattr(transformers, class_name or "", None) if library == "transformers" else None
        if part_class is None:
            raise _fail("model", str(path), f"its {name} is {library}.{class_name}; expected a transformers class")
        extra = {"use_safetensors": True, "dtype": torch.float32} if name == "text_encoder" else {}
        parts.append(part_class.from_pretrained(path / name, **extra))
    return tuple(parts)


def read_prompts(file) -> list[str]:
    """Captions to attack a text model with: one per non-empty line."""
    path = Path(str(file)).expanduser()
    if not path.is_file():
        raise _fail("prompts", str(file), "a text file with one caption per line")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise _fail("prompts", str(file), "a text file with one caption per line (it is empty)")
    return lines
