"""Memorization read against a null reference: real images the model never saw go through the same
attack. A copier copies beyond it; a perfect and a blurry non-copier sit at it."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ambient.attack.report import markdown
from ambient.attack.run import TrainingImages, calibrated_delta, run_attack
from ambient.attack.stats import auc_lower_is_member, mia_intervals
from ambient.data import load_digits
from tests.helpers import compose


@pytest.fixture(scope="module")
def digits():
    """30 training digits; disjoint pools of unseen digits for the null and for a non-copier."""
    x = (load_digits(16).as_float() + 1) / 2
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:30]], x[order[30:330]], x[order[330:630]]


def _attack(generations, train, reference, **overrides):
    cfg = compose("evaluate", ["run_dir=x", *[f"attack.{k}={v}" for k, v in overrides.items()]]).attack
    report, _ = run_attack({"all": generations}, TrainingImages(train, list(range(len(train)))), cfg,
                           reference={"all": reference}, reference_source="test")
    return report


def test_a_copier_copies_beyond_the_null_and_non_copiers_sit_at_it(digits):
    train, reference, unseen = digits
    gen = torch.Generator().manual_seed(1)
    copier = (train.repeat(10, 1, 1, 1) + 0.01 * torch.randn(300, 1, 16, 16, generator=gen)).clamp(0, 1)
    blurry = F.avg_pool2d(F.pad(unseen, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    reports = {name: _attack(images, train, reference)
               for name, images in (("copier", copier), ("perfect", unseen), ("blurry", blurry))}
    assert reports["copier"]["verdict"]["copies"]
    assert not reports["perfect"]["verdict"]["copies"] and not reports["blurry"]["verdict"]["copies"]
    for name in ("perfect", "blurry"):
        calibration = reports[name]["calibration"]
        assert calibration["excess_at_calibrated_delta"] <= 2  # ≈ 0 of 30
        assert abs(reports[name]["excess"]["gu_fraction"]) < 0.05
    copier = reports["copier"]
    assert copier["calibration"]["extracted_at_calibrated_delta"] == 30
    assert copier["calibration"]["null_extracted_at_calibrated_delta"] == 0  # ≤ 0.1% of 30 by construction
    # the point: at the paper's δ a perfect non-copier already "extracts" most digits
    assert reports["perfect"]["calibration"]["extracted_at_paper_delta"] > 15
    md = markdown({**copier, "source": {}, "picture": "p.png", "picture_caption": ""})
    assert "copies training images beyond the null level" in md and "| measure | model | null | excess |" in md
    assert "at the null level" in markdown({**reports["perfect"], "source": {}, "picture": "p.png",
                                           "picture_caption": ""})
    assert "No null reference" not in md
    alone, _ = run_attack({"all": train.repeat(10, 1, 1, 1)}, TrainingImages(train, list(range(len(train)))),
                          compose("evaluate", ["run_dir=x"]).attack)  # a run trained without a held-out split
    md = markdown({**alone, "source": {}, "picture": "p.png", "picture_caption": ""})
    assert "No null reference" in md and "dataset.holdout" in md and "| measure | value |" in md


def test_copies_under_noise_are_found_after_the_low_pass_and_non_copiers_stay_at_the_null(digits):
    # A model trained on noisy data can return its training images with noise on top: the pixel l2
    # counts the noise as distance (nothing extracted at the calibrated delta), the low-passed Def. 1,
    # calibrated on the low-passed null, finds them; a non-copier stays at the null after the low-pass too.
    train, reference, unseen = digits
    g = torch.Generator().manual_seed(2)
    noisy_copier = (train.repeat(10, 1, 1, 1) + 0.12 * torch.randn(300, 1, 16, 16, generator=g)).clamp(0, 1)
    cfg = compose("evaluate", ["run_dir=x"]).attack
    runs = {name: run_attack({"all": images}, TrainingImages(train, list(range(len(train)))), cfg,
                             reference={"all": reference}, reference_source="test", lowpass=sigma)[0]
            for name, images, sigma in (("pixels", noisy_copier, 0.0), ("lowpass", noisy_copier, 1.0),
                                        ("perfect", unseen, 1.0))}
    assert runs["pixels"]["calibration"]["extracted_at_calibrated_delta"] == 0 and "lowpass" not in runs["pixels"]
    assert not runs["pixels"]["verdict"]["copies"]  # what the pixel report alone would say
    found = runs["lowpass"]["lowpass"]
    assert found["extracted"] >= 25 and found["null_extracted"] == 0 and found["excess_ci"][0] > 0
    assert runs["lowpass"]["verdict"]["copies"] and "copies under noise" in runs["lowpass"]["verdict"]["text"]
    assert runs["perfect"]["lowpass"]["excess"] <= 2 and not runs["perfect"]["verdict"]["copies"]
    md = markdown({**runs["lowpass"], "source": {}, "picture": "p.png", "picture_caption": ""})
    assert "After a low-pass (σ = 1 px" in md


def test_lowpass_is_on_for_noisy_runs_by_default_and_checked():
    from ambient.config import ConfigError, validate_attack
    from ambient.evaluation import lowpass_sigma

    assert lowpass_sigma("auto", {"corruption": {"kind": "noise", "sigma": 0.2}}) == 1.0
    assert lowpass_sigma("auto", {"corruption": {"kind": "mask", "p": 0.9}}) == 0.0
    assert lowpass_sigma("auto", None) == 0.0 and lowpass_sigma(2, None) == 2.0
    with pytest.raises(ConfigError, match="attack.lowpass"):
        validate_attack(compose("evaluate", ["run_dir=x", "attack.lowpass=-1"]))
    validate_attack(compose("evaluate", ["run_dir=x", "attack.lowpass=1.5"]))


def test_quality_is_measured_against_held_out_images_and_the_training_set(digits):
    train, reference, unseen = digits
    copier = train.repeat(10, 1, 1, 1)
    q_copy, q_real = _attack(copier, train, reference)["quality"], _attack(unseen, train, reference)["quality"]
    assert q_copy["fid_train"] < q_real["fid_train"]  # against the training set, copying wins ...
    assert q_real["fid"] < q_copy["fid"]  # ... against held-out images, real unseen images do
    assert "biased upward" in q_real["note"]


def test_delta_auto_uses_the_calibrated_delta(digits):
    train, reference, unseen = digits
    report = _attack(unseen, train, reference, delta="auto")
    assert report["extraction"]["delta"] == report["calibration"]["delta"] < 0.15
    assert report["calibration"]["null_extracted_at_calibrated_delta"] == 0  # ≤ 0.1% of 30 training images
    assert report["null"]["extraction"]["extracted"] == 0
    d = torch.tensor(report["distances"]["train_to_reference"])  # rounded to 5 decimals for the picture
    assert report["calibration"]["delta"] == pytest.approx(float(d.min()), abs=1e-5)
    assert calibrated_delta(torch.tensor([0.3, 0.1, 0.2])) == pytest.approx(0.1) and \
        calibrated_delta(torch.tensor([0.3, 0.1, 0.2])) < 0.1


def test_definition_1_counts_every_training_image_some_generation_reaches():
    """A near-duplicate pair in training and one generation copying it: Def. 1 extracts both images;
    counting only each generation's nearest training image extracts one."""
    torch.manual_seed(0)
    a = torch.rand(1, 1, 16, 16)
    train = torch.cat([a, (a + 0.02).clamp(0, 1), torch.rand(8, 1, 16, 16)])
    generations = torch.cat([a.clone(), torch.rand(5, 1, 16, 16)])
    report = _attack(generations, train, torch.rand(6, 1, 16, 16))
    assert report["extraction"]["extracted"] == 2 and report["extraction"]["extracted_nearest"] == 1


def test_bootstrap_auc_interval_covers_the_true_auc():
    from scipy.stats import norm

    shift, covered = 0.8, 0
    true_auc = norm.cdf(shift / np.sqrt(2))
    for trial in range(100):
        rng = np.random.default_rng(trial)
        members, nonmembers = rng.normal(-shift, 1, 60), rng.normal(0, 1, 60)
        low, high = mia_intervals(members, nonmembers, seed=trial, replicates=400)["auc"]
        covered += low <= true_auc <= high
    assert covered >= 90
    from sklearn.metrics import roc_auc_score

    m, n = np.array([0.1, 0.5, 0.5, 0.9]), np.array([0.5, 1.0, 0.2])
    expected = roc_auc_score(np.r_[np.ones(4), np.zeros(3)], -np.r_[m, n])
    assert auc_lower_is_member(m, n) == pytest.approx(expected)  # ties count one half, as sklearn


def test_the_within_class_auc_ignores_how_the_split_shares_the_classes():
    """Scores set by class difficulty alone (class 1 easy: low loss), members mostly of class 1: the
    pooled AUC calls them members, the within-class AUC sits at 0.5; a membership shift inside each
    class is found by both, and the within-class AUC is the pair-weighted mean of the per-class AUCs."""
    from ambient.attack.stats import stratified_auc

    rng = np.random.default_rng(0)
    cm, ch = np.r_[np.ones(150, int), np.zeros(50, int)], np.r_[np.ones(150, int), np.zeros(450, int)]
    difficulty = lambda c: np.where(c == 1, -2.0, 0.0) + rng.normal(0, 1, len(c))  # noqa: E731
    m, h = difficulty(cm), difficulty(ch)
    auc, (low, high), strata = stratified_auc(m, h, cm, ch)
    assert auc_lower_is_member(m, h) > 0.7 and low < 0.5 < high and abs(auc - 0.5) < 0.06 and strata == 2
    members = m - 1.0  # a real membership effect in every class
    shifted, (low, _), _ = stratified_auc(members, h, cm, ch)
    per_class = [auc_lower_is_member(members[cm == c], h[ch == c]) for c in (0, 1)]
    assert shifted == pytest.approx((per_class[0] * 50 * 450 + per_class[1] * 150 * 150) / (50 * 450 + 150 * 150))
    assert low > 0.65
    assert stratified_auc(m, h, cm, np.full(len(h), 7)) is None  # no class with both members and non-members


def test_blockwise_bootstrap_means_equal_one_draw():
    # The Gu-fraction CI resamples every generation: drawn in row blocks (bounded memory at millions of
    # generations), it must give the very numbers of one (replicates, n) draw, for odd and even n.
    from ambient.attack.stats import _resampled_means, mean_difference

    for n in (1, 7, 333, 5000):
        values = np.random.default_rng(n).random(n)
        want = values[np.random.default_rng(0).integers(0, n, (1000, n))].mean(-1)
        got = _resampled_means(values, 1000, np.random.default_rng(0), budget=4096)
        assert np.array_equal(got, want), n
    a, b = np.random.default_rng(1).random(5001), np.random.default_rng(2).random(777)
    rng = np.random.default_rng(0)
    one = (a[rng.integers(0, a.size, (1000, a.size))].mean(-1) - b[rng.integers(0, b.size, (1000, b.size))].mean(-1))
    tail = 2.5
    assert mean_difference(a, b) == tuple(float(v) for v in np.percentile(one, [tail, 100 - tail]))


def test_tpr_at_an_fpr_below_the_resolution_is_not_a_number():
    from ambient.membership_eval import membership_figures

    cfg = compose("evaluate", ["run_dir=x"]).mia
    rng = np.random.default_rng(0)
    few = membership_figures(rng.normal(-1, 1, 30), rng.normal(0, 1, 10), cfg)
    assert few["tpr_at_1%_fpr"] is None and "need ≥ 100 non-members" in few["tpr_at_1%_fpr_note"]
    assert few["auc_ci_low"] < few["auc"] < few["auc_ci_high"] and "non-members (< 200)" in few["note"]
    many = membership_figures(rng.normal(-1, 1, 300), rng.normal(0, 1, 400), cfg)
    assert many["tpr_at_1%_fpr"] is not None and many["tpr_at_0.1%_fpr"] is None
    split = compose("evaluate", ["run_dir=x", "mia.calibration=split"]).mia
    calibrated = membership_figures(rng.normal(-1, 1, 300), rng.normal(0, 1, 2000), split)
    assert calibrated["calibration_non_members"] == 1000
    assert calibrated["calibrated_fpr_at_1%_fpr"] < 0.03  # the threshold, set on other non-members, holds


def test_the_adaptive_score_reports_the_n_it_used(digits):
    """30 training images and attack.adaptive_n=50: the score can use only 30 neighbours, and
    report.md must say n=30, not the 50 asked for."""
    train, reference, _ = digits
    report = _attack(train.repeat(2, 1, 1, 1), train, reference, adaptive_n=50)
    assert report["extraction"]["adaptive_n"] == 30
    md = markdown({**report, "thresholds": {"adaptive_alpha": 0.5, "adaptive_n": 50}, "source": {},
                   "picture": "p.png", "picture_caption": ""})  # thresholds as write_report records them
    assert "n=30)" in md and "n=50)" not in md


def test_compare_calls_the_extracted_fraction_a_fraction_of_training_images(tmp_path):
    import json

    from ambient.compare import compare

    run = tmp_path / "runs" / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("corruption:\n  kind: none\n")
    (run / "summary.json").write_text(json.dumps({"steps": 1, "members": 30}))
    (run / "eval" / "report.json").write_text(json.dumps({"extraction": {"extracted": 3, "train_size": 30}}))
    result = compare([tmp_path / "runs"], out=tmp_path / "cmp")
    md = Path(result["md"]).read_text()
    assert "of the training images" in md and "of generations" not in md


def test_the_null_never_extracts_more_than_the_calibration_allows():
    """The calibrated δ is read off the very distances the null's Def. 1 count uses, so the null
    extracts at most ⌊0.1%·N⌋ training images, whatever the set sizes and their rounding."""
    cfg = compose("evaluate", ["run_dir=x", "attack.min_clique=3"]).attack
    for seed, (n_train, n_ref) in enumerate([(30, 495), (1500, 200), (2100, 64), (999, 333)]):
        g = torch.Generator().manual_seed(seed)
        train = torch.rand(n_train, 1, 8, 8, generator=g)
        ref = {f"class_{c}": torch.rand(n_ref // 4, 1, 8, 8, generator=g) for c in range(4)}
        report, _ = run_attack({"all": torch.rand(40, 1, 8, 8, generator=g)},
                               TrainingImages(train, list(range(n_train))), cfg, reference=ref)
        allowed = int(0.001 * n_train)
        assert report["calibration"]["null_extracted_at_calibrated_delta"] <= allowed


def test_the_verdict_reads_membership_within_each_class_where_the_data_has_classes():
    from ambient.evaluation import _leakage

    pooled_only = {"mia": {"auc": 0.58, "auc_ci_low": 0.53, "auc_ci_high": 0.62}}
    assert "still separates" in _leakage(pooled_only)
    split_effect = {"mia": {**pooled_only["mia"], "stratified_auc": 0.52, "stratified_auc_ci_low": 0.47,
                            "stratified_auc_ci_high": 0.57}}
    text = _leakage(split_effect)
    assert "is at chance (within-class AUC 0.52, 95% CI [0.47, 0.57]; pooled 0.58)" in text
    below = {"secmi": {"auc": 0.46, "auc_ci_low": 0.43, "auc_ci_high": 0.49}}
    assert "the two sides of the split differ" in _leakage(below)
