"""The streamed clique filter and verification equal the in-memory results on planted copies.

    pytest tests/test_streaming.py
"""
import numpy as np
import pytest
import torch
from PIL import Image

from ambient.attack.cliques import cliques_from_distances, find_cliques
from ambient.attack.distances import nearest, tiled_edges, tiled_l2
from ambient.attack.extraction import verify_extraction
from ambient.attack.streaming import (
    ConcatSource,
    PngFiles,
    TensorSource,
    rows_of,
    stream_nearest,
    stream_tiled_edges,
)
from tests.test_attack_metrics import near_copies, smooth_images

PLANTED, COPIES = (2, 11, 23), 12


# Purpose: 30 training images; 3 of them copied 12 times (1-pixel shifts + noise), 40 novel smooth
# images and 10 of pure noise, shuffled; everything quantized to uint8 as PNG generations are.
@pytest.fixture(scope="module")
def planted():
    g = torch.Generator().manual_seed(0)
    train = smooth_images(30, g)
    gens, source = [], []
    for t in PLANTED:
        gens += near_copies(train[t], COPIES, g)
        source += [t] * COPIES
    gens += list(smooth_images(40, g)) + list(torch.rand(10, 3, 32, 32, generator=g))
    source += [-1] * 50
    order = torch.randperm(len(gens), generator=g)
    quantize = lambda x: (x * 255).round().to(torch.uint8)
    return quantize(train), quantize(torch.stack(gens)[order]), torch.tensor(source)[order]


# Purpose: write uint8 images as PNG files, as evaluate's samples/<prompt>/ holds them.
def write_pngs(images, folder):
    files = []
    for i, img in enumerate(images):
        files.append(folder / f"{i:06d}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(files[-1])
    return files


# Purpose: a source that fails if anyone asks it for more than one block at a time.
class BlockOnly(TensorSource):
    def __init__(self, images, block_size):
        super().__init__(images)
        self.block_size, self.calls = block_size, 0

    def block(self, start, stop):
        assert stop - start <= self.block_size, f"asked for {stop - start} images at once"
        self.calls += 1
        return super().block(start, stop)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("size", [(32, 32), (30, 27)])
def test_tiled_edges_are_the_thresholded_tiled_l2(planted, threshold, size):
    _, gens, _ = planted
    x = gens[:, :, : size[0], : size[1]].float() / 255
    d = tiled_l2(x, x)
    i, j, dist = tiled_edges(x, x, threshold, upper=True)
    ref_i, ref_j = torch.nonzero(torch.triu(d < threshold, 1), as_tuple=True)
    assert torch.equal(i, ref_i) and torch.equal(j, ref_j)
    assert torch.allclose(dist, d[i, j], atol=1e-5)
    # Two different blocks: every pair, both orders of the bound stages.
    i, j, _ = tiled_edges(x[:50], x[30:], threshold)
    ref_i, ref_j = torch.nonzero(d[:50, 30:] < threshold, as_tuple=True)
    assert torch.equal(i, ref_i) and torch.equal(j, ref_j)


# A large self-pair block is split in halves (its lower half skipped), recursively: same edges.
def test_split_self_pair_blocks_find_the_same_edges(planted, monkeypatch):
    from ambient.attack import distances

    _, gens, _ = planted
    x = gens.float() / 255
    whole = tiled_edges(x, x, 0.3, upper=True)
    monkeypatch.setattr(distances, "_UPPER_SPLIT", 7)
    split = tiled_edges(x, x, 0.3, upper=True)
    assert torch.equal(whole[0], split[0]) and torch.equal(whole[1], split[1])
    assert torch.allclose(whole[2], split[2], atol=1e-5)  # per-pair vs matmul rounding


@pytest.mark.parametrize("method", ["networkx", "greedy"])
def test_streamed_clique_filter_from_png_blocks_equals_the_in_memory_filter(planted, tmp_path, method):
    _, gens, source = planted
    in_memory = cliques_from_distances(tiled_l2(gens.float() / 255, gens.float() / 255), 0.1, 10, method)
    assert sorted(c.members for c in in_memory) == sorted(
        tuple(torch.nonzero(source == t).flatten().tolist()) for t in PLANTED)
    streamed = find_cliques(PngFiles(write_pngs(gens, tmp_path)), 0.1, 10, method=method, block_size=16)
    assert [(c.members, c.medoid) for c in streamed] == [(c.members, c.medoid) for c in in_memory]
    assert [c.mean_distance for c in streamed] == pytest.approx([c.mean_distance for c in in_memory], abs=1e-5)
    # The edge list is the same whatever the block size (block pairs on and off the diagonal).
    a = stream_tiled_edges(TensorSource(gens), 0.1, block_size=16)
    b = stream_tiled_edges(TensorSource(gens), 0.1, block_size=len(gens))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_streamed_verification_equals_the_in_memory_nearest_both_ways(planted, tmp_path):
    train, gens, source = planted
    x, g = train.float() / 255, gens.float() / 255
    gen_source, train_source = BlockOnly(gens, 8), BlockOnly(train, 8)
    result = verify_extraction(gen_source, train_source, delta=0.15, block_size=8)
    assert gen_source.calls > 1 and train_source.calls > 1  # it streamed, one block at a time
    d, idx = nearest(g, x, k=1)
    assert torch.equal(result.nn_index, idx[:, 0])
    assert torch.allclose(result.nn_distance, d[:, 0], atol=1e-5)
    assert result.extracted_indices == sorted(PLANTED)
    assert torch.equal(result.is_extracted, source >= 0)
    # Def. 1's direction from the same pass: each training image's nearest generation.
    d, idx = nearest(x, g, k=1)
    assert torch.equal(result.train_nn_index, idx[:, 0])
    assert torch.allclose(result.train_nn_distance, d[:, 0], atol=1e-5)
    # From PNG files: the same figures as from the tensors they were written from.
    from_files = stream_nearest(PngFiles(write_pngs(gens, tmp_path)), TensorSource(train), block_size=7)
    assert torch.equal(from_files.index, result.nn_index)
    assert torch.allclose(from_files.distance, result.nn_distance, atol=1e-5)  # other blocks: other rounding


def test_sources_hand_out_unit_floats_of_the_same_pixels(planted, tmp_path):
    _, gens, _ = planted
    gray = gens[:5, :1]
    files = write_pngs(torch.cat([gray, gray, gray], 1), tmp_path)  # RGB files
    Image.fromarray(gray[0, 0].numpy()).save(tmp_path / "gray.png")  # and one grayscale file
    assert torch.equal(PngFiles(files).block(1, 4), gens[1:4, :1].expand(-1, 3, -1, -1).float() / 255)
    assert torch.equal(PngFiles([tmp_path / "gray.png"]).block(0, 1), gray[:1].float() / 255)
    assert np.isclose(TensorSource(gens).block(0, 2).max().item(), gens[:2].max().item() / 255)
    with pytest.raises(ValueError, match="block_size"):
        stream_tiled_edges(TensorSource(gens), 0.1, block_size=0)


def test_a_concatenation_of_sources_reads_across_their_boundaries(planted, tmp_path):
    _, gens, _ = planted
    parts = [gens[:7], gens[7:20], gens[20:]]
    source = ConcatSource([PngFiles(write_pngs(parts[0], tmp_path)), parts[1], TensorSource(parts[2])])
    assert len(source) == len(gens)
    for start, stop in ((0, 7), (5, 9), (6, 21), (19, 20), (3, len(gens))):
        assert torch.equal(source.block(start, stop), gens[start:stop].float() / 255)
    assert torch.equal(rows_of(source, [25, 2, 8]), gens[[25, 2, 8]].float() / 255)


def test_per_generation_scores_from_blocks_equal_the_whole_set_computation(planted, tmp_path):
    """adaptive, Gu and pixel replication read the generations a block at a time (here blocks of 16
    from PNG files); the figures are those of one pass over all of them in memory."""
    from ambient.attack.distances import nearest_cosine
    from ambient.attack.extraction import adaptive_extraction, gu_ratio
    from ambient.attack.features import pixel_features
    from ambient.attack.replication import feature_replication

    train, gens, _ = planted
    x, g = train.float() / 255, gens.float() / 255
    files = BlockOnly(PngFiles(write_pngs(gens, tmp_path)).block(0, len(gens)), 16)
    d, i = nearest(g, x, k=10)
    adaptive = adaptive_extraction(files, x, n=10, block_size=16)
    assert torch.allclose(adaptive.score, d[:, 0] / (0.5 * d.mean(1)), atol=1e-6)
    assert torch.equal(adaptive.nn_index, i[:, 0]) and files.calls == -(-len(gens) // 16)
    gu = gu_ratio(files, x, block_size=16)
    assert torch.allclose(gu.ratio, d[:, 0] / d[:, 1], atol=1e-6)
    sim, idx = nearest_cosine(pixel_features(g), pixel_features(x), k=1)
    replication = feature_replication(files, x, block_size=16)
    assert torch.allclose(replication.similarity, sim[:, 0], atol=1e-6) and torch.equal(replication.index, idx[:, 0])


def test_the_whole_attack_from_png_files_reports_what_it_reports_from_tensors(planted, tmp_path):
    """evaluate.py now hands run_attack its generations as PNG files read per block; every figure,
    the extracted images and the pictures' generations are those of the same images as tensors."""
    import json

    from ambient.attack.run import TrainingImages, run_attack
    from tests.helpers import compose

    train, gens, _ = planted
    x = train.float() / 255
    prompts = {"a": gens[:60], "b": gens[60:100], "c": gens[100:]}
    cfg = compose("evaluate", ["run_dir=x", "attack.min_clique=5", "attack.adaptive_n=10"]).attack
    reference = {"reference": torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(3))}
    as_files = {}
    for k, v in prompts.items():
        (tmp_path / k).mkdir()
        as_files[k] = PngFiles(write_pngs(v, tmp_path / k))
    as_tensors = {k: v.float() / 255 for k, v in prompts.items()}
    (r1, p1), (r2, p2) = (run_attack(gen, TrainingImages(x, list(range(30))), cfg, "cpu", reference, "test")
                          for gen in (as_files, as_tensors))
    assert json.dumps(r1, sort_keys=True) == json.dumps(r2, sort_keys=True)
    assert r1["extraction"]["extracted"] == len(PLANTED) and r1["cliques"]["flagged"] >= len(PLANTED)
    assert len(p1) == len(p2) and all(torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))
                                      for (a, ga), (b, gb) in zip(p1, p2))
    # the pictures show each extracted image's closest generations, closest first
    for image, shown in p1[:len(PLANTED)]:
        d = [float(((image - s) ** 2).mean()) for s in shown]
        assert d == sorted(d)
