"""Membership-inference metrics (Carlini et al. 2022 "from first principles"; SecMI, PIA).

Scores are attack statistics such as the denoising loss at t ~ 100 (Carlini et al. 2023,
Sec. 6): lower loss means "member" by default. TPR at a fixed FPR uses no interpolation: it is
the largest TPR over ROC thresholds whose FPR is <= the target, so the number is one a real
threshold attains. With fewer than 1/FPR non-members, that is the TPR at FPR = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import Tensor

from ambient.seeding import Stream, seeded_generator

FPR_LEVELS = (0.01, 0.001)


@dataclass
class MIAResult:
    """MIA summary: AUC and TPR at each low-FPR level."""
    auc: float
    tpr_at_fpr: dict[float, float]  # FPR level -> TPR
    fpr: np.ndarray  # the full ROC, for plots
    tpr: np.ndarray


def _scores(x) -> np.ndarray:
    """1-D float64 numpy view of a score vector."""
    x = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, np.float64)
    return x.reshape(-1)


# Carlini et al. 2022, Sec. 4: TPR at a fixed low FPR, best threshold with FPR <= level.
def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    ok = fpr <= level + 1e-12  # float round-off on k / n must not drop an exact hit
    return float(tpr[ok].max()) if ok.any() else 0.0


def mia_metrics(
    member_scores,
    nonmember_scores,
    fpr_levels: tuple[float, ...] = FPR_LEVELS,
    lower_is_member: bool = True,
) -> MIAResult:
    """ROC AUC and TPR at low FPR for member vs non-member attack scores."""
    members, nonmembers = _scores(member_scores), _scores(nonmember_scores)
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("need at least one member and one non-member score")
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    scores = np.concatenate([members, nonmembers])
    # sklearn ranks "higher = positive"; a loss attack flips the sign.
    scores = -scores if lower_is_member else scores
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    auc = float(roc_auc_score(labels, scores))
    return MIAResult(auc, {float(l): tpr_at_fpr(fpr, tpr, l) for l in fpr_levels}, fpr, tpr)


# Carlini et al. 2023, Sec. 5.1 (loss attack at t ≈ 100): per-image denoising error, averaged over draws.
@torch.no_grad()
def loss_scores(model, images: Tensor, indices, timestep: int, draws: int, seed: int = 0, cond=None,
                batch_size: int = 256) -> Tensor:
    """Mean squared x0 error of `model.noise_and_denoise` (the trained model's own noise schedule and
    mask draw) per image; images in [-1, 1], indices their stable ids (each draw d of image i is
    seeded by (seed, i, MIA, d)). cond: class labels or one caption per image. Lower = member.
    Images go through the model batch_size at a time: the scores do not depend on it."""
    indices = [int(i) for i in indices]
    scores = torch.zeros(len(images))
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        x = images[rows].float().to(model.device)
        part = None if cond is None else cond[rows]
        for d in range(draws):
            gens = [seeded_generator(seed, i, Stream.MIA, d) for i in indices[rows]]
            pred = model.noise_and_denoise(x, timestep, gens, part)
            scores[rows] += ((pred - x) ** 2).flatten(1).mean(1).cpu() / draws
    return scores


# The loss attack over several t (Carlini et al. 2023 pick t ≈ 100 by sweeping t on labelled data): the
# scores at each t, drawn with the same noise per (image, draw) at every t (common random numbers).
def loss_scores_over_t(model, images: Tensor, indices, timesteps, draws: int, seed: int = 0, cond=None,
                       batch_size: int = 256) -> Tensor:
    """(T, N): loss_scores at each timestep of `timesteps`."""
    return torch.stack([loss_scores(model, images, indices, int(t), draws, seed, cond, batch_size) for t in timesteps])


def calibration_split(n_members: int, n_non_members: int, fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded disjoint rows: (calibration members, evaluation members, calibration non-members, evaluation
    non-members), `fraction` of each set for calibration. What is chosen on the first two never sees the
    labels it is evaluated on (Carlini et al. 2022, Sec. 4: no tuning on the test set)."""
    rng = np.random.default_rng([int(seed), Stream.MIA])
    pm, ph = rng.permutation(n_members), rng.permutation(n_non_members)
    km, kh = int(round(fraction * n_members)), int(round(fraction * n_non_members))
    return pm[:km], pm[km:], ph[:kh], ph[kh:]


def best_timestep(member_scores, non_member_scores) -> tuple[int, np.ndarray]:
    """The row (timestep) whose scores separate best, by ROC AUC (lower = member), and every row's AUC:
    members (T, m), non-members (T, n) — pass the calibration rows only. Ties go to the first row."""
    from ambient.attack.stats import auc_lower_is_member

    aucs = auc_lower_is_member(np.asarray(member_scores, np.float64), np.asarray(non_member_scores, np.float64))
    return int(np.argmax(aucs)), aucs
