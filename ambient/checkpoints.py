"""Checkpoints and resuming: atomic accelerate checkpoints, what a resume may continue, stopping on a signal.

Checkpoints are written to `<name>.tmp` and renamed when complete.

A kill mid-save leaves only a `.tmp` folder, which `latest_checkpoint` ignores and the next
save removes, so `resume=auto` never loads a half-written state. `save_state` runs on every
rank (accelerate writes per-rank RNG state); only the main process renames and prunes.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ambient.config import config_differences
from ambient.errors import RunRefused
from ambient.rundir import RunDir

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    steps = checkpoint_steps(Path(root))
    return steps[-1][1] if steps else None


def save_checkpoint(accelerator, root: Path, step: int, keep: int) -> Path:
    root = Path(root)
    final, tmp = root / f"checkpoint-{step:07d}", root / f"checkpoint-{step:07d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in checkpoint_steps(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class StopRequest:
    """SIGTERM (SLURM preemption sends it) or Ctrl-C during training asks the loop to finish its step,
    save a checkpoint and stop; a second signal stops at once. All ranks stop at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    REPEAT_WINDOW = 3.0  # s: torchrun/accelerate forward the terminal's Ctrl-C, so it arrives twice

    def __init__(self):
        self.signal: str | None = None
        self._first = 0.0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        import time

        if self.signal is None:
            self.signal, self._first = signal.Signals(signum).name, time.monotonic()
        elif time.monotonic() - self._first > self.REPEAT_WINDOW:  # asked again: do not wait for the checkpoint
            self.__exit__()
            raise KeyboardInterrupt

    def requested(self, accelerator) -> bool:
        """Whether any rank was signalled (a collective with several ranks: call it on every rank)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        import torch

        flag = torch.tensor([float(self.signal is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)


def prepare_run_dir(run: RunDir, cfg: DictConfig) -> Path | None:
    """Refuse a run directory that is finished, already started (without resume), or was trained with
    another config; return the checkpoint to resume from, if any. Touches nothing."""
    resume = cfg.get("resume")
    if run.is_finished():
        raise RunRefused(f"run_dir={run.path} already holds a finished model; choose another run_dir")
    latest = latest_checkpoint(run.checkpoints)
    if resume in (None, "never"):
        if latest is not None or run.has_model():
            raise RunRefused(f"run_dir={run.path} holds checkpoints; pass resume=auto to continue it "
                             "or choose another run_dir")
        return None
    if run.config.is_file():
        changed = config_differences(run.read_config(), OmegaConf.to_container(cfg, resolve=True))
        if changed:
            raise RunRefused(f"run_dir={run.path} was trained with another config, and resume={resume} would mix "
                             f"the two; differing keys: {'; '.join(changed)}. Use the run's own settings "
                             f"({run.config}) or choose another run_dir")
    chosen = latest if resume == "auto" else Path(resume)
    step = PATTERN.match(chosen.name) if chosen is not None else None
    if step and int(step.group(1)) > cfg.train.steps:
        raise RunRefused(f"resume={chosen} is a checkpoint at step {int(step.group(1))}, past train.steps="
                         f"{cfg.train.steps}: nothing would be trained; set train.steps to at least that step")
    return chosen


def latest_or(run: RunDir, cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from on a non-main rank (the main rank already checked the directory)."""
    if cfg.get("resume") in (None, "never"):
        return None
    return latest_checkpoint(run.checkpoints) if cfg.resume == "auto" else Path(cfg.resume)


def truncate_metrics(run: RunDir, step: int) -> None:
    if not run.metrics.is_file():
        return
    kept = []
    for line in run.metrics.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
    run.metrics.write_text("".join(line + "\n" for line in kept))


def last_logged_loss(run: RunDir) -> float:
    try:
        lines = run.metrics.read_text().splitlines()
        return float(json.loads(lines[-1])["loss"]) if lines else math.nan
    except (OSError, ValueError, KeyError):
        return math.nan
