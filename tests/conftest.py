"""Shared fixtures: offline environment, Hydra composition, tiny configs."""
import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on 2 cores: one thread per worker (and its subprocesses); two workers with two
    # threads each spin-wait on each other and run several times slower.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

from tests.helpers import compose


@pytest.fixture
def smoke_cfg():
    """A factory for tiny train configs (experiment=smoke plus overrides)."""
    return lambda *overrides: compose("train", ["experiment=smoke", "sample.count=4", *overrides])
