"""evaluate.py: planted-truth audits of image folders, and attacks on runs made by train.py."""
import json

import pytest
import torch
from PIL import Image

from ambient.config import ConfigError, validate_evaluate
from ambient.data import load_digits
from ambient.training import train
from tests.helpers import compose, run_script


def _save(path, unit_image):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (unit_image.clamp(0, 1) * 255).round().to(torch.uint8)[0].numpy()
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 training digits; generations: 3 of them copied 12x each (noise, sub-pixel shifts) + novel digits."""
    root = tmp_path_factory.mktemp("planted")
    from ambient.attack.distances import normalized_l2

    digits = load_digits(16)
    x = (digits.as_float() + 1) / 2
    # digits holds near-duplicates of its own: pick 80 images pairwise farther apart than 0.2
    d = normalized_l2(x, x)
    rows = []
    for i in range(len(x)):
        if all(d[i, j] > 0.2 for j in rows):
            rows.append(i)
        if len(rows) == 80:
            break
    train_rows, novel_rows = rows[:40], rows[40:]
    for i in train_rows:
        _save(root / "train" / f"{i:04d}.png", x[i])
    gen = torch.Generator().manual_seed(0)
    copied = [train_rows[4], train_rows[17], train_rows[30]]
    for k, row in enumerate(copied):
        prompt = "prompt_a" if k < 2 else "prompt_b"
        for j in range(12):
            img = x[row] + 0.02 * torch.randn(x[row].shape, generator=gen)
            if j % 4 == 3:
                img = torch.roll(img, shifts=1, dims=-1) * 0.2 + img * 0.8  # a slight sub-pixel shift, still a copy
            _save(root / "samples" / prompt / f"{k}_{j:02d}.png", img)
    for j, row in enumerate(novel_rows):
        _save(root / "samples" / ("prompt_a" if j % 2 else "prompt_b") / f"novel_{j:02d}.png", x[row])
    return root, copied, x[novel_rows], x[train_rows]


@pytest.mark.slow
def test_folder_audit_finds_exactly_the_planted_copies(planted, tmp_path):
    root, copied, novel, train_x = planted
    out = tmp_path / "eval"
    run_script("evaluate.py", f"samples={root / 'samples'}", f"train_data={root / 'train'}", "channels=1",
               f"out_dir={out}")
    report = json.loads((out / "report.json").read_text())
    extracted = sorted(e["path"] for e in report["extraction"]["images"])
    assert extracted == [f"{i:04d}.png" for i in copied]
    assert all(e["training_copies"] == 1 and e["generations_within_delta"] == 12
               for e in report["extraction"]["images"])
    assert report["extraction"]["generations_within_delta"] == 36
    groups = report["cliques"]["groups"]
    assert len(groups) == 3 and all(g["size"] == 12 and g["true_extraction"] for g in groups)
    assert report["cliques"]["precision"] == 1.0
    assert {g["prompt"] for g in groups} == {"prompt_a", "prompt_b"}
    total = 36 + len(novel)
    assert len(novel) >= 30 and report["counts"] == {"generations": total, "prompts": 2, "train_images": 40}
    assert report["memorization"]["gu_fraction"] == pytest.approx(36 / total)
    assert (out / "extracted.png").is_file() and "Extracted training images" in (out / "report.md").read_text()
    assert report["quality"]["features"] == "efficientnet_lite0_224px"  # the default, end to end
    # a second audit into the same folder writes beside the first, never over it
    run_script("evaluate.py", f"samples={root / 'samples'}", f"train_data={root / 'train'}", "channels=1",
               f"out_dir={out}", "attack.features=random_projection")
    assert (out / "report-1.json").is_file() and (out / "extracted-1.png").is_file()
    assert json.loads((out / "report.json").read_text()) == report


def test_invalid_evaluate_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="run_dir"):
        validate_evaluate(compose("evaluate", [f"run_dir={tmp_path}", f"samples={tmp_path}"]))
    with pytest.raises(ConfigError, match="run_dir"):
        validate_evaluate(compose("evaluate", [f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="attack.delta"):
        validate_evaluate(compose("evaluate", [f"samples={tmp_path}", f"train_data={tmp_path}", "attack.delta=2"]))
    folder = [f"samples={tmp_path}", f"train_data={tmp_path}"]
    for bad, key in (("mia.attacks=[loss,lira]", "mia.attacks"), ("mia.secmi.t_sec=95", "mia.secmi.t_sec"),
                     ("mia.multi_t.timesteps=[]", "mia.multi_t.timesteps"), ("mia.pia.timestep=0", "mia.pia.timestep")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_evaluate(compose("evaluate", folder + [bad]))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = compose("train", ["experiment=smoke", "corruption=mask60", "dataset.limit=40", "dataset.holdout=10",
                            "train.steps=10", "train.checkpoint_every=0", "sample.count=0"])
    train(cfg, run)
    return run


def test_generation_is_resumable_and_mia_uses_the_recorded_holdout(small_run, tmp_path):
    from ambient.evaluation import evaluate_run

    def cfg(n, out):
        return compose("evaluate", [f"run_dir={small_run}", f"out_dir={out}", f"attack.samples_per_prompt={n}",
                                    "attack.batch_size=4", "attack.num_steps=4", "mia.draws=2"])

    first = tmp_path / "a"
    evaluate_run(small_run, cfg(6, first), first)
    before = {p.name: p.read_bytes() for p in (first / "samples" / "unconditional").glob("*.png")}
    report = json.loads(evaluate_run(small_run, cfg(10, first), first).read_text())
    after = {p.name: p.read_bytes() for p in (first / "samples" / "unconditional").glob("*.png")}
    assert len(before) == 6 and len(after) == 10 and all(after[k] == v for k, v in before.items())
    fresh = tmp_path / "b"
    evaluate_run(small_run, cfg(10, fresh), fresh)
    assert all((fresh / "samples" / "unconditional" / k).read_bytes() == v for k, v in after.items())
    split = json.loads((small_run / "split.json").read_text())
    assert report["mia"]["members"] == len(split["members"]) == 30 and report["mia"]["non_members"] == 10
    assert 0 <= report["mia"]["auc"] <= 1 and report["counts"]["train_images"] == 30
    recon = report["reconstruction"]  # on by default: the inpainting attack, members vs held-out
    assert recon["members"] == 30 and recon["non_members"] == 10 and 0 <= recon["auc"] <= 1
    assert (first / recon["picture"]).is_file() and "Reconstruction:" in (first / "report.md").read_text()
    assert "Beyond copying: membership inference" in report["verdict"]["text"]
    # The stronger membership attacks, on by default (a mask60 model: its own sampling mask per image).
    for section in ("secmi", "pia"):
        assert report[section]["members"] == 30 and report[section]["non_members"] == 10
        assert 0 <= report[section]["auc"] <= 1 and report[section]["mask_draws"] == 1
    multi = report["mia_multi_t"]  # t chosen on half of each set, figures on the other half
    assert multi["members"] == multi["t_selection_members"] == 15 and multi["non_members"] == 5
    assert multi["chosen_timestep"] in (25, 50, 100, 200, 400) and set(multi["t_selection_auc"]) == {
        "25", "50", "100", "200", "400"}
    from ambient.attack import schema

    assert not [(s, k) for s, k, _ in schema.figures(report) if schema.field_for(s, k) is None]
    assert "secmi/auc" in schema.flatten(report) and "mia_multi_t/chosen_timestep" in schema.flatten(report)
    md = (first / "report.md").read_text()
    assert "SecMI (t-error) AUC" in md and "PIA (proximal initialization) AUC" in md and "PIA" in report["verdict"]["text"]


@pytest.mark.slow
def test_train_then_evaluate_in_one_sweep_job(tmp_path):
    """evaluate.after_train: the report lands in <run_dir>/eval even when the sweep's run directory
    name holds '=' and ',' (it is passed on as a Hydra override); a bad evaluate override fails
    before any training."""
    fast = ["experiment=smoke", "corruption=mask60", "dataset.limit=24", "train.steps=6", "train.checkpoint_every=0",
            "sample.count=0", f"output_root={tmp_path}", "evaluate.after_train=true"]
    bad = run_script("train.py", *fast, "run_dir=" + str(tmp_path / "bad"),
                     "evaluate.overrides=['attack.delta=2','attack.features=random_projection']", check=False)
    assert bad.returncode != 0 and "attack.delta=2" in bad.stderr and not (tmp_path / "bad" / "model").exists()

    run_script("train.py", "-m", *fast, "dataset.holdout=4", "evaluate.overrides=['attack.samples_per_prompt=6',"
               "'attack.batch_size=6','attack.num_steps=3','attack.min_clique=2','mia.draws=1',"
               "'attack.features=random_projection']")
    (run_dir,) = [p.parent for p in (tmp_path / "multirun").rglob("summary.json")]
    assert "=" in run_dir.name and "," in run_dir.name
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["source"]["run_dir"] == str(run_dir)
    seconds = report["source"]["seconds"]  # wall time per phase, and in all
    assert {"generation", "extraction", "membership", "reconstruction", "quality", "total"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values()) and seconds["total"] + 0.3 >= sum(v for k, v in seconds.items() if k != "total")  # 0.1 s rounding each
    assert report["counts"]["generations"] == 6 and report["mia"]["non_members"] == 4
    assert (run_dir / "eval" / report["picture"]).is_file()
