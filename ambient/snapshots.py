"""A run's model at an earlier training step: a checkpoint's EMA weights as a model folder.

Gu et al. 2023 track memorization over training; here `python evaluate.py run_dir=RUN checkpoint=STEP`
attacks the EMA model kept in `<run>/checkpoints/checkpoint-STEP` exactly as it attacks the final one,
and `python -m ambient.trajectory RUN` draws the curve. The folder is `<run>/snapshots/step-STEP`: the
final model's folder (settings, scheduler, captions) with the checkpoint's EMA weights in `unet/`, so
the training run must have finished. Keep the checkpoints with `train.checkpoints_keep` (default 2).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ambient.checkpoints import checkpoint_steps
from ambient.models import load_trained_unet
from ambient.rundir import CHECKPOINTS, SETTINGS, SNAPSHOTS, ModelDir, RunDir, read_json

EMA_STATE = "custom_checkpoint_0.pkl"  # the first object train.py registers for checkpointing: the EMA
SKIPPED = ("README.md", "evaluations.jsonl")  # the final model's card and history are not the snapshot's


class SnapshotError(ValueError):
    """A checkpoint that cannot become a model folder; the message names the key or file."""


def checkpoint_dir(run_dir, step: int) -> Path | None:
    """The kept checkpoint of that step (train.py's naming, ambient/checkpoints.py), or None."""
    return dict(checkpoint_steps(Path(run_dir) / CHECKPOINTS)).get(int(step))


def snapshot_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"step-{int(step):07d}"


def available_steps(run_dir) -> list[int]:
    return [step for step, path in checkpoint_steps(Path(run_dir) / CHECKPOINTS) if (path / EMA_STATE).is_file()]


def ema_weights(checkpoint: Path) -> list[torch.Tensor]:
    """The EMA's shadow parameters (diffusers' EMAModel state), read without unpickling code."""
    path = checkpoint / EMA_STATE
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "shadow_params" not in state:
        raise SnapshotError(f"{path}: not an EMA state (no shadow_params); was this checkpoint written by train.py?")
    return state["shadow_params"]


def export_snapshot(run_dir, step: int) -> Path:
    """`<run>/snapshots/step-STEP`, made once from the checkpoint (an existing one is reused: it is a
    pure function of the checkpoint and the final model's folder)."""
    run_dir, step = Path(run_dir), int(step)
    out = snapshot_dir(run_dir, step)
    if ModelDir(out).is_model():
        return out
    final = ModelDir(RunDir(run_dir).model)
    if not final.is_model():
        raise SnapshotError(f"run_dir={run_dir} has no finished model ({final.path}): checkpoint= evaluates the "
                            f"checkpoints of a finished run (its model folder gives the settings and scheduler)")
    settings = final.read_settings()
    if settings.get("latent"):
        raise SnapshotError(f"checkpoint={step}: latent-pipeline runs are not supported yet (their VAE and latents "
                            f"belong to the final model); evaluate the final model")
    source = checkpoint_dir(run_dir, step)
    if source is None or not (source / EMA_STATE).is_file():
        kept = available_steps(run_dir)
        raise SnapshotError(f"checkpoint={step}: {Path(run_dir) / CHECKPOINTS} holds no such checkpoint; kept checkpoints: "
                            f"{', '.join(map(str, kept)) or 'none'} (train with train.checkpoints_keep=N to keep more)")
    shadow = ema_weights(source)
    unet = load_trained_unet(final.unet, settings.get("conditioning") == "text")
    params = list(unet.parameters())
    shapes_match = len(params) == len(shadow) and all(p.shape == s.shape for p, s in zip(params, shadow))
    if not shapes_match:  # e.g. a LoRA fine-tune: the EMA follows the adapters' parameters, not the saved UNet's
        raise SnapshotError(f"{source}: its EMA holds {len(shadow)} tensors that do not match the {len(params)} "
                            f"parameters of {final.unet}; this run's checkpoints cannot be exported")
    with torch.no_grad():
        for p, s in zip(params, shadow):
            p.copy_(s.to(p.dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a kill mid-export leaves only this
    shutil.copytree(final.path, tmp, ignore=shutil.ignore_patterns(*SKIPPED))
    shutil.rmtree(tmp / final.unet.name)
    unet.save_pretrained(tmp / final.unet.name, safe_serialization=True)
    _mark_step(ModelDir(tmp), step)
    tmp.rename(out)
    return out


def _mark_step(model: ModelDir, step: int) -> None:
    """Record in the settings which step the weights are from (reports and cards show it)."""
    path, key = (model.index, "ambient") if model.index.is_file() and "ambient" in read_json(model.index) \
        else (model.path / SETTINGS, None)
    data = read_json(path)
    (data[key] if key else data)["checkpoint_step"] = step
    path.write_text(json.dumps(data, indent=2) + "\n")


__all__ = ["SnapshotError", "available_steps", "checkpoint_dir", "export_snapshot", "snapshot_dir", "SNAPSHOTS"]
