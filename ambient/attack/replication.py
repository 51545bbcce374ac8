"""Feature-space replication (Somepalli et al. 2023, "Diffusion Art or Digital Forgery?").

For each generation, the top-1 cosine similarity to the training set in a feature space; report
the fraction of generations above 0.5 (replication) and 0.95 (duplicate). The extractor is
pluggable; the default is centred, unit-norm pixels (see `features.pixel_features`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ambient.attack.distances import DEFAULT_BLOCK_SIZE, nearest_cosine
from ambient.attack.features import FeatureExtractor, extract_features, pixel_features
from ambient.attack.streaming import ImageSource, per_block

THRESHOLDS = (0.5, 0.95)  # Somepalli et al. 2023: replication > 0.5, duplicate > 0.95


# Somepalli et al. 2023: top-1 training match of every generation and the summary fractions.
@dataclass
class ReplicationResult:
    similarity: Tensor  # [N_gen] top-1 cosine similarity
    index: Tensor  # [N_gen] long, the most similar training image
    fraction_above: dict[float, float]  # threshold -> fraction of generations strictly above


# Somepalli et al. 2023: top-1 cosine similarity of generations to the training set.
def feature_replication(
    generations: Tensor | ImageSource,
    train: Tensor,
    extractor: FeatureExtractor | None = None,
    thresholds: tuple[float, ...] = THRESHOLDS,
    batch_size: int = 256,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device=None,
) -> ReplicationResult:
    extractor = extractor or pixel_features
    ft = extract_features(train, extractor, batch_size)
    # A block of generations at a time: pixel "features" are as large as the images themselves.
    sim, idx = per_block(generations, lambda g: nearest_cosine(extract_features(g, extractor, batch_size), ft, k=1,
                                                               block_size=block_size, device=device), block_size)
    return _result(sim[:, 0], idx[:, 0], thresholds)


def replication_of_features(fg: Tensor, ft: Tensor, thresholds: tuple[float, ...] = THRESHOLDS,
                            block_size: int = DEFAULT_BLOCK_SIZE, device=None) -> ReplicationResult:
    """The same, from features already extracted (generations (N, D), training images (M, D))."""
    sim, idx = nearest_cosine(fg, ft, k=1, block_size=block_size, device=device)
    return _result(sim[:, 0], idx[:, 0], thresholds)


def _result(sim: Tensor, idx: Tensor, thresholds: tuple[float, ...]) -> ReplicationResult:
    fractions = {float(t): float((sim > t).double().mean()) for t in thresholds}
    return ReplicationResult(sim, idx, fractions)
