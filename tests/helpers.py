"""Test helpers: Hydra composition and running the entry points."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST_FEATURES = "random_projection"


def compose(config_name: str = "train", overrides=()):
    """A composed config exactly as the CLI builds it (Hydra resolvers included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import ambient  # noqa: F401  registers ${run_stamp:} and ${main_rank_only:}

    overrides = list(overrides)
    if config_name == "evaluate" and not any(o.startswith("attack.features=") for o in overrides):
        # Speed only: the default EfficientNet features cost ~0.2 s per image on 2 CPU cores;
        # tests/test_features.py and the end-to-end tests exercise them.
        overrides.append(f"attack.features={FAST_FEATURES}")
    if config_name == "evaluate" and not any(o.startswith("attack.inpaint.") for o in overrides):
        overrides += ["attack.inpaint.samples=2", "attack.inpaint.max_images=32"]  # speed only, as above
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run_script(script: str, *overrides, timeout=600, check=True, env=None) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, from the repository root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, script, *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box two threads spin-wait on each
    other (one generation went from 0.2 s to 9 s). Use: pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def train_and_evaluate(tmp_path, train_overrides=(), eval_overrides=()):
    """A 4-step smoke run on 40 digits (10 held out) and its evaluation at tiny attack settings:
    (run dir, evaluation dir, report)."""
    import json

    from ambient.evaluation import evaluate_run
    from ambient.training import train

    run, out = tmp_path / "run", tmp_path / "eval"
    train(compose("train", ["experiment=smoke", "dataset.limit=40", "dataset.holdout=10", "train.steps=4",
                            "train.checkpoint_every=0", "sample.count=0", *train_overrides]), run)
    cfg = compose("evaluate", [f"run_dir={run}", f"out_dir={out}", "attack.samples_per_prompt=6", "attack.batch_size=6",
                               "attack.num_steps=3", "mia.draws=1", "attack.inpaint.samples=1", *eval_overrides])
    return run, out, json.loads(evaluate_run(run, cfg, out).read_text())
