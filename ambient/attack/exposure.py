"""Canary figures: exposure (Carlini et al. 2019, "The Secret Sharer", Sec. 4), extraction and reconstruction
of each planted canary, as a function of how many times it was planted (Carlini et al. 2023: duplicated
images are extracted more), each next to the same figure for reference canaries that were never planted.

exposure(c) = log2(R + 1) − log2(rank(c)), rank(c) = 1 + #{references r : score(r) ≤ score(c)} among the
canary and R references (lower score = more memorized; a tie counts against the canary, so exposure is
never overstated). A canary the model never saw has a uniformly random rank: its expected exposure is the
references' own (leave-one-out) exposure, about 1.4 bits; the maximum is log2(R + 1).
"""
from __future__ import annotations

import numpy as np


def exposure(canary_scores, reference_scores) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, exposures in bits) of each canary's score among the reference scores (lower = member)."""
    c, r = np.asarray(canary_scores, np.float64).reshape(-1), np.asarray(reference_scores, np.float64).reshape(-1)
    ranks = 1 + (r[None, :] <= c[:, None]).sum(1)
    return ranks, np.log2(len(r) + 1) - np.log2(ranks)


def reference_exposure(reference_scores) -> np.ndarray:
    """Each reference's exposure among the other references: the null level of an unplanted canary."""
    r = np.asarray(reference_scores, np.float64).reshape(-1)
    ranks = 1 + (r[None, :] <= r[:, None]).sum(1) - 1  # itself excluded
    return np.log2(len(r)) - np.log2(ranks)


def canary_figures(times, canary_scores, reference_scores, canary_nearest=None, reference_nearest=None,
                   canary_reconstruction=None, reference_reconstruction=None, delta: float = 0.15) -> dict:
    """Per value m of `times` (how often each canary was planted): mean exposure, fraction of canaries with
    rank 1, fraction extracted (nearest generation within ℓ2 δ) and mean best hidden-region ℓ2; the
    references' figures as the null; per canary, every number."""
    times = np.asarray(times)
    ranks, bits = exposure(canary_scores, reference_scores)
    out = {"planted": int(len(times)), "references": int(len(np.asarray(reference_scores).reshape(-1))),
           "max_exposure": float(np.log2(len(np.asarray(reference_scores).reshape(-1)) + 1)),
           "exposure": float(bits.mean()), "reference_exposure": float(reference_exposure(reference_scores).mean())}
    extracted = None if canary_nearest is None else np.asarray(canary_nearest) <= delta
    for m in sorted(set(times.tolist())):
        rows = times == m
        out[f"exposure_m{m}"] = float(bits[rows].mean())
        out[f"rank1_m{m}"] = float((ranks[rows] == 1).mean())
        if extracted is not None:
            out[f"extracted_m{m}"] = float(extracted[rows].mean())
        if canary_reconstruction is not None:
            out[f"reconstruction_m{m}"] = float(np.asarray(canary_reconstruction)[rows].mean())
    if reference_nearest is not None:
        out["reference_extracted"] = float((np.asarray(reference_nearest) <= delta).mean())
    if reference_reconstruction is not None:
        out["reference_reconstruction"] = float(np.asarray(reference_reconstruction).mean())
    out["delta"] = float(delta)
    out["per_canary"] = [
        {"times": int(m), "score": float(s), "rank": int(k), "exposure": float(b),
         **({} if canary_nearest is None else {"nearest_generation": float(canary_nearest[i]),
                                                "extracted": bool(extracted[i])}),
         **({} if canary_reconstruction is None else {"reconstruction": float(canary_reconstruction[i])})}
        for i, (m, s, k, b) in enumerate(zip(times.tolist(), np.asarray(canary_scores).reshape(-1), ranks, bits))]
    return out
