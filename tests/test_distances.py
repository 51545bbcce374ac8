"""All-pairs distances: blocked matmul results against a brute-force loop over pairs.

    pytest tests/test_distances.py
"""


import pytest
import torch

from ambient.attack.distances import (
    cosine_similarity,
    nearest,
    nearest_cosine,
    normalized_l2,
    split_tiles,
    tiled_l2,
)

BLOCKS = [1, 7, 1024]  # one row, a non-divisor smaller than N, larger than N


# Purpose: deterministic images in [0, 1].
def images(n, shape=(3, 10, 13), seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# Carlini et al. 2023: the definition, one pair at a time.
def l2_loop(a, b):
    return torch.tensor([[((x - y) ** 2).mean().sqrt().item() for y in b] for x in a], dtype=torch.float64)


# Carlini et al. 2023: tiled l2 by its definition, with explicit index ranges per tile.
def tiled_loop(a, b, tiles):
    def bounds(size):
        q, r = divmod(size, tiles)
        edges = [0]
        for i in range(tiles):
            edges.append(edges[-1] + q + (1 if i < r else 0))
        return list(zip(edges[:-1], edges[1:]))

    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            worst = 0.0
            for h0, h1 in bounds(x.shape[1]):
                for w0, w1 in bounds(x.shape[2]):
                    d = ((x[:, h0:h1, w0:w1] - y[:, h0:h1, w0:w1]) ** 2).mean().sqrt().item()
                    worst = max(worst, d)
            out[i, j] = worst
    return out


@pytest.mark.parametrize("block_size", BLOCKS)
def test_normalized_l2_matches_loop(block_size):
    a, b = images(23, seed=1), images(11, seed=2)
    got = normalized_l2(a, b, block_size=block_size)
    assert got.shape == (23, 11)
    torch.testing.assert_close(got, l2_loop(a, b), atol=1e-9, rtol=0)


def test_normalized_l2_float32_and_self_distance():
    a = images(9, shape=(3, 32, 32)).float()
    got = normalized_l2(a, a, block_size=4).double()
    off = ~torch.eye(9, dtype=torch.bool)
    torch.testing.assert_close(got[off], l2_loop(a.double(), a.double())[off], atol=1e-5, rtol=0)
    # Cancellation in ||a||^2 + ||b||^2 - 2ab leaves float32 self-distances of order
    # sqrt(eps) ~ 1e-4: harmless against thresholds of 0.1, but never NaN.
    assert torch.isfinite(got).all() and got.diag().max() < 1e-3


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("tiles", [1, 3, 4])
def test_tiled_l2_matches_loop_on_indivisible_sizes(block_size, tiles):
    a, b = images(13, seed=3), images(6, seed=4)  # H = 10, W = 13: no tiles value divides both
    got = tiled_l2(a, b, tiles=tiles, block_size=block_size)
    torch.testing.assert_close(got, tiled_loop(a, b, tiles), atol=1e-9, rtol=0)


def test_tiled_l2_with_one_tile_is_normalized_l2():
    a, b = images(5, seed=5), images(7, seed=6)
    torch.testing.assert_close(tiled_l2(a, b, tiles=1), normalized_l2(a, b), atol=1e-12, rtol=0)


def test_split_tiles_covers_every_pixel_once():
    x = images(2, shape=(3, 10, 13))
    tiles = split_tiles(x, 4)
    assert len(tiles) == 16
    assert sum(t.shape[1] for t in tiles) == 3 * 10 * 13
    with pytest.raises(ValueError):
        split_tiles(x, 11)  # more tiles than rows


def test_tiled_l2_catches_a_local_difference_that_plain_l2_dilutes():
    x = torch.full((1, 3, 32, 32), 0.3)
    y = x.clone()
    y[:, :, 8:16, 16:24] += 0.4  # exactly one 8x8 tile of the 4x4 grid changes
    plain, tiled = normalized_l2(x, y).item(), tiled_l2(x, y).item()
    # Plain l2 spreads the change over all 16 tiles: 0.4 / sqrt(16) = 0.1.
    assert plain == pytest.approx(0.1, abs=1e-5)
    assert tiled == pytest.approx(0.4, abs=1e-5)
    assert plain < 0.15 < tiled  # a "copy" for plain l2 at delta = 0.15, not for tiled


@pytest.mark.parametrize("metric", ["l2", "tiled"])
@pytest.mark.parametrize("block_size", BLOCKS)
def test_nearest_matches_sorted_loop(metric, block_size):
    a, b = images(17, seed=7), images(29, seed=8)
    full = l2_loop(a, b) if metric == "l2" else tiled_loop(a, b, 4)
    want_d, want_i = full.sort(dim=1)
    dist, idx = nearest(a, b, k=5, metric=metric, block_size=block_size)
    assert dist.shape == idx.shape == (17, 5) and idx.dtype == torch.long
    torch.testing.assert_close(dist, want_d[:, :5], atol=1e-9, rtol=0)
    assert torch.equal(idx, want_i[:, :5])


@pytest.mark.parametrize("block_size", BLOCKS)
def test_nearest_exclude_self(block_size):
    a = images(15, seed=9)
    full = l2_loop(a, a)
    full.fill_diagonal_(float("inf"))
    want_d, want_i = full.sort(dim=1)
    dist, idx = nearest(a, a, k=3, exclude_self=True, block_size=block_size)
    assert not (idx == torch.arange(15)[:, None]).any()
    torch.testing.assert_close(dist, want_d[:, :3], atol=1e-9, rtol=0)
    assert torch.equal(idx, want_i[:, :3])


def test_nearest_finds_planted_copies_in_a_large_set_blockwise():
    b = images(3000, shape=(3, 8, 8), seed=10).float()
    targets = torch.tensor([5, 1234, 2999])
    a = b[targets] + 0.001
    dist, idx = nearest(a, b, k=1, block_size=2)
    assert torch.equal(idx[:, 0], targets) and (dist < 0.01).all()


def test_nearest_rejects_bad_arguments():
    a = images(4)
    with pytest.raises(ValueError, match="metric"):
        nearest(a, a, metric="l1")
    with pytest.raises(ValueError, match="k must be"):
        nearest(a, a, k=4, exclude_self=True)
    with pytest.raises(ValueError, match="block_size"):
        normalized_l2(a, a, block_size=0)


def test_device_argument_moves_the_result():
    a = images(3)
    assert normalized_l2(a, a, device="cpu").device.type == "cpu"
    assert nearest(a, a, device=torch.device("cpu"))[0].device.type == "cpu"


@pytest.mark.parametrize("block_size", BLOCKS)
def test_cosine_matches_loop(block_size):
    g = torch.Generator().manual_seed(11)
    fa, fb = torch.randn(19, 8, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g, dtype=torch.float64)
    want = torch.tensor([[torch.nn.functional.cosine_similarity(x, y, dim=0).item() for y in fb] for x in fa], dtype=torch.float64)
    got = cosine_similarity(fa, fb, block_size=block_size)
    torch.testing.assert_close(got, want.double(), atol=1e-9, rtol=0)
    sim, idx = nearest_cosine(fa, fb, k=2, block_size=block_size)
    want_s, want_i = want.double().sort(dim=1, descending=True)
    torch.testing.assert_close(sim, want_s[:, :2], atol=1e-9, rtol=0)
    assert torch.equal(idx, want_i[:, :2])


def test_nearest_cosine_exclude_self_and_zero_vector():
    f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.0, 0.0]])
    sim, idx = nearest_cosine(f, f, exclude_self=True)
    assert idx[:, 0].tolist()[:3] == [1, 0, 1]
    assert torch.isfinite(sim).all()  # the zero vector gives similarity 0, not NaN
