"""Canaries (dataset.duplicate kind=canary): deterministic planting that never touches the real images'
indices or split, and exposure ranks that are right on a planted case."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ambient.attack.exposure import canary_figures, exposure, reference_exposure
from ambient.canaries import canary_patterns, canary_plan, reference_ids
from ambient.config import ConfigError, validate_dataset
from ambient.data import load_dataset, split_holdout
from tests.helpers import compose, train_and_evaluate

CANARY = {"kind": "canary", "count": 3, "times": [1, 4], "seed": 7, "references": 20}


def _digits(duplicate=None, limit=60):
    return load_dataset(OmegaConf.create({"kind": "digits", "resolution": 16, "channels": 1, "limit": limit,
                                          "duplicate": duplicate}))


def test_planting_is_deterministic_and_never_overlaps_the_real_images():
    real, planted = _digits(), _digits(CANARY)
    again, other_seed = _digits(CANARY), _digits(dict(CANARY, seed=8))
    assert torch.equal(planted.images, again.images) and torch.equal(planted.indices, again.indices)
    assert not torch.equal(planted.images[60:], other_seed.images[60:])
    # the real images keep their rows, indices and labels; canaries come after, with new indices
    assert torch.equal(planted.images[:60], real.images) and torch.equal(planted.indices[:60], real.indices)
    assert len(planted) == 60 + 3 * 1 + 3 * 4 and planted.indices[60:].min() > real.indices.max()
    assert len(set(planted.indices.tolist())) == len(planted)
    assert planted.canary[:60].eq(-1).all() and sorted(set(planted.canary[60:].tolist())) == list(range(6))
    times = {c: (planted.canary == c).sum().item() for c in range(6)}
    assert times == {c: m for c, m in canary_plan(CANARY)} == {0: 1, 1: 1, 2: 1, 3: 4, 4: 4, 5: 4}
    for c in range(6):  # every copy is the same pattern and remembers the first copy's index
        rows = (planted.canary == c).nonzero().flatten()
        assert all(torch.equal(planted.images[r], planted.images[rows[0]]) for r in rows)
        assert planted.source_index[rows].eq(planted.indices[rows[0]]).all()
    # a canary's pattern depends only on (seed, id); references are other ids, never planted
    assert torch.equal(canary_patterns([4], 7, 1, 16)[0], canary_patterns([2, 4], 7, 1, 16)[1])
    assert reference_ids(CANARY) == list(range(6, 26))
    refs = canary_patterns(reference_ids(CANARY), 7, 1, 16)
    assert not any(torch.equal(r, p) for r in refs for p in planted.images[60:])
    # unlike the data: every canary is farther from every real digit than real digits are from each other
    from ambient.attack.distances import normalized_l2

    x = planted.images.float() / 255
    real_gaps = normalized_l2(x[:60], x[:60]).fill_diagonal_(9).min(1).values
    assert normalized_l2(x[60:], x[:60]).min() > 2 * real_gaps.max()


def test_canaries_are_always_members_and_the_real_split_does_not_move():
    members, holdout = split_holdout(_digits(CANARY), 20, seed=3)
    real_members, real_holdout = split_holdout(_digits(), 20, seed=3)
    assert torch.equal(holdout.indices, real_holdout.indices) and holdout.canary.eq(-1).all()
    assert torch.equal(members.indices[members.canary < 0], real_members.indices)
    assert (members.canary >= 0).sum() == 15


def test_bad_canary_settings_name_the_key():
    for bad, key in (({"kind": "canary_x", "count": 1, "times": 2}, "dataset.duplicate.kind"),
                     ({"kind": "canary", "count": 1, "times": [0, 2]}, "dataset.duplicate.times"),
                     ({"count": 1, "times": 2, "references": 3}, "dataset.duplicate.references")):
        cfg = compose("train", ["dataset=digits"])
        cfg.dataset.duplicate = bad
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_dataset(cfg)


def test_exposure_ranks_by_hand():
    ranks, bits = exposure([0.5, 2.0, 2.5, 10.0], [1.0, 2.0, 3.0])
    assert ranks.tolist() == [1, 3, 3, 4]  # a tie counts against the canary
    assert bits.tolist() == pytest.approx([2.0, 2 - math.log2(3), 2 - math.log2(3), 0.0])
    assert reference_exposure([3.0, 1.0, 2.0]).tolist() == pytest.approx([math.log2(3) - math.log2(3), math.log2(3),
                                                                          math.log2(3) - 1])


class Memorizer(torch.nn.Module):
    """The exact denoiser of the empirical distribution of `train` (it memorized them)."""

    def __init__(self, train):
        super().__init__()
        self.register_buffer("points", train.flatten(1))
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):  # what DiffusionPipeline.device reads from its modules
        return self.dummy.device

    def forward(self, x, sigma, mask=None, cond=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1)
        w = torch.softmax(-torch.cdist(x.flatten(1), self.points) ** 2 / (2 * sigma ** 2), dim=1)
        return (w @ self.points).reshape(x.shape)


def test_a_model_that_memorized_its_canaries_exposes_them_fully(tmp_path):
    from ambient.evaluation import _canaries
    from ambient.pipeline import AmbientPipeline

    class Analytic(AmbientPipeline):
        def _denoiser(self, hidden_readout):
            return self.unet

    data = _digits(CANARY)
    members, _ = split_holdout(data, 20, seed=3)
    settings = {"objective": "edm", "mask_channel": False, "channels": 1, "resolution": 16, "num_classes": 0,
                "corruption": {"kind": "none"}, "delta": 0.0, "sigma_data": 0.5,
                "sampler": {"kind": "edm_heun", "num_steps": 6, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
                "dataset": {"kind": "digits", "resolution": 16, "channels": 1, "limit": 60, "duplicate": CANARY}}
    model = Analytic(Memorizer(members.as_float()), ambient=settings)
    cfg = compose("evaluate", ["run_dir=x", "mia.draws=1", "attack.inpaint.samples=4", "attack.inpaint.num_steps=18"])
    # generations: exact copies of the canaries planted 4 times, and unrelated noise
    copied = members.select((members.canary >= 3).nonzero().flatten()).images.float() / 255
    generations = {"unconditional": torch.cat([copied, torch.rand(10, 1, 16, 16)])}
    out = _canaries(model, members, cfg, generations, delta=0.05)
    assert out["planted"] == 6 and out["references"] == 20 and out["max_exposure"] == pytest.approx(math.log2(21))
    # every planted canary has a lower loss than every reference: rank 1, the largest exposure
    assert [c["rank"] for c in out["per_canary"]] == [1] * 6
    assert out["exposure_m1"] == out["exposure_m4"] == pytest.approx(math.log2(21))
    assert out["reference_exposure"] < 3  # the references rank among each other at random (null ≈ 1.4 bits)
    assert out["extracted_m4"] == 1.0 and out["extracted_m1"] == 0.0 and out["reference_extracted"] == 0.0
    assert out["reconstruction_m1"] < 0.01 and out["reference_reconstruction"] > 0.1
    assert [c["index"] for c in out["per_canary"]] == [int(members.indices[members.canary == c][0]) for c in range(6)]


def test_figures_by_times_planted():
    out = canary_figures([1, 1, 4, 4], [5.0, 0.1, 0.2, 0.3], np.arange(1.0, 8.0), [0.5, 0.5, 0.01, 0.5],
                         [0.5] * 7, delta=0.1)
    assert out["rank1_m1"] == 0.5 and out["rank1_m4"] == 1.0 and out["extracted_m4"] == 0.5
    assert out["exposure_m4"] == pytest.approx(3.0) and out["reference_extracted"] == 0.0


@pytest.mark.slow
def test_a_trained_run_reports_its_canaries(tmp_path):
    import json

    run, out, report = train_and_evaluate(tmp_path, ["dataset.duplicate={kind: canary, count: 2, times: [1, 3], references: 8}"],
                                          ["mia.attacks=[loss]"])
    split = json.loads((run / "split.json").read_text())
    assert len(split["members"]) == 30 + 2 * 1 + 2 * 3 and len(split["holdout"]) == 10
    canaries = report["canaries"]
    assert canaries["planted"] == 4 and canaries["references"] == 8 and {"exposure_m1", "exposure_m3"} <= set(canaries)
    assert report["mia"]["members"] == 30  # the membership figures are about the real images only
    assert "canaries planted 3×: mean exposure" in (out / "report.md").read_text()
    assert (out / canaries["picture"]).is_file() and "Canaries: `canaries.png`" in (out / "report.md").read_text()
    assert "canaries planted 1× reach an exposure of" in report["verdict"]["text"]


def test_exact_dedup_collapses_each_canary_to_one_copy_and_it_stays_a_member():
    from ambient.defenses.dedup import deduplicate

    kept, _ = deduplicate(_digits(CANARY), {"method": "exact"})
    ids = kept.canary[kept.canary >= 0].tolist()
    assert sorted(ids) == list(range(6))  # one copy of each, whatever m was
    members, holdout = split_holdout(kept, 10, seed=0)
    assert sorted(members.canary[members.canary >= 0].tolist()) == list(range(6)) and holdout.canary.eq(-1).all()
