"""End to end: the CLI on tiny runs, resume after a kill, refusal to overwrite, wandb offline."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ambient.config import ConfigError
from ambient.rundir import ModelDir
from ambient.trained import load_run
from ambient.training import train
from tests.helpers import REPO, run_script


def _weights(run_dir):
    return load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_smoke_mask90_leaves_a_loadable_ambient_model(tmp_path):
    run = tmp_path / "mask90"
    proc = run_script("train.py", "experiment=smoke", "corruption=mask90", f"run_dir={run}")
    assert f"model:   {run / 'model'}" in proc.stdout and "samples.png" in proc.stdout
    for name in ("config.yaml", "split.json", "metrics.jsonl", "samples.png", "summary.json", ".hydra/config.yaml",
                 "model/model_index.json", "model/README.md", "model/pipeline_ambient.py",
                 "model/unet/diffusion_pytorch_model.safetensors",
                 "checkpoints/checkpoint-0000030/model.safetensors"):
        assert (run / name).is_file(), name
    assert not list((run / "checkpoints").glob("*.tmp"))
    settings = ModelDir(run / "model").read_settings()
    assert settings["mask_channel"] and settings["corruption"]["p"] == 0.9 and settings["objective"] == "edm"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [10, 20, 30, 40, 50, 60]
    assert all(0 < r["loss"] < float("inf") for r in logged)
    split = json.loads((run / "split.json").read_text())
    assert len(split["members"]) == 200 and split["holdout"] == []
    model = load_run(run)
    assert model.net.unet.config.in_channels == 2
    images = model.generate(3, seed=0)
    assert images.shape == (3, 1, 16, 16) and torch.isfinite(images).all() and images.abs().max() <= 1


def test_smoke_without_corruption_is_a_plain_model(tmp_path, smoke_cfg):
    summary = train(smoke_cfg("corruption=none", "train.steps=20", "train.checkpoint_every=0"), tmp_path)
    model = load_run(tmp_path)
    assert model.net.unet.config.in_channels == 1 and not model.settings["mask_channel"]
    assert summary["steps"] == 20 and (tmp_path / "samples.png").is_file()


@pytest.mark.slow
def test_resume_after_kill_continues_to_the_same_weights(tmp_path):
    args = ["experiment=smoke", "corruption=mask60", "train.steps=30", "train.checkpoint_every=10",
            "train.checkpoints_keep=3", "sample.count=0"]
    straight = tmp_path / "straight"
    run_script("train.py", *args, f"run_dir={straight}")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"run_dir={killed}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint-0000010").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    (killed / "checkpoints" / "checkpoint-0000999.tmp").mkdir()  # a half-written save must be ignored

    with pytest.raises(AssertionError, match="resume=auto"):
        run_script("train.py", *args, f"run_dir={killed}")
    proc = run_script("train.py", *args, f"run_dir={killed}", "resume=auto")
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_never_overwritten(tmp_path, smoke_cfg):
    cfg = smoke_cfg("train.steps=2", "train.checkpoint_every=0", "sample.count=0")
    train(cfg, tmp_path)
    before = _weights(tmp_path)
    with pytest.raises(ConfigError, match="finished model"):
        train(cfg, tmp_path)
    after = _weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_loss_stops_the_run_with_a_clear_message(tmp_path, smoke_cfg, monkeypatch):
    from ambient import losses

    original = losses.AmbientEDMLoss.__call__
    monkeypatch.setattr(losses.AmbientEDMLoss, "__call__",
                        lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train(smoke_cfg("corruption=mask90"), tmp_path)
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_class_conditional_with_accumulation_and_bf16(tmp_path, smoke_cfg):
    cfg = smoke_cfg("corruption=mask80", "model.conditional=true", "train.steps=4", "train.grad_accum=2",
                    "train.mixed_precision=bf16", "train.checkpoint_every=0", "sample.count=10")
    train(cfg, tmp_path)
    model = load_run(tmp_path)
    assert model.settings["num_classes"] == 10
    three, seven = model.generate(2, seed=0, label=3), model.generate(2, seed=0, label=7)
    assert not torch.allclose(three, seven)
    assert (tmp_path / "samples.png").is_file()


def test_fine_tune_a_saved_pretrained_unet_under_masking(tmp_path, smoke_cfg):
    from diffusers import DDPMScheduler, UNet2DModel

    pipeline = tmp_path / "tiny_pipeline"
    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, layers_per_block=1).save_pretrained(pipeline / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(pipeline / "scheduler")
    cfg = smoke_cfg("model=pretrained", "loss=ddpm", f"model.path={pipeline}", "corruption=mask90",
                    "train.steps=4", "train.checkpoint_every=0", "sampler.num_steps=5")
    train(cfg, tmp_path / "run")
    model = load_run(tmp_path / "run")
    assert model.settings["objective"] == "ddpm" and model.net.unet.config.in_channels == 2
    assert torch.isfinite(model.generate(2, seed=0)).all()


def test_wandb_offline_writes_its_files(tmp_path, smoke_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(smoke_cfg("logger=wandb", "train.steps=3", "train.log_every=1", "train.checkpoint_every=0"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
