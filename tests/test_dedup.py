"""Dedup defense on planted truth: a folder of distinct photos and digits, copies of some of them
(byte copies, re-saved PNGs, JPEG q75, saved 2x larger, shifted a pixel, lightly noised), and
distinct-but-similar images (two crops of one photo a quarter apart, two digits of one class)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ambient.attack.distances import tiled_l2
from ambient.config import ConfigError, validate
from ambient.data import (
    DataError,
    ImageSet,
    load_digits,
    load_imagefolder,
    plant_duplicates,
    split_holdout,
)
from ambient.defenses.dedup import (
    deduplicate,
    duplicate_map,
    find_duplicate_groups,
    write_report,
)
from ambient.defenses.neardup import RESAMPLE, pair_distances, preprocess
from ambient.rundir import ModelDir
from ambient.training import train
from tests.helpers import REPO, compose, train_and_evaluate

R = 32
PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "immunohistochemistry", "cell",
          "hubble_deep_field", "moon", "grass", "gravel", "text", "clock", "colorwheel"]
# photo -> planted copies; every other image in the folder is distinct from every other.
COPIES = {"astronaut": ["bytes", "resave", "jpeg", "resize", "shift", "noise"], "camera": ["jpeg"],
          "coffee": ["resize"], "chelsea": ["shift"], "rocket": ["noise"], "coins": ["bytes", "bytes2"],
          "cell": ["jpeg", "shift"], "digit0": ["bytes"], "digit7": ["noise"]}
EXACT_KINDS = {"bytes", "bytes2", "resave"}
NEAR = {"method": "near", "metric": "tiled", "threshold": 0.06, "max_shift": 1, "blur": 3, "lowpass": 0.0, "resample": 0.0,
        "resolution": 32,
        "block_size": 1024, "grouping": "kept"}


def _photo(name: str) -> np.ndarray:
    import skimage.data

    x = getattr(skimage.data, name)()
    return np.stack([x] * 3, -1) if x.ndim == 2 else x[..., :3]


def _crop(x: np.ndarray, dy: int, dx: int) -> Image.Image:
    """A centred half-size square of the photo, moved by (dy, dx) source pixels, at R px."""
    h, w = x.shape[:2]
    s = min(h, w) // 2
    top, left = (h - s) // 2 + dy, (w - s) // 2 + dx
    return Image.fromarray(np.ascontiguousarray(x[top:top + s, left:left + s])).resize((R, R), Image.LANCZOS)


def _copy(kind: str, img: Image.Image, src, shifted, dest, rng):
    if kind in ("bytes", "bytes2"):
        shutil.copy(src, dest.with_suffix(".png"))
    elif kind == "resave":  # other bytes, same pixels
        img.save(dest.with_suffix(".png"), compress_level=1)
    elif kind == "jpeg":
        img.save(dest.with_suffix(".jpg"), quality=75)
    elif kind == "resize":  # the dataset's resize brings it back to R
        img.resize((2 * R, 2 * R), Image.BICUBIC).save(dest.with_suffix(".png"))
    elif kind == "shift":
        shifted().save(dest.with_suffix(".png"))
    elif kind == "noise":
        a = np.asarray(img, dtype=np.float64) + rng.normal(0, 5, np.asarray(img).shape)
        Image.fromarray(a.clip(0, 255).round().astype(np.uint8)).save(dest.with_suffix(".png"))


def build_folder(root) -> list[set[str]]:
    """Write the planted folder; return the true duplicate groups as sets of relative paths."""
    rng, truth = np.random.default_rng(0), []
    digits = load_digits(8)
    first_two = {c: (digits.labels == c).nonzero().flatten()[:2].tolist() for c in range(10)}
    items = {}
    for name in PHOTOS:
        x = _photo(name)
        s = min(x.shape[:2]) // 2
        items[name] = (_crop(x, 0, 0), lambda x=x, s=s: _crop(x, 0, s // R))  # shift: one output pixel
        items[name + "_b"] = (_crop(x, 0, s // 4) if x.shape[1] - s >= s // 2 else _crop(x, s // 4, 0), None)
    for c, rows in first_two.items():
        for k, row in enumerate(rows):
            digit = Image.fromarray(digits.images[row, 0].numpy()).convert("RGB").resize((R, R), Image.BILINEAR)
            items[f"digit{c}" + ("_b" if k else "")] = (digit, None)
    for name, (img, shifted) in items.items():
        src = root / f"0_{name}.png"
        img.save(src)
        group = {src.name}
        for kind in COPIES.get(name, []):
            _copy(kind, img, src, shifted, root / f"1_{name}_{kind}", rng)
            group |= {p.name for p in root.glob(f"1_{name}_{kind}.*")}
        if len(group) > 1:
            truth.append(group)
    return truth


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    truth = build_folder(root)
    return root, truth, load_imagefolder(str(root), R)


def _path_groups(report) -> set[frozenset]:
    return {frozenset(g["paths"]) for g in report["groups"]}


def test_near_finds_every_planted_group_and_merges_nothing_distinct(planted):
    _, truth, data = planted
    kept, report = deduplicate(data, NEAR)
    assert _path_groups(report) == {frozenset(g) for g in truth}
    assert report["count_after"] == len(data) - sum(len(g) - 1 for g in truth) == len(kept)
    for g in report["groups"]:  # the original (smallest index) is kept; copies lie under the threshold
        assert g["kept"] == min(g["members"]) and g["paths"][g["members"].index(g["kept"])].startswith("0_")
        assert max(g["distance_to_kept"]) <= NEAR["threshold"]
    # The nearest distinct pair (crops a quarter apart, same-class digits) stays clear of the threshold.
    x = preprocess(kept.images, R, NEAR["blur"], NEAR["lowpass"])
    i, j = torch.triu_indices(len(kept), len(kept), 1)
    assert pair_distances(x, i, j, resample=0).min() > NEAR["threshold"] * 1.2


def test_exact_finds_only_identical_pixels(planted):
    _, truth, data = planted
    _, report = deduplicate(data, {"method": "exact"})
    expected = {frozenset(p for p in g if p.startswith("0_") or any(f"_{k}." in p for k in EXACT_KINDS))
                for g in truth}
    assert _path_groups(report) == {g for g in expected if len(g) > 1}
    assert all(d == 0 for g in report["groups"] for d in g["distance_to_kept"])


def test_representatives_do_not_depend_on_row_order(planted):
    _, _, data = planted
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    a, ra = deduplicate(data, NEAR)
    b, rb = deduplicate(data.select(perm), NEAR)
    assert sorted(a.indices.tolist()) == sorted(b.indices.tolist())
    assert duplicate_map(ra) == {k: sorted(v) for k, v in duplicate_map(rb).items()}


@pytest.mark.parametrize("max_shift,blur,metric", [(0, 1, "tiled"), (1, 3, "tiled"), (2, 3, "l2")])
def test_blocked_search_equals_brute_force(planted, max_shift, blur, metric):
    _, _, data = planted
    images = data.images[:60]
    for threshold in (0.03, 0.06, 0.12):
        x, n = preprocess(images, R, blur), len(images)
        if max_shift == 0 and metric == "tiled":  # the shared metric itself, all pairs at once
            dist = tiled_l2(x, x, tiles=4)
        else:
            i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            dist = pair_distances(x, i.flatten(), j.flatten(), {"tiled": 4, "l2": 1}[metric], max_shift).reshape(n, n)
        _, label = connected_components(coo_matrix((dist <= threshold).numpy()), directed=False)
        brute = {frozenset(np.flatnonzero(label == c).tolist()) for c in np.unique(label)} - {
            frozenset([r]) for r in range(n)}
        shared = max_shift == 0 and metric == "tiled"  # the shared metric has no blur search
        groups = find_duplicate_groups(images, "near", threshold, metric, block_size=7, max_shift=max_shift, blur=blur,
                                       grouping="connected", search="exact", resample=0.0 if shared else RESAMPLE)
        assert {frozenset(g.tolist()) for g in groups} == brute


def test_plant_duplicates_counts_and_source_mapping():
    data = load_digits(8).select(torch.arange(50))
    planted = plant_duplicates(data, {"count": 4, "times": 3, "seed": 1})
    assert len(planted) == 50 + 4 * 2 and planted.indices.tolist() == list(range(58))
    assert torch.equal(planted.images[:50], data.images) and planted.source_index[:50].tolist() == list(range(50))
    sources = planted.source_index[50:]
    assert sorted(set(sources.tolist())) == sorted(sources.unique().tolist()) and len(sources.unique()) == 4
    assert all((sources == s).sum() == 2 for s in sources.unique())  # each chosen image appears 3 times in all
    assert torch.equal(planted.images[50:], data.images[sources]) and torch.equal(planted.labels[50:], data.labels[sources])
    again = plant_duplicates(data, {"count": 4, "times": 3, "seed": 1})
    assert torch.equal(again.source_index, planted.source_index)
    _, report = deduplicate(planted, {"method": "exact"})
    assert {g["kept"]: sorted(g["members"]) for g in report["groups"]} == {
        s: sorted([s] + (50 + (sources == s).nonzero().flatten()).tolist()) for s in sources.unique().tolist()}
    assert report["planted_copies"] == {str(50 + k): int(s) for k, s in enumerate(sources.tolist())}
    with pytest.raises(DataError, match="dataset.duplicate.count"):
        plant_duplicates(data, {"count": 51, "times": 2})


def test_planted_copies_follow_their_original_across_the_holdout_split():
    """A held-out copy of a member would be 'extracted' by the null reference and score as a member in every
    membership attack: each copy goes where its original goes, and the originals split as without copies."""
    data = load_digits(8).select(torch.arange(60))
    planted = plant_duplicates(data, {"count": 20, "times": 4, "seed": 2})
    members, held = split_holdout(planted, 30, seed=5)
    plain_members, plain_held = split_holdout(data, 30, seed=5)
    assert len(held) + len(members) == len(planted)
    originals = set(plain_held.indices.tolist())
    assert {int(s) for s in held.source_index} == originals  # the same real images held out
    assert {int(s) for s in members.source_index} == set(plain_members.indices.tolist())
    assert not set(held.source_index.tolist()) & set(members.source_index.tolist())
    assert len(held) > 30 and len(members) > 30  # copies on both sides, with their originals


def test_duplicate_picks_do_not_follow_the_holdout_split_of_the_same_seed():
    """Both used to be randperm(n) from torch's generator seeded with the same number: with
    dataset.duplicate.seed == seed every picked image was held out, so no member had a copy."""
    data = load_digits(8).select(torch.arange(200))
    planted = plant_duplicates(data, {"count": 20, "times": 5, "seed": 0})
    members, held = split_holdout(planted, 150, seed=0)
    copied = set(planted.source_index[len(data):].tolist())
    member_originals = copied & set(members.indices.tolist())
    assert 1 <= len(member_originals) < 20 and copied - member_originals <= set(held.indices.tolist())
    assert (members.source_index != members.indices).sum() == 4 * len(member_originals)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="dedup.threshold"):
        validate(compose("train", ["dedup=near", "dedup.threshold=-1"]))
    with pytest.raises(ConfigError, match="dedup.resample"):
        validate(compose("train", ["dedup=near", "dedup.resample=-0.5"]))
    with pytest.raises(ConfigError, match="dedup.lowpass"):
        validate(compose("train", ["dedup=near", "dedup.lowpass=abc"]))
    with pytest.raises(ConfigError, match="dataset.duplicate.times"):
        validate(compose("train", ["dataset.duplicate={count: 3, times: 1}"]))


def test_reports_are_never_overwritten(planted, tmp_path):
    _, _, data = planted
    _, near = deduplicate(data, NEAR)
    _, exact = deduplicate(data, {"method": "exact"})
    first, picture = write_report(near, data, tmp_path)
    assert first.name == "dedup.json" and picture.name == "dedup.png" and picture.stat().st_size > 0
    assert write_report(near, data, tmp_path)[0] == first  # the same report again: kept as it is
    second, picture2 = write_report(exact, data, tmp_path)
    assert second.name == "dedup-1.json" and picture2.name == "dedup-1.png"
    assert json.loads(first.read_text())["method"] == "near" and json.loads(second.read_text())["method"] == "exact"


def test_train_dedups_planted_copies_before_the_split(tmp_path, smoke_cfg):
    cfg = smoke_cfg("dedup=exact", "dataset.duplicate={count: 5, times: 4, seed: 0}", "train.steps=2",
                    "train.checkpoint_every=0", "sample.count=0", "dataset.holdout=20")
    train(cfg, tmp_path)
    report = json.loads((tmp_path / "dedup.json").read_text())
    assert report["count_before"] == 215 and report["count_after"] == 200 and (tmp_path / "dedup.png").is_file()
    assert len(report["groups"]) == 5 and all(len(g["members"]) == 4 for g in report["groups"])
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["members"]) == 180 and sorted(split["members"] + split["holdout"]) == list(range(200))
    settings = ModelDir(tmp_path / "model").read_settings()
    assert settings["dedup"]["groups_file"] == "dedup.json" and settings["dedup"]["method"] == "exact"
    assert settings["dataset"]["duplicate"] == {"count": 5, "times": 4, "seed": 0}
    # The evaluator rebuilds exactly the deduplicated members and maps each kept image to its copies.
    from ambient.evaluation import rebuild_training_set

    members, holdout, copies = rebuild_training_set(tmp_path, settings)
    assert members.indices.tolist() == split["members"] and holdout.indices.tolist() == split["holdout"]
    assert copies == duplicate_map(report) and len(copies) == 5
    for kept, originals in copies.items():
        assert kept in originals and len(originals) == 4 and min(originals) == kept


@pytest.mark.slow
def test_cli_writes_a_report(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * k, np.uint8)).save(folder / f"{k}.png")
    shutil.copy(folder / "2.png", folder / "2_copy.png")
    proc = subprocess.run([sys.executable, "-m", "ambient.defenses.dedup", "dataset=imagefolder", f"dataset.path={folder}",
                           "dataset.resolution=8", "dedup=exact", f"hydra.run.dir={tmp_path / 'out'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report:  {tmp_path / 'out' / 'dedup.json'}" in proc.stdout and "5 images -> 4" in proc.stdout
    report = json.loads((tmp_path / "out" / "dedup.json").read_text())
    assert report["groups"][0]["paths"] == ["2.png", "2_copy.png"]


def test_near_search_with_candidates_but_no_duplicate_returns_no_group():
    # 40 distinct digits: the cheap bound admits candidate pairs, the exact distance rejects all of them.
    assert find_duplicate_groups(load_digits(16).images[:40], "near") == []


def _chain(base: torch.Tensor, step: int) -> torch.Tensor:
    """A, B = A + step, C = A + 2 step on one quarter of the image: A-B and B-C one step apart, A-C two."""
    x = base.clone().to(torch.int16)
    b, c = x.clone(), x.clone()
    b[..., :R // 2, :R // 2] += step
    c[..., :R // 2, :R // 2] += 2 * step
    return torch.stack([x, b, c]).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("grouping", ["kept", "pairwise"])
def test_a_planted_chain_is_not_merged(grouping):
    grey = torch.full((3, R, R), 100, dtype=torch.uint8) + torch.arange(R, dtype=torch.uint8)  # no clipping
    digits = load_digits(R).images[:20].expand(-1, 3, -1, -1)
    images = torch.cat([_chain(grey, 10), digits])
    x = preprocess(images[:3], R, NEAR["blur"], NEAR["lowpass"])
    d_ab, d_bc, d_ac = pair_distances(x, [0, 1, 0], [1, 2, 2], resample=0).tolist()
    assert d_ab <= 0.06 and d_bc <= 0.06 < d_ac  # the chain A-B-C, A-C over the threshold
    cfg = {**NEAR, "grouping": grouping}
    _, report = deduplicate(ImageSet(images, torch.arange(len(images))), cfg)
    chained = deduplicate(ImageSet(images, torch.arange(len(images))), {**cfg, "grouping": "connected"})[1]
    assert [sorted(g["members"]) for g in chained["groups"]] == [[0, 1, 2]]  # what chaining did
    assert [sorted(g["members"]) for g in report["groups"]] == [[0, 1]]  # A keeps B; C is left alone
    assert report["pairs_left_out"] == 1 and report["pairs_left_out_closest"][0]["indices"] == [1, 2]
    assert report["removed"] == 1 and chained["removed"] == 2


@pytest.mark.parametrize("grouping", ["kept", "pairwise"])
def test_groups_hold_their_rule_where_chains_abound(grouping):
    # 200 digits at a loose threshold: many pairs, long chains; every pair is in a group or left out.
    images = load_digits(16).images[:200]
    t = 0.2
    _, report = deduplicate(ImageSet(images, torch.arange(200)), {**NEAR, "threshold": t, "grouping": grouping})
    connected = deduplicate(ImageSet(images, torch.arange(200)), {**NEAR, "threshold": t, "grouping": "connected"})[1]
    assert connected["largest_group"] > 2 * report["largest_group"]  # the chains are there
    x = preprocess(images, R, NEAR["blur"], NEAR["lowpass"])
    inside = 0
    for g in report["groups"]:
        m = torch.tensor(g["members"])
        assert g["kept"] == min(g["members"]) and max(g["distance_to_kept"]) <= t
        i, j = torch.triu_indices(len(m), len(m), 1)
        d = pair_distances(x, m[i], m[j], resample=0)
        inside += int((d <= t).sum())
        if grouping == "pairwise":
            assert d.max() <= t
    assert inside + report["pairs_left_out"] == report["near_pairs"] == connected["near_pairs"]
    assert len({m for g in report["groups"] for m in g["members"]}) == sum(len(g["members"]) for g in report["groups"])


@pytest.fixture(scope="module")
def digits32():
    return load_digits(R).images[:800]


def test_calibration_separates_copies_from_distinct_neighbours(digits32, tmp_path):
    from ambient.defenses.calibrate import TRANSFORMS, calibrate, threshold_picture

    r = calibrate(digits32, sample=300, seed=1)
    t = r["threshold"]
    assert set(r["copy_distances"]) == set(TRANSFORMS) and len(r["nearest_distinct"]) == 300
    # Re-encoded, shifted, resized and noised copies all fall under it (crop: its recall is reported).
    for kind in ("jpeg", "shift", "resize", "noise"):
        assert r["expected_recall"][kind] >= 0.99 and np.quantile(r["copy_distances"][kind], 0.99) <= t
    # ... while at most the allowed share of sampled images (beyond the data's own duplicates) has a
    # distinct neighbour within it, and the report says how the number was chosen.
    flagged = np.mean(np.asarray(r["nearest_distinct"]) <= t)
    assert flagged == r["expected_flagged_fraction"] and flagged <= r["max_false_rate"] + r["duplicate_share"]
    assert r["distinct_quantile"] < min(v for v in r["nearest_distinct"] if v > t) + 1e-5 and "distinct neighbours" in r["rule"]
    assert (r["recall_short"] == [k for k, v in r["expected_recall"].items() if v < 0.99])
    # The candidate search found each sampled image's true nearest neighbour (all pairs, 40 of them).
    rows = np.sort(np.random.default_rng(1).permutation(800)[:300])[:40]
    x = preprocess(digits32)
    i, j = np.repeat(rows, 800), np.tile(np.arange(800), len(rows))
    d = pair_distances(x, i[i != j], j[i != j]).reshape(len(rows), 799).min(1).values.numpy()
    assert np.allclose(d, np.asarray(r["nearest_distinct"][:40]), atol=1e-5)
    threshold_picture(r, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_auto_threshold_finds_planted_copies_and_writes_its_picture(digits32, tmp_path):
    from ambient.defenses.calibrate import transform

    rng = np.random.default_rng(0)
    src = torch.tensor([3, 50, 400])
    copies = torch.cat([transform(digits32[src], kind, rng) for kind in ("jpeg", "noise", "shift")])
    images = torch.cat([digits32, copies])
    data = ImageSet(images, torch.arange(len(images)))
    _, report = deduplicate(data, {**NEAR, "threshold": "auto", "calibration": {"sample": 300}})
    assert report["threshold"] == report["calibration"]["threshold"] and report["settings"]["threshold"] == "auto"
    found = {frozenset(g["members"]) for g in report["groups"]}
    for k, s in enumerate(src.tolist()):
        assert any({s, 800 + k, 803 + k, 806 + k} <= g for g in found), (s, found)
    assert report["removed"] <= 9 + report["calibration"]["expected_flagged_fraction"] * 800 + 2
    path, _ = write_report(report, data, tmp_path)
    assert (tmp_path / "dedup_threshold.png").stat().st_size > 0 and json.loads(path.read_text())["calibration"]


@pytest.mark.parametrize("max_shift", [0, 1])
def test_index_search_equals_all_pairs_with_a_flat_index(digits32, max_shift):
    from ambient.defenses.calibrate import descriptors, transform
    from ambient.defenses.dedup import duplicate_pairs

    rng = np.random.default_rng(0)
    src = torch.arange(0, 800, 40)
    images = torch.cat([digits32] + [transform(digits32[src], k, rng) for k in ("jpeg", "shift", "noise")])
    t = 0.09
    settings = {"threshold": t, "max_shift": max_shift}
    _, brute, _ = duplicate_pairs(images, **settings, search="exact")
    k = 16
    if max_shift == 0:  # the descriptor distance bounds the distance: k covering it makes the index exact
        desc = descriptors(images)
        within = (torch.cdist(desc, desc) <= t).sum(1)
        k = int(within.max())
    _, flat, _ = duplicate_pairs(images, **settings, search="index", index="flat", neighbours=k)
    _, hnsw, _ = duplicate_pairs(images, **settings, search="index", index="hnsw", neighbours=k)
    as_set = lambda p: {(int(a), int(b)): round(float(c), 5) for a, b, c in zip(*p)}
    assert len(as_set(brute)) > 60  # planted copies and many similar digits
    assert as_set(flat) == as_set(brute) == as_set(hnsw)


def test_indexed_pair_distances_equal_gathered_ones(monkeypatch):
    # The index path's pruning measures millions of (row, row) feature distances without gathering
    # copies (faiss); without faiss it falls back to torch: both must give the gathered ||x[a] - y[b]||^2.
    import builtins

    from ambient.defenses.nnsearch import pair_sqdist

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 64, generator=g), torch.rand(200, 64, generator=g)
    a, b = torch.randint(0, 300, (5000,), generator=g), torch.randint(0, 200, (5000,), generator=g)
    want = (x[a] - y[b]).pow(2).sum(1)
    assert torch.allclose(pair_sqdist(x, a, y, b), want, rtol=1e-5, atol=1e-6)
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *args, **kw: (_ for _ in ()).throw(ImportError(name)) if name == "faiss"
                        else real_import(name, *args, **kw))
    assert torch.allclose(pair_sqdist(x, a, y, b), want, rtol=1e-5, atol=1e-6)
    assert pair_sqdist(x, a[:0], y, b[:0]).shape == (0,)


def test_resized_copies_are_found_at_the_calibrated_threshold(digits32):
    # Resampled copies (32 -> 24 -> 32) of real images, planted among the other 800 digits: the default
    # metric (low-pass + blur search) catches every one at the threshold calibrated on the set itself,
    # and the blur search is what brings them close (on Fashion-MNIST: benchmarks/dedup.py).
    from ambient.defenses.calibrate import transform

    src = torch.arange(5, 800, 80)
    copies = transform(digits32[src], "resize", np.random.default_rng(0))
    images = torch.cat([digits32, copies])
    _, report = deduplicate(ImageSet(images, torch.arange(len(images))),
                            {"kind": "near", "threshold": "auto", "calibration": {"sample": 300}})
    t = report["threshold"]
    assert report["calibration"]["expected_recall"]["resize"] >= 0.99
    found = {frozenset(g["members"]) for g in report["groups"]}
    for k, s in enumerate(src.tolist()):
        assert any({s, 800 + k} <= g for g in found), (s, 800 + k)
    x = preprocess(torch.cat([digits32[src], copies]))
    n = len(src)
    with_search = pair_distances(x, range(n), range(n, 2 * n))
    without = pair_distances(x, range(n), range(n, 2 * n), resample=0)
    assert (with_search <= t).all() and (with_search <= without).all() and with_search.mean() < 0.5 * without.mean()


def test_blur_search_bounds_stay_below_the_distances(digits32):
    # The pruning is exact only if every per-(shift, variant) bound is below that combination's distance.
    from ambient.defenses.calibrate import _bounds_to
    from ambient.defenses.neardup import Filter, combo_distances

    prep = Filter()
    q, k = 6, 5
    x = prep(digits32[:q])
    cand = torch.arange(q, q + q * k).reshape(q, k)
    bounds = _bounds_to(x, digits32[cand], 4, 1, prep)  # (q, k, 9 shifts x 3 variants)
    y = prep(digits32[cand.reshape(-1)])
    xs = x.repeat_interleave(k, 0)
    per_combo = []
    for c in range(bounds.shape[2]):
        only = torch.zeros(q * k, bounds.shape[2], dtype=torch.bool)
        only[:, c] = True
        d = combo_distances(xs, y, only, 4, 1, prep.resample)
        assert (bounds.reshape(q * k, -1)[:, c] <= d + 1e-6).all(), c
        per_combo.append(d)
    # Any admitted subset (sparse or dense, some rows with none): the minimum over exactly those combinations.
    per_combo = torch.stack(per_combo, 1)
    for density in (0.05, 0.3, 0.9):
        some = torch.rand(per_combo.shape, generator=torch.Generator().manual_seed(1)) < density
        want = torch.where(some, per_combo, torch.full_like(per_combo, float("inf"))).amin(1)
        got = combo_distances(xs, y, some, 4, 1, prep.resample)  # batch sizes differ: float rounding only
        assert torch.equal(got.isinf(), want.isinf()) and torch.allclose(got, want, rtol=1e-6, atol=0), density
    everything = combo_distances(xs, y, torch.ones_like(only), 4, 1, prep.resample)
    assert torch.allclose(everything, pair_distances(torch.cat([xs, y]), range(q * k), range(q * k, 2 * q * k)))


def test_gaussian_repeats_edges_and_settings_before_lowpass_keep_their_metric():
    import math

    import torch.nn.functional as F

    from ambient.defenses.dedup import _params
    from ambient.defenses.neardup import gaussian

    x = torch.rand(3, 2, 32, 20, dtype=torch.float64)
    r = math.ceil(3 * 1.3)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-t * t / (2 * 1.3 ** 2))
    w = w / w.sum()
    ref = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), w.view(1, 1, 1, -1).expand(2, 1, 1, -1), groups=2)
    ref = F.conv2d(ref, w.view(1, 1, -1, 1).expand(2, 1, -1, 1), groups=2)
    assert torch.allclose(gaussian(x.float(), 1.3).double(), ref, atol=1e-6)
    flat = torch.full((1, 1, 8, 8), 0.5)
    assert torch.allclose(gaussian(flat, 2.0), flat)  # edges repeated: a flat image stays flat
    old = _params({"kind": "near", "threshold": 0.06, "blur": 3, "max_shift": 1})
    assert old["lowpass"] == 0.0 and old["resample"] == 0.0 and old["blur"] == 3
    assert "lowpass" not in _params({"kind": "near", "threshold": "auto"})


# --- past one machine: shards and their merge (ambient/defenses/shards.py)

@pytest.fixture(scope="module")
def planted_digits(digits32):
    from ambient.defenses.calibrate import transform

    rng = np.random.default_rng(0)
    src = torch.arange(0, 800, 40)
    images = torch.cat([digits32[:400]] + [transform(digits32[src[src < 400]], k, rng) for k in ("jpeg", "shift")]
                       + [digits32[src[:3]]])  # three exact copies too
    return ImageSet(images, torch.arange(len(images)))


@pytest.mark.parametrize("search", ["exact", "index"])
def test_shards_partition_the_pairs_and_their_merge_equals_one_process(planted_digits, tmp_path, search):
    from ambient.defenses.dedup import duplicate_pairs, write_shard
    from ambient.defenses.shards import merge_shards

    cfg = {**NEAR, "threshold": 0.09, "search": search, "index": "flat", "block_size": 64}
    params = {k: v for k, v in cfg.items() if k not in ("method", "grouping")}
    exact, whole, _ = duplicate_pairs(planted_digits.images, **params)
    as_set = lambda p: {(int(a), int(b)): round(float(c), 6) for a, b, c in zip(*p)}
    parts = [as_set(duplicate_pairs(planted_digits.images, **params, shard=(k, 3))[1]) for k in range(3)]
    assert len(as_set(whole)) > 30 and all(parts)  # every shard has work
    assert sum(len(p) for p in parts) == len(as_set(whole))  # disjoint ...
    assert {k: v for p in parts for k, v in p.items()} == as_set(whole)  # ... and together the whole
    for k in range(3):
        write_shard(planted_digits.images, cfg, (k, 3), tmp_path)
    merged = merge_shards(planted_digits.images, cfg, tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(merged[0], exact))
    assert all(np.allclose(a, b) for a, b in zip(merged[1], whole))  # same pairs, same order
    _, one = deduplicate(planted_digits, cfg)
    _, from_shards = deduplicate(planted_digits, cfg, pairs=merged)
    assert from_shards == one and one["removed"] >= 3


def test_merge_refuses_missing_or_foreign_shards_and_a_finished_shard_is_kept(planted_digits, tmp_path):
    from ambient.defenses.dedup import write_shard
    from ambient.defenses.shards import merge_shards, parse_shard

    cfg = {**NEAR, "threshold": 0.09, "search": "exact"}
    images = planted_digits.images
    first = write_shard(images, cfg, (0, 2), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] of 2"):
        merge_shards(images, cfg, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert write_shard(images, cfg, (0, 2), tmp_path) == first and first.stat().st_mtime_ns == stamp  # resumed, not redone
    with pytest.raises(FileExistsError, match="other data or settings"):
        write_shard(images, {**cfg, "threshold": 0.05}, (0, 2), tmp_path)
    write_shard(images, cfg, (1, 2), tmp_path)
    with pytest.raises(ValueError, match="other fingerprint"):
        merge_shards(images.flip(0), cfg, tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        merge_shards(images, {**cfg, "max_shift": 0}, tmp_path)
    for bad in ("2/2", "a/b", "1", "-1/3"):
        with pytest.raises(ConfigError, match=r"shard=.*k/K"):
            parse_shard(bad)


def test_cli_shards_under_multirun_then_merges(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    shutil.copy(folder / "4.png", folder / "4_copy.png")
    common = ["-m", "ambient.defenses.dedup", "dataset=imagefolder", f"dataset.path={folder}", "dataset.resolution=16",
              "dedup=near", "dedup.threshold=0.05", "dedup.block_size=2", f"shard_dir={tmp_path / 'shards'}"]
    run = lambda *extra, flags=(): subprocess.run([sys.executable, *common[:2], *flags, *common[2:], *extra], cwd=REPO,
                                                  capture_output=True, text=True, timeout=300, check=False)
    proc = run("shard=0/2,1/2", f"hydra.sweep.dir={tmp_path / 'sweep'}", flags=("--multirun",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.npz")) == ["dedup-shard-0-of-2.npz", "dedup-shard-1-of-2.npz"]
    proc = run("merge=true", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "dedup.json").read_text())
    assert report["merged_from"] == str(tmp_path / "shards") and report["removed"] == 1
    assert report["groups"][0]["paths"] == ["4.png", "4_copy.png"]
    assert run("shard=0/2", "merge=true", f"hydra.run.dir={tmp_path / 'x'}").returncode != 0


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 31, 32), (3, 6, 9)])
def test_tile_max_bound_stays_below_the_tiled_distance_and_above_the_mean_bound(shape):
    # The pruning drops a pair when tiles^2 x its largest per-tile feature sum exceeds the threshold:
    # sound only if that is a lower bound of the tiled distance (uneven tiles and cells included).
    from ambient.defenses.neardup import paired_tiled, tile_bound_sq, window_features

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, *shape, generator=g), torch.rand(40, *shape, generator=g)
    b[20:] = a[20:]
    b[20:, :, :2, :2] += 0.7  # different in one corner tile only: the mean over tiles dilutes it
    h, w = shape[1:]
    fa, fb = (window_features(x, 4, [(0, h, 0, w)])[0] for x in (a, b))
    sq = (fa - fb).pow(2)
    tile_max, mean_bound = tile_bound_sq(sq, h, w, 4), sq.sum(1)
    exact = paired_tiled(a, b, 4) ** 2
    assert (tile_max <= exact * (1 + 1e-5)).all() and (mean_bound <= tile_max * (1 + 1e-6)).all()
    assert (tile_max[20:] > 4 * mean_bound[20:]).all()  # where it matters, far tighter


def test_auto_index_uses_faiss_gpus_when_there_are_some(monkeypatch):
    # dedup.index=auto: an exact flat index moved to the GPUs where faiss has a GPU build that sees one,
    # else HNSW; dedup.index=gpu without one fails naming the key. The GPU move is faked here (CPU CI).
    faiss = pytest.importorskip("faiss")
    from ambient.defenses.nnsearch import knn

    desc = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    _, on_cpu = knn(desc, 5, "auto")
    assert isinstance(on_cpu, faiss.IndexHNSWFlat)
    with pytest.raises(RuntimeError, match="dedup.index=gpu"):
        knn(desc, 5, "gpu")
    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or index, raising=False)
    found, on_gpu = knn(desc, 5, "auto")
    assert moved and isinstance(on_gpu, faiss.IndexFlatL2)
    exact = torch.cdist(desc, desc).topk(5, largest=False).indices
    assert (torch.from_numpy(found).sort(1).values == exact.sort(1).values).all()  # exact k nearest


def test_membership_by_duplication_counts_each_image_once():
    """Every planted copy is a scored row, so copies weigh in a membership AUC as often as they were
    planted. by_duplication scores each image once (its original row, on both sides) and splits the
    members into those planted with copies and those without."""
    from ambient.attack.membership import mia_metrics
    from ambient.membership_eval import ScoredRows, breakdown, duplication_groups

    data = load_digits(8).select(torch.arange(200))
    members, held = split_holdout(plant_duplicates(data, {"count": 20, "times": 5, "seed": 0}), 150, seed=0)
    groups = duplication_groups(members, held)
    m_copy, h_copy = members.planted_copy.numpy(), held.planted_copy.numpy()
    copied = np.isin(members.indices.numpy(), members.source_index[members.planted_copy].numpy()) & ~m_copy
    rng = np.random.default_rng(0)
    # Members planted with copies are recognised (low scores), members without are indistinguishable from
    # held-out images; the copy rows get extreme scores that only a row-by-row AUC would count.
    m = np.where(copied, rng.normal(-5, 0.1, len(members)), rng.normal(0, 1, len(members)))
    m[m_copy], h = -100.0, rng.normal(0, 1, len(held))
    h[h_copy] = 100.0
    figures = breakdown(m, h, ScoredRows(groups=groups), seed=0)
    assert figures["distinct_members"] == 50 and figures["distinct_non_members"] == 150
    assert figures["duplicated_members"] == copied.sum() >= 1
    assert figures["single_members"] == 50 - copied.sum()
    assert figures["distinct_auc"] == mia_metrics(m[~m_copy], h[~h_copy]).auc
    assert figures["duplicated_auc"] == 1.0  # -5 ± 0.1 against N(0, 1): every pair ordered
    assert abs(figures["single_auc"] - 0.5) < 0.15 and figures["single_auc_ci_low"] < 0.5 < figures["single_auc_ci_high"]
    assert mia_metrics(m, h).auc > figures["distinct_auc"] + 0.1  # the copy rows inflate the row-by-row AUC
    assert duplication_groups(data.select(torch.arange(50)), data.select(torch.arange(50, 60))) is None
    assert breakdown(m, h, None, seed=0) == {} and breakdown(m, h, ScoredRows(), seed=0) == {}


@pytest.mark.slow
def test_a_run_with_planted_copies_reports_membership_per_distinct_image(tmp_path):
    run, out, report = train_and_evaluate(tmp_path, ["dataset.duplicate={count: 10, times: 3, seed: 0}"],
                                          ["mia.attacks=[loss,pia]"])
    members = json.loads((run / "split.json").read_text())["members"]
    distinct = [i for i in members if i < 40]  # copies get indices after every real image
    for section in ("mia", "pia"):
        figures = report[section]
        assert figures["members"] == len(members) > figures["distinct_members"] == len(distinct)
        assert figures["duplicated_members"] == (len(members) - len(distinct)) // 2 >= 1
        assert figures["duplicated_members"] + figures["single_members"] == len(distinct)
        assert figures["distinct_auc_ci_low"] <= figures["distinct_auc"] <= figures["distinct_auc_ci_high"]
        assert figures["strata"] >= 2 and figures["stratified_auc_ci_low"] <= figures["stratified_auc"]  # digits: labelled
    assert "AUC, each image once (planted copies not counted)" in (out / "report.md").read_text()
