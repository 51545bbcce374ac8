"""Experiment tracking: a metrics.jsonl in the run directory always, wandb when asked.

wandb never needs a network: `logger=wandb` runs offline unless `logger.mode=online`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ambient import rundir
from ambient.config import LOGGER_KINDS, LOGGER_MODES


class Tracker:
    """Appends one JSON object per `log` call to metrics.jsonl; subclasses also send it elsewhere."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / rundir.METRICS

    def log(self, metrics: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, project: str, mode: str, config: dict, name: str | None = None,
                 tags: list | None = None):
        super().__init__(run_dir)
        import wandb

        if mode not in LOGGER_MODES:
            raise ValueError(f"logger.mode={mode!r}; allowed: {' | '.join(LOGGER_MODES)}")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(project=project, mode=mode, dir=str(run_dir), config=config, name=name,
                              tags=tags, reinit="finish_previous")

    def log(self, metrics, step):
        super().log(metrics, step)
        self.run.log(metrics, step=step)

    def log_image(self, key, path, step):
        self.run.log({key: self.wandb.Image(str(path))}, step=step)

    def finish(self, exit_code=0):
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg, run_dir: Path, config: dict) -> Tracker:
    """From a `logger` config node (kind: none | wandb)."""
    if cfg.kind == "none":
        return Tracker(run_dir)
    if cfg.kind == "wandb":
        return WandbTracker(run_dir, cfg.project, cfg.mode, config, cfg.get("name"), list(cfg.get("tags") or []))
    raise ValueError(f"logger.kind={cfg.kind!r}; allowed: {' | '.join(LOGGER_KINDS)}")
