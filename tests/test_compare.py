"""python -m ambient.compare on handmade run directories: labels, newest report, blanks, failures,
files never overwritten, wandb offline."""
import csv
import json
import os

import pytest
import yaml

from ambient.compare import compare, main, tradeoff_points


def _report(fid, extracted, generations=100, mia=True):
    return {"counts": {"generations": generations, "train_images": 64},
            "extraction": {"extracted": extracted, "extracted_fraction": extracted / generations, "adaptive_extracted": 1},
            "cliques": {"flagged": 3, "precision": None},
            "memorization": {"gu_fraction": 0.2, "nn_distance_mean": 0.3},
            "replication": {"above_0.5": 0.5, "above_0.95": 0.1},
            "quality": {"fid": fid, "kid": 0.01, "kid_std": 0.001, "features": "random_projection"},
            "mia": {"auc": 0.9, "tpr_at_1%_fpr": 0.3, "tpr_at_0.1%_fpr": 0.1} if mia else None}


def _run(root, name, corruption, summary=None, dedup=None, hydra_only=False):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    cfg = {"seed": 0, "corruption": corruption, "train": {"steps": 50}}
    if dedup is not None:
        cfg["dedup"] = dedup
    (run / (".hydra/config.yaml" if hydra_only else "config.yaml")).write_text(yaml.safe_dump(cfg))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _write(path, obj, mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    clean = _run(root, "corruption=none", {"kind": "none", "delta": 0.0},
                 summary={"steps": 50, "train_seconds": 12.5, "final_loss": 0.25})
    _write(clean / "eval" / "report.json", _report(fid=30.0, extracted=12))
    (clean / "eval" / "config.yaml").write_text("attack: {}\n")  # an eval folder is not a run
    mask = _run(root, "corruption=mask90", {"kind": "mask", "p": 0.9, "delta": 0.1},
                summary={"steps": 50, "train_seconds": 20.0, "final_loss": 0.5})
    _write(mask / "eval" / "report.json", _report(fid=99.0, extracted=5), mtime=1_000_000)
    _write(mask / "eval-2" / "report.json", _report(fid=40.0, extracted=0, mia=False), mtime=2_000_000)
    _run(root, "dedup", {"kind": "none"}, summary={"steps": 50, "train_seconds": 11.0, "final_loss": 0.3},
         dedup={"method": "tiled_l2", "threshold": 0.1})
    broken = _run(root, "corruption.p=1.5", {"kind": "mask", "p": 1.5}, hydra_only=True)
    _write(broken / "failed.json", {"error": "ConfigError: corruption.p=1.5 is invalid", "type": "ConfigError"})
    return root


def test_rows_labels_newest_report_blanks_and_failures(sweep):
    result = compare([sweep])
    rows = {r["run"]: r for r in result["rows"]}
    assert set(rows) == {"corruption=none", "corruption=mask90", "dedup", "corruption.p=1.5"}
    clean, mask, dedup, broken = (rows[k] for k in ("corruption=none", "corruption=mask90", "dedup", "corruption.p=1.5"))
    assert clean["defense"] == "clean" and clean["extracted"] == 12 and clean["fid"] == 30.0
    assert mask["defense"] == "mask p=0.9" and mask["p"] == 0.9
    assert mask["fid"] == 40.0 and mask["report"] == "eval-2/report.json" and mask["mia_auc"] is None  # newest report
    assert dedup["defense"] == "clean + dedup tiled_l2 (0.1)" and dedup["fid"] is None and dedup["status"] == "finished"
    assert broken["status"] == "failed" and broken["defense"] == "mask p=1.5" and "corruption.p=1.5" in broken["error"]

    with result["csv"].open() as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert table["dedup"]["fid"] == "" and table["dedup"]["extracted"] == ""  # blank, not "None"
    assert float(table["corruption=none"]["extracted_fraction"]) == pytest.approx(0.12)
    md = result["md"].read_text()
    assert "## Failed runs" in md and "ConfigError: corruption.p=1.5 is invalid" in md and "![" in md
    assert result["md"].parent == sweep
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_comparisons_are_never_overwritten(sweep, tmp_path):
    first = compare([sweep])
    before = {ext: first[ext].read_bytes() for ext in ("md", "csv", "png")}
    second = compare([sweep])
    assert {second[ext].name for ext in ("md", "csv", "png")} == {"comparison-1.md", "comparison-1.csv",
                                                                  "comparison-1.png"}
    assert all(first[ext].read_bytes() == before[ext] for ext in before)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "comparison.png").write_bytes(b"someone else's")  # one taken name moves all three
    third = compare([sweep / "corruption=none", sweep / "dedup"], out=tmp_path / "out")
    assert third["md"].name == "comparison-1.md" and len(third["rows"]) == 2


def test_cli_prints_paths_and_logs_to_wandb_offline(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out), "--wandb"])
    printed = capsys.readouterr().out
    assert "4 runs (1 failed)" in printed and str(out / "comparison.md") in printed
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])


def test_caption_defenses_are_named_but_cfg_dropout_is_not():
    from ambient.compare import defense_label

    text = {"corruption": {"kind": "none"}, "text_encoder": {"kind": "minilm"}}
    standard = {"randomize": "none", "q": 0.0, "empty_prob": 0.1, "embedding_noise": 0.0}
    assert defense_label({**text, "captions": standard})[0] == "clean"
    assert defense_label({**text, "captions": {**standard, "randomize": "replace", "q": 0.3}})[0] == \
        "clean + caption replace q=0.3"
    masked = {"corruption": {"kind": "mask", "p": 0.8}, "text_encoder": {"kind": "minilm"},
              "captions": {**standard, "embedding_noise": 0.1, "empty_prob": 0.5}}
    assert defense_label(masked)[0] == "mask p=0.8 + caption noise sigma=0.1 + empty captions 0.5"
    # an unconditional run's default captions node says nothing
    assert defense_label({"corruption": {"kind": "none"}, "text_encoder": {"kind": "none"},
                          "captions": {**standard, "randomize": "replace", "q": 0.3}})[0] == "clean"


def test_the_defense_column_names_the_whole_stack():
    from ambient.compare import defense_label

    cfg = {"corruption": {"kind": "mask", "p": 0.9, "delta": 0.1}, "dedup": {"kind": "exact"},
           "privacy": {"kind": "dpsgd", "epsilon": 10, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplicity": 4},
           "train": {"augment": {"hflip": 0.5, "max_shift": 0, "brightness": 0.2, "crop": 0.25},
                     "loss_drop": {"quantile": 0.0}}}
    assert defense_label(cfg)[0] == ("mask p=0.9 + dedup exact + DP-SGD ε≤10 (δ=1e-05, C=1, K=4)"
                                     " + augment (flip 0.5, brightness 0.2, crop 0.25)")
    cfg = {"corruption": {"kind": "none"}, "privacy": {"kind": "none"},
           "train": {"augment": {"hflip": 0.0}, "loss_drop": {"quantile": 0.1}}}
    assert defense_label(cfg)[0] == "clean + loss-drop q=0.1"
    given = {"kind": "dpsgd", "epsilon": None, "noise_multiplier": 1.2, "delta": 1e-5, "max_grad_norm": 0.5}
    assert defense_label({"corruption": {"kind": "none"}, "privacy": given})[0] == "clean + DP-SGD σ=1.2 (δ=1e-05, C=0.5)"


@pytest.mark.slow
def test_real_runs_with_combined_defenses_are_compared_with_their_epsilon(tmp_path, smoke_cfg):
    from ambient.training import train

    common = ["corruption=mask90", "train.steps=3", "train.checkpoint_every=0", "sample.count=0", "dataset.limit=40",
              "train.batch_size=4", "train.augment.brightness=0.2", "train.augment.noise=0.1", "train.augment.crop=0.25"]
    dp = tmp_path / "runs" / "dp"
    train(smoke_cfg(*common, "privacy=dpsgd", "dedup=exact", "train.mixed_precision=bf16", f"run_dir={dp}"), dp)
    drop = tmp_path / "runs" / "drop"
    train(smoke_cfg(*common, "train.loss_drop.quantile=0.2", "train.loss_drop.warmup=0",
                    "train.loss_drop.min_count=2", "train.loss_drop.bins=1", f"run_dir={drop}"), drop)
    rows = {r["run"]: r for r in compare([tmp_path / "runs"])["rows"]}
    assert rows["dp"]["defense"] == ("mask p=0.9 + dedup exact + DP-SGD ε≤10 (δ=1e-05, C=1)"
                                     " + augment (brightness 0.2, pixel noise 0.1, crop 0.25)")
    assert 9.9 <= rows["dp"]["epsilon"] <= 10 and rows["drop"]["epsilon"] is None
    assert rows["drop"]["defense"] == "mask p=0.9 + loss-drop q=0.2 + augment (brightness 0.2, pixel noise 0.1, crop 0.25)"
    md = next((tmp_path / "runs").glob("comparison.md")).read_text()
    assert "ε spent" in md and "DP-SGD" in md
    summary = json.loads((drop / "summary.json").read_text())
    assert summary["loss_drop"]["seen"] == 12 and summary["loss_drop"]["dropped"] > 0


def test_tradeoff_reads_memorization_against_the_null_per_training_set_size(tmp_path):
    # The picture's y is the excess over the null at the calibrated delta (with its CI) as a fraction of
    # the training images, not the raw extracted fraction; one panel per training-set size.
    root = tmp_path / "sweep"
    for name, train, extracted, null, ci, fid in [("small-none", 100, 60, 4, [46, 66], 36.0),
                                                  ("small-mask", 100, 3, 4, [-4, 2], 150.0),
                                                  ("large-none", 1000, 30, 10, [8, 32], 20.0)]:
        run = _run(root, name, {"kind": "none"}, summary={"steps": 50, "train_seconds": 1.0, "final_loss": 0.2})
        report = _report(fid=fid, extracted=extracted)
        report["counts"]["train_images"] = train
        report["calibration"] = {"extracted_at_calibrated_delta": extracted, "null_extracted_at_calibrated_delta": null,
                                 "excess_at_calibrated_delta": extracted - null, "excess_at_calibrated_delta_ci": ci}
        _write(run / "eval" / "report.json", report)
    old = _run(root, "old-report", {"kind": "none"}, summary={"steps": 50, "train_seconds": 1.0, "final_loss": 0.2})
    _write(old / "eval" / "report.json", _report(fid=50.0, extracted=12))  # no null: the plain fraction, marked
    result = compare([root])
    panels = tradeoff_points(result["rows"])
    assert list(panels) == [64, 100, 1000]
    by_run = {p["run"]: p for ps in panels.values() for p in ps}
    assert by_run["small-none"]["y"] == pytest.approx(0.56) and by_run["small-none"]["ci"] == pytest.approx((0.46, 0.66))
    assert by_run["small-mask"]["y"] == pytest.approx(-0.01) and by_run["small-mask"]["ci"][0] < 0 < by_run["small-mask"]["ci"][1]
    assert by_run["large-none"]["y"] == pytest.approx(0.02) and by_run["large-none"]["calibrated"]
    assert by_run["old-report"]["y"] == pytest.approx(0.12) and not by_run["old-report"]["calibrated"]
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
