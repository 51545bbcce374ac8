"""Attack metrics on planted truth: K training images copied >= 10 times each among novel images.

    pytest tests/test_attack_metrics.py
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ambient.attack import (
    RandomProjectionFeatures,
    adaptive_extraction,
    clique_precision,
    cliques_from_distances,
    feature_replication,
    fid,
    fid_images,
    find_cliques,
    frechet_distance,
    gu_ratio,
    kid,
    kid_images,
    mia_metrics,
    verify_extraction,
)

PLANTED = (3, 17, 29)  # training indices the "model" memorized
COPIES, N_TRAIN, N_NOVEL = 12, 40, 30


# Purpose: smooth random images (bilinear upsampling of 4x4 noise), so a 1-pixel shift is a
# small change, as for natural images, while two independent images stay far apart.
def smooth_images(n, g, size=32):
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)


# Purpose: shift by (dy, dx) in {0, 1} pixels with edge replication (no wrap-around seam).
def shift(x, dy, dx):
    h, w = x.shape[-2:]
    return F.pad(x[None], (1, 1, 1, 1), mode="replicate")[0, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


# Purpose: near-copies of one image: random 1-pixel shift plus small noise, clamped to [0, 1].
def near_copies(x, n, g):
    out = []
    for _ in range(n):
        dy, dx = torch.randint(0, 2, (2,), generator=g).tolist()
        out.append((shift(x, dy, dx) + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    return out


@pytest.fixture(scope="module")
def planted():
    g = torch.Generator().manual_seed(0)
    train = smooth_images(N_TRAIN, g)
    gens, source = [], []
    for t in PLANTED:
        gens += near_copies(train[t], COPIES, g)
        source += [t] * COPIES
    gens += list(smooth_images(N_NOVEL, g))
    source += [-1] * N_NOVEL
    # Shuffle so clique members are not simply consecutive indices.
    order = torch.randperm(len(gens), generator=g)
    return train, torch.stack(gens)[order], torch.tensor(source)[order]


def copy_groups(source):
    return {t: set(torch.nonzero(source == t).flatten().tolist()) for t in PLANTED}


@pytest.mark.parametrize("method", ["networkx", "greedy"])
def test_clique_filter_flags_exactly_the_planted_groups(planted, method):
    train, gens, source = planted
    cliques = find_cliques(gens, edge_threshold=0.1, min_clique=10, method=method)
    assert len(cliques) == len(PLANTED)
    assert sorted(c.members for c in cliques) == sorted(tuple(sorted(g)) for g in copy_groups(source).values())
    assert all(source[c.medoid] >= 0 for c in cliques)
    means = [c.mean_distance for c in cliques]
    assert means == sorted(means) and max(means) < 0.1


def test_clique_filter_ignores_groups_below_min_clique(planted):
    _, gens, source = planted
    assert find_cliques(gens, min_clique=COPIES + 1) == []
    novel = gens[source < 0]
    assert find_cliques(novel, min_clique=2) == []  # novel images link to nothing


def test_overlapping_maximal_cliques_become_disjoint_groups():
    # Two 4-cliques sharing node 3: {0,1,2,3} and {3,4,5,6}; the tighter one keeps node 3.
    d = np.full((7, 7), 1.0)
    for group, w in (((0, 1, 2, 3), 0.02), ((3, 4, 5, 6), 0.05)):
        for i in group:
            for j in group:
                d[i, j] = w
    np.fill_diagonal(d, 0.0)
    cliques = cliques_from_distances(d, edge_threshold=0.1, min_clique=3, method="networkx")
    assert [c.members for c in cliques] == [(0, 1, 2, 3), (4, 5, 6)]
    with pytest.raises(ValueError, match="method"):
        cliques_from_distances(d, method="exact")


def test_verification_extracts_the_planted_training_images(planted):
    train, gens, source = planted
    result = verify_extraction(gens, train, delta=0.15)
    assert result.extracted_indices == sorted(PLANTED)
    copies = source >= 0
    assert torch.equal(result.is_extracted, copies)
    assert torch.equal(result.nn_index[copies], source[copies])
    for e in result.extractions:  # each reports its closest generation
        group = list(copy_groups(source)[e.train_index])
        assert e.distance == pytest.approx(result.nn_distance[group].min().item())
        assert source[e.generation_index] == e.train_index


def test_adaptive_score_separates_copies_from_novel_images(planted):
    train, gens, source = planted
    result = adaptive_extraction(gens, train, alpha=0.5, n=50)
    assert result.n == N_TRAIN  # n = 50 clipped to the training size
    assert torch.equal(result.is_extracted, source >= 0)


def test_gu_ratio_separates_copies_from_novel_images(planted):
    train, gens, source = planted
    result = gu_ratio(gens, train)
    assert (result.ratio[source >= 0] < 1 / 3).all()
    assert (result.ratio[source < 0] > 1 / 3).all()
    assert torch.equal(result.is_memorized, source >= 0)


def test_feature_replication_with_pixel_default(planted):
    train, gens, source = planted
    result = feature_replication(gens, train)
    copies = source >= 0
    assert torch.equal(result.index[copies], source[copies])
    assert result.fraction_above[0.95] == pytest.approx(copies.double().mean().item())
    assert result.fraction_above[0.5] >= result.fraction_above[0.95]


def test_feature_replication_with_a_custom_extractor(planted):
    train, gens, source = planted
    result = feature_replication(gens, train, extractor=RandomProjectionFeatures(dim=64), batch_size=7)
    assert result.similarity.shape == (len(gens),)
    assert torch.equal(result.index[source >= 0], source[source >= 0])


def test_clique_precision_counts_a_clique_of_a_novel_image_as_false(planted):
    train, gens, source = planted
    g = torch.Generator().manual_seed(1)
    novel = smooth_images(1, g)[0]  # a "mode collapse" clique that copies no training image
    gens = torch.cat([gens, torch.stack(near_copies(novel, 10, g))])
    cliques = find_cliques(gens)
    assert len(cliques) == len(PLANTED) + 1
    verification = verify_extraction(gens, train)
    for rep in ("medoid", "closest"):
        result = clique_precision(cliques, verification, representative=rep)
        assert result.precision == pytest.approx(len(PLANTED) / (len(PLANTED) + 1))
        assert sorted(t for t, ok in zip(result.train_index, result.true_positive) if ok) == sorted(PLANTED)
    assert np.isnan(clique_precision([], verification).precision)


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    assert abs(fid(x, x)) < 1e-6
    # Equal covariances: FID reduces to ||mean shift||^2 exactly.
    values = [fid(x, x + s) for s in (0.1, 0.5, 1.0)]
    assert values == pytest.approx([16 * s**2 for s in (0.1, 0.5, 1.0)], rel=1e-6)


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same, _ = kid(a, b, num_subsets=20, subset_size=200)
    shifted, _ = kid(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 0.01
    assert shifted > 10 * 0.01


def test_kid_on_whole_sets_matches_the_unbiased_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 1
    k = lambda u, v: (u @ v / 3 + 1) ** 3
    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kid(x, y, num_subsets=3, subset_size=100)  # subsets clipped to the whole set
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == pytest.approx(0, abs=1e-10)


def test_image_level_fid_and_kid_with_the_offline_extractor(planted):
    train, gens, _ = planted
    # 40 images, 256-d features: a singular covariance, whose zero eigenvalues each leave
    # sqrt(rounding) ~ 1e-8 in the trace term.
    assert abs(fid_images(train, train)) < 1e-4
    assert fid_images(train, (train + 0.2).clamp(0, 1)) > 1e-2
    # Deterministic: the projection is drawn from a fixed seed.
    assert kid_images(train, gens, subset_size=20, num_subsets=5) == kid_images(
        train, gens, subset_size=20, num_subsets=5
    )


def test_mia_perfect_separation_and_chance():
    perfect = mia_metrics([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    assert perfect.auc == 1.0 and perfect.tpr_at_fpr == {0.01: 1.0, 0.001: 1.0}
    g = torch.Generator().manual_seed(6)
    chance = mia_metrics(torch.randn(5000, generator=g), torch.randn(5000, generator=g))
    assert chance.auc == pytest.approx(0.5, abs=0.02)
    assert chance.tpr_at_fpr[0.01] < 0.05


def test_mia_tpr_at_low_fpr_on_a_hand_made_example():
    nonmembers = np.arange(1.0, 101.0)  # losses 1..100
    members = [0.2, 0.4, 1.5, 2.5, 70.5, 80.5, 90.5, 95.5, 99, 100.5]
    result = mia_metrics(members, nonmembers, fpr_levels=(0.001, 0.01, 0.02))
    # FPR 0: threshold below 1 flags 0.2, 0.4. FPR 1%: one non-member (loss 1) may be flagged,
    # adding 1.5. FPR 2%: two non-members, adding 2.5.
    assert result.tpr_at_fpr == {0.001: 0.2, 0.01: 0.3, 0.02: 0.4}
    # AUC = P(member loss < non-member loss), a tie counting 1/2 (99 vs 99):
    # (100 + 100 + 99 + 98 + 30 + 20 + 10 + 5 + 1.5 + 0) / 1000.
    assert result.auc == pytest.approx(0.4635)
    flipped = mia_metrics(-np.asarray(members), -nonmembers, lower_is_member=False)
    assert flipped.auc == pytest.approx(0.4635)
