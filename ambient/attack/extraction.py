"""Was a generation copied from the training set? Pixel-space verification tests.

- (l2, delta)-extraction (Carlini et al. 2023, Def. 1 and Sec. 4.2): nearest training image by
  normalized l2 within delta = 0.15.
- Adaptive CIFAR-10 score (Carlini et al. 2023, Sec. 5.1): l2 to the nearest training image
  over alpha times the mean l2 to the n nearest; robust to dense regions of the data.
- Nearest / second-nearest ratio (Gu et al. 2023, "On Memorization in Diffusion Models").
- Precision of the clique filter: how many flagged cliques are true extractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ambient.attack.cliques import Clique
from ambient.attack.distances import DEFAULT_BLOCK_SIZE, nearest
from ambient.attack.streaming import ImageSource, Nearest, per_block, stream_nearest

DELTA = 0.15  # Carlini et al. 2023, Sec. 4.2
ALPHA, N_NEIGHBOURS = 0.5, 50  # Carlini et al. 2023, Sec. 5.1
GU_THRESHOLD = 1.0 / 3.0  # Gu et al. 2023


# Carlini et al. 2023, Def. 1: training image `train_index` extracted by its closest generation.
@dataclass(frozen=True)
class Extraction:
    train_index: int
    generation_index: int
    distance: float


# Carlini et al. 2023, Sec. 4.2: per-generation nearest neighbours and the extracted set.
@dataclass
class ExtractionResult:
    nn_index: Tensor  # [N_gen] long, nearest training image of each generation
    nn_distance: Tensor  # [N_gen] normalized l2 to it
    delta: float
    extractions: list[Extraction]  # one per extracted training image, closest first
    # Def. 1's direction, from the same pass: per training image, its nearest generation.
    train_nn_distance: Tensor | None = None  # [N_train]
    train_nn_index: Tensor | None = None  # [N_train] long

    @property
    def is_extracted(self) -> Tensor:
        # [N_gen] bool: this generation copies some training image.
        return self.nn_distance <= self.delta

    @property
    def extracted_indices(self) -> list[int]:
        # Sorted training indices, for set comparisons and reports.
        return sorted(e.train_index for e in self.extractions)


def _closest_per_train(nn_index: Tensor, nn_distance: Tensor, hit: Tensor) -> list[Extraction]:
    """For every training image hit by some generation, keep only its closest generation."""
    gens = torch.nonzero(hit).flatten()
    gens = gens[torch.argsort(nn_distance[gens], stable=True)]
    best: dict[int, Extraction] = {}
    for g in gens.tolist():  # over hits (at most N_gen), not over pairs
        t = int(nn_index[g])
        if t not in best:
            best[t] = Extraction(t, g, float(nn_distance[g]))
    return list(best.values())


# Carlini et al. 2023, Sec. 4.2: (l2, delta)-extraction of `train` by `generations`, tensors or
# streaming.ImageSource (e.g. PngFiles): streamed by blocks of both, so memory is two blocks.
def verify_extraction(
    generations: Tensor | ImageSource,
    train: Tensor | ImageSource,
    delta: float = DELTA,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device=None,
) -> ExtractionResult:
    with torch.no_grad():
        nn = stream_nearest(generations, train, block_size=block_size, device=device)
    return extraction_of(nn, delta)


def extraction_of(nn: Nearest, delta: float = DELTA) -> ExtractionResult:
    """The extraction verdicts of an already computed generations x training pass."""
    # "within delta" read as <= (Def. 1 writes l(x, x_hat) <= delta).
    extractions = _closest_per_train(nn.index, nn.distance, nn.distance <= delta)
    return ExtractionResult(nn.index, nn.distance, delta, extractions, nn.reverse_distance, nn.reverse_index)


# Carlini et al. 2023, Sec. 5.1: adaptive score and its verdict.
@dataclass
class AdaptiveResult:
    score: Tensor  # [N_gen]; < 1 means extracted
    nn_index: Tensor  # [N_gen] long
    nn_distance: Tensor  # [N_gen]
    n: int  # neighbours actually used (n clipped to the training set size)

    @property
    def is_extracted(self) -> Tensor:
        return self.score < 1.0


# Carlini et al. 2023, Sec. 5.1: l2(x_hat, x_nn) / (alpha * mean l2 to the n nearest training
# images); the n nearest include x_nn itself, as S_x_hat in the paper does.
def adaptive_extraction(
    generations: Tensor | ImageSource,
    train: Tensor,
    alpha: float = ALPHA,
    n: int = N_NEIGHBOURS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device=None,
) -> AdaptiveResult:
    n = min(n, train.shape[0])
    with torch.no_grad():  # a block of generations at a time (the same row blocks nearest() makes)
        dist, idx = per_block(generations, lambda g: nearest(g, train, k=n, metric="l2", block_size=block_size,
                                                             device=device), block_size)
    # An all-zero neighbourhood (exact duplicates) gives 0 / tiny = 0: extracted, not NaN.
    score = dist[:, 0] / (alpha * dist.mean(1)).clamp_min(torch.finfo(dist.dtype).tiny)
    return AdaptiveResult(score, idx[:, 0], dist[:, 0], n)


# Gu et al. 2023: nearest / second-nearest distance ratio.
@dataclass
class GuResult:
    ratio: Tensor  # [N_gen]
    nn_index: Tensor  # [N_gen] long
    threshold: float

    @property
    def is_memorized(self) -> Tensor:
        return self.ratio < self.threshold


# Gu et al. 2023: ratio d(x_hat, 1st nearest) / d(x_hat, 2nd nearest) in pixel l2; a copy sits
# much closer to one training image than to any other, so the ratio is < 1/3.
def gu_ratio(
    generations: Tensor | ImageSource,
    train: Tensor,
    threshold: float = GU_THRESHOLD,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device=None,
) -> GuResult:
    if train.shape[0] < 2:
        raise ValueError("the Gu et al. ratio needs at least 2 training images")
    with torch.no_grad():
        dist, idx = per_block(generations, lambda g: nearest(g, train, k=2, metric="l2", block_size=block_size,
                                                             device=device), block_size)
    ratio = dist[:, 0] / dist[:, 1].clamp_min(torch.finfo(dist.dtype).tiny)
    return GuResult(ratio, idx[:, 0], threshold)


@dataclass
class CliquePrecision:
    """Precision of the clique filter, with the per-clique verdicts behind it."""
    precision: float  # NaN when nothing was flagged
    true_positive: list[bool]  # per clique, in the order given
    train_index: list[int]  # per clique: nearest training image of its representative


def clique_precision(
    cliques: list[Clique], verification: ExtractionResult, representative: str = "medoid"
) -> CliquePrecision:
    """Fraction of flagged cliques that are true extractions. A clique counts when its representative
    generation ("medoid", or "closest": the member nearest to the training set) is within delta of a
    training image.
    """
    if representative not in ("medoid", "closest"):
        raise ValueError(f"representative must be 'medoid' or 'closest', got {representative!r}")
    hits, train_index = [], []
    for clique in cliques:  # over cliques, a handful per prompt
        if representative == "medoid":
            g = clique.medoid
        else:
            members = torch.tensor(clique.members)
            g = int(members[verification.nn_distance[members].argmin()])
        hits.append(bool(verification.nn_distance[g] <= verification.delta))
        train_index.append(int(verification.nn_index[g]))
    precision = sum(hits) / len(hits) if hits else float("nan")
    return CliquePrecision(precision, hits, train_index)
