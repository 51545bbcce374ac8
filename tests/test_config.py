import subprocess
import sys

import pytest

from ambient.config import ConfigError, validate
from tests.helpers import REPO, compose

GROUPS = {
    "dataset": ["digits", "imagefolder", "cifar10", "hf"],
    "corruption": ["none", "mask20", "mask40", "mask60", "mask80", "mask90", "box", "noise"],
    "model": ["unet_tiny", "unet_cifar", "pretrained", "unet_text_tiny", "pipeline"],
    "loss": ["edm", "ddpm"],
    "logger": ["none", "wandb"],
    "text_encoder": ["none", "minilm", "clip"],
    "captions": ["standard", "randomize", "shuffle", "noise", "empty_mix"],
    "privacy": ["none", "dpsgd"],
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(group, option):
    cfg = compose("train", [f"{group}={option}"])
    assert cfg[group] is not None


def test_defaults_and_mask_levels():
    cfg = compose("train")
    assert cfg.dataset.kind == "digits" and cfg.corruption.kind == "none" and cfg.logger.kind == "none"
    validate(cfg)
    for p in (20, 40, 60, 80, 90):
        c = compose("train", [f"corruption=mask{p}"]).corruption
        assert c.kind == "mask" and c.p == pytest.approx(p / 100) and c.delta == pytest.approx(0.1)


def test_finetune_experiment_uses_the_pretrained_model_with_the_ddpm_objective():
    cfg = compose("train", ["experiment=finetune", "model.path=somewhere"])
    assert cfg.model.kind == "pretrained" and cfg.loss.kind == "ddpm"
    with pytest.raises(ConfigError, match="loss"):
        validate(compose("train", ["model=pretrained", "model.path=somewhere"]))


@pytest.mark.parametrize("override,key", [
    ("corruption.p=1.5", "corruption.p"),
    ("corruption.p=1.0", "corruption.p"),
    ("corruption.delta=1.0", "corruption.delta"),
    ("corruption.delta=-0.1", "corruption.delta"),
    ("dataset.resolution=17", "dataset.resolution"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.fused_loss=maybe", "train.fused_loss"),
    ("train.steps=0", "train.steps"),
    ("dataset.holdout=-3", "dataset.holdout"),
])
def test_invalid_values_name_the_key(override, key):
    base = ["corruption=mask90"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose("train", base + [override]))


@pytest.mark.parametrize("overrides,key", [
    (["text_encoder=minilm"], "model"),                                   # unet_tiny has no cross-attention
    (["model=unet_text_tiny"], "text_encoder"),                           # a text model without an encoder
    (["model=unet_text_tiny", "text_encoder=minilm", "captions.q=1.5"], "captions.q"),
    (["model=unet_text_tiny", "text_encoder=minilm", "captions.randomize=drop"], "captions.randomize"),
    (["model=unet_text_tiny", "text_encoder=minilm", "captions.empty_prob=1"], "captions.empty_prob"),
    (["model=unet_text_tiny", "text_encoder=minilm", "model.conditional=true"], "model.conditional"),
    (["experiment=finetune_text", "model.path=x", "loss=edm"], "loss"),
    (["evaluate.overrides=3"], "evaluate.overrides"),
])
def test_invalid_text_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose("train", overrides))


def test_text_experiments_compose_valid():
    validate(compose("train", ["experiment=digits_text"]))
    cfg = compose("train", ["experiment=finetune_text", "model.path=/some/pipeline"])
    validate(cfg)
    assert cfg.text_encoder.path == "/some/pipeline" and cfg.text_encoder.max_length == 77
    assert cfg.loss.kind == "ddpm" and cfg.model.kind == "pipeline"


def test_missing_image_folder_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path"):
        validate(compose("train", ["dataset=imagefolder", f"dataset.path={tmp_path / 'missing'}"]))


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "corruption=mask90", "corruption.p=1.5",
                           f"run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "corruption.p=1.5" in proc.stderr + proc.stdout
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()
