"""Memorization vs training steps: a checkpoint's EMA model exported, attacked, and drawn over steps."""
import json

import pytest
import torch

from ambient.config import ConfigError, validate_evaluate
from ambient.models import load_trained_unet
from ambient.rundir import RunDir
from ambient.snapshots import SnapshotError, available_steps, checkpoint_dir, export_snapshot
from ambient.training import train
from tests.helpers import compose, one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """12 steps, a checkpoint every 4, all three kept; 10 held-out digits."""
    path = tmp_path_factory.mktemp("run")
    cfg = compose("train", ["experiment=smoke", "dataset.limit=40", "dataset.holdout=10", "train.steps=12",
                            "train.checkpoint_every=4", "train.checkpoints_keep=3", "sample.count=0"])
    train(cfg, path)
    return path


def _weights(folder):
    return [p.detach().clone() for p in load_trained_unet(folder / "unet", text=False).parameters()]


def test_the_last_checkpoint_exports_exactly_the_final_model_and_earlier_ones_their_own_ema(run):
    assert available_steps(run) == [4, 8, 12]
    final = _weights(run / "model")
    last = export_snapshot(run, 12)
    assert all(torch.equal(a, b) for a, b in zip(_weights(last), final))
    early = export_snapshot(run, 4)
    shadow = torch.load(checkpoint_dir(run, 4) / "custom_checkpoint_0.pkl", weights_only=True)["shadow_params"]
    exported = _weights(early)
    assert all(torch.equal(a, b) for a, b in zip(exported, shadow))
    assert not all(torch.equal(a, b) for a, b in zip(exported, final))  # a different model, not a copy
    settings = json.loads((early / "model_index.json").read_text())["ambient"]
    assert settings["checkpoint_step"] == 4 and not (early / "evaluations.jsonl").exists()
    mtime = (early / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert export_snapshot(run, 4) == early  # made once, then reused
    assert (early / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def test_a_step_without_a_checkpoint_is_refused_with_the_kept_steps(run, tmp_path):
    with pytest.raises(SnapshotError, match=r"checkpoint=5: .* kept checkpoints: 4, 8, 12"):
        export_snapshot(run, 5)
    with pytest.raises(ConfigError, match="checkpoint"):
        validate_evaluate(compose("evaluate", [f"run_dir={run}", "checkpoint=-1"]))
    with pytest.raises(ConfigError, match="checkpoint"):  # only a run has checkpoints
        validate_evaluate(compose("evaluate", [f"samples={tmp_path}", f"train_data={tmp_path}", "checkpoint=4"]))


def test_checkpoint_evaluations_land_beside_the_final_ones_and_draw_a_curve(run):
    from ambient.compare import gather as compare_row
    from ambient.evaluation import evaluate_run
    from ambient.trajectory import trajectory

    def cfg(*extra):
        return compose("evaluate", [f"run_dir={run}", "attack.samples_per_prompt=12", "attack.batch_size=12",
                                    "attack.num_steps=3", "mia.draws=1", "attack.inpaint.enabled=false",
                                    "mia.attacks=[loss]",
                                    *extra])

    step_cfg = cfg("checkpoint=4")
    assert step_cfg.out_dir == str(run / "eval-step-0000004") and cfg().out_dir == str(run / "eval")
    validate_evaluate(step_cfg)
    early = json.loads(evaluate_run(run, step_cfg, run / "eval-step-0000004").read_text())
    final = json.loads(evaluate_run(run, cfg(), run / "eval").read_text())
    assert early["source"]["checkpoint_step"] == 4 and final["source"]["checkpoint_step"] is None
    assert early["source"]["train_steps"] == final["source"]["train_steps"] == 12
    # Different weights, same seeds: different generations; the null (real held-out images) is the same.
    assert early["memorization"]["nn_distance_mean"] != final["memorization"]["nn_distance_mean"]
    assert early["null"]["memorization"] == final["null"]["memorization"]
    # The final model's history, its card and the comparison see only the final model's evaluations.
    assert RunDir(run).eval_reports() == [run / "eval" / "report.json"]
    assert RunDir(run).step_reports() == [run / "eval-step-0000004" / "report.json"]
    assert compare_row(run, run.parent)["report"] == "eval/report.json"
    history = (run / "model" / "evaluations.jsonl").read_text()
    assert "eval-step" not in history and "eval-step" in (run / "snapshots" / "step-0000004" / "evaluations.jsonl").read_text()

    result = trajectory(run)
    assert [(r["step"], r["model"]) for r in result["rows"]] == [(4, "checkpoint"), (12, "final")]
    assert result["rows"][0]["null_extracted"] == result["rows"][1]["null_extracted"]
    assert result["png"].stat().st_size > 0 and "| 12 (final) |" in result["md"].read_text()
    again = trajectory(run)  # never over the first: beside it
    assert again["md"] != result["md"] and result["md"].is_file()


@pytest.mark.slow
def test_a_checkpoint_sweep_from_the_command_line_reports_beside_the_run(run):
    from tests.helpers import run_script

    run_script("evaluate.py", "-m", f"run_dir={run}", "checkpoint=8,12", "attack.samples_per_prompt=6",
               "attack.num_steps=2", "attack.features=random_projection", "attack.inpaint.enabled=false",
               "mia.attacks=[loss]", "mia.draws=1", "hydra.sweep.dir=" + str(run.parent / "sweep"))
    for step in (8, 12):
        report = json.loads((run / f"eval-step-{step:07d}" / "report.json").read_text())
        assert report["source"]["checkpoint_step"] == step and report["counts"]["generations"] == 6
