"""Shared fixtures: offline environment, Hydra composition, tiny configs."""
import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import compose


@pytest.fixture
def smoke_cfg():
    """A factory for tiny train configs (experiment=smoke plus overrides)."""
    return lambda *overrides: compose("train", ["experiment=smoke", "sample.count=4", *overrides])
