"""Atomic accelerate checkpoints: written to `<name>.tmp`, renamed when complete.

A kill mid-save leaves only a `.tmp` folder, which `latest_checkpoint` ignores and the next
save removes, so `resume=auto` never loads a half-written state. `save_state` runs on every
rank (accelerate writes per-rank RNG state); only the main process renames and prunes.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

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
