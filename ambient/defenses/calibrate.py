"""`dedup.threshold=auto`: the near-duplicate threshold calibrated on the dataset itself.

A threshold measured on photos does not transfer: on 50,000 Fashion-MNIST images (plain items on
black) 0.06 flagged 4,512 pairs of different items. So, per dataset:

1. Copies. A seeded sample of `sample` images is copied with each transformation that makes
   duplicates in the wild (TRANSFORMS: JPEG q75 re-encode, 1-px shift, resize to 3/4 and back,
   Gaussian noise sigma 5/255, a crop of 1/32 of the side resized back); each copy's distance to
   its original is measured.
2. Distinct neighbours. Each sampled image's nearest *distinct* neighbour among all the images
   (byte-identical copies excluded): candidates are its `NEIGHBOUR_CANDIDATES` nearest by the cell-mean
   descriptor (neardup.bound_features at shift 0), then the exact distance where the exact lower
   bound (per-shift cell means) does not rule the candidate out.
3. The rule. The data's own duplicates have near neighbours too: a neighbour within t_low (what copies
   that move no content reach: the larger `recall`-quantile of JPEG and noise copies) is taken as
   a duplicate, not as a false pair. hi = the largest threshold at which at most a fraction
   `max_false_rate` of sampled images has a neighbour in (t_low, hi]; lo = the largest of the per-transformation
   `recall`-quantiles of the copy distances (what catching `recall` of every kind needs).
   If lo <= hi the threshold is their midpoint (both sides get a margin); otherwise the two
   distributions overlap and false pairs win: threshold = hi, and the report names the
   transformations whose expected recall falls short.

The report gives both distributions, the expected recall of every transformation and the expected
number of false pairs at the chosen threshold: n/2 x the mean count of neighbours in (t_low, t] of the
sampled images, an estimate from `sample` images (a handful of them decide it); a duplicate in the
data that is farther than t_low from its original counts as false here.
"""
from __future__ import annotations

import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ambient.defenses.neardup import (
    LOWPASS,
    RESAMPLE,
    TILES,
    Filter,
    combo_distances,
    gaussian,
    overlap_windows,
    pair_distances,
    preprocess,
    shifts,
    tile_bound_sq,
    window_features,
)

TRANSFORMS = ("jpeg", "shift", "resize", "noise", "crop")
IN_PLACE = ("jpeg", "noise")  # transformations that move no content: they set t_low (module doc)
NEIGHBOUR_CANDIDATES = 32


def transform(images: torch.Tensor, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """Uint8 (N, C, H, W) copies of images under one duplicate-making transformation (module doc)."""
    n, c, h, w = images.shape
    if kind == "jpeg":
        out = []
        for img in images.permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if c == 1 else img).save(buf, format="JPEG", quality=75)
            out.append(np.asarray(Image.open(buf).convert("L" if c == 1 else "RGB")).reshape(h, w, c))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    if kind == "shift":  # one pixel in one of 8 directions, edges repeated
        moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        pad = F.pad(images.float(), (1, 1, 1, 1), mode="replicate")
        picks = rng.integers(0, len(moves), n)
        return torch.stack([pad[k, :, 1 + moves[p][0]:1 + moves[p][0] + h, 1 + moves[p][1]:1 + moves[p][1] + w]
                            for k, p in enumerate(picks.tolist())]).to(torch.uint8)
    if kind == "resize":  # 32 -> 24 -> 32
        small = F.interpolate(images.float(), size=(round(h * 0.75), round(w * 0.75)), mode="bilinear",
                              antialias=True, align_corners=False)
        return _to_uint8(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))
    if kind == "noise":
        noise = torch.from_numpy(rng.normal(0.0, 5.0, images.shape)).float()
        return _to_uint8(images.float() + noise)
    if kind == "crop":  # keep (1 - 1/32) of the side at a random offset, resized back
        m = max(1, round(h / 32))
        tops, lefts = rng.integers(0, m + 1, n), rng.integers(0, m + 1, n)
        return torch.cat([_to_uint8(F.interpolate(images[k:k + 1, :, t:t + h - m, s:s + w - m].float(), size=(h, w),
                                                  mode="bilinear", align_corners=False))
                          for k, (t, s) in enumerate(zip(tops.tolist(), lefts.tolist()))])
    raise ValueError(f"transformation {kind!r}; allowed: {' | '.join(TRANSFORMS)}")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def descriptors(images_uint8: torch.Tensor, metric: str = "tiled", blur: int = 1, resolution: int = 32,
                lowpass: float = LOWPASS, chunk: int = 8192) -> torch.Tensor:
    """Cell-mean descriptors (N, D) at shift 0, computed `chunk` images at a time (never the float set)."""
    out = []
    for s in range(0, images_uint8.shape[0], chunk):
        x = preprocess(images_uint8[s:s + chunk], resolution, blur, lowpass)
        out.append(window_features(x, TILES[metric], [(0, x.shape[-2], 0, x.shape[-1])])[0])
    return torch.cat(out)


def nearest_candidates(queries: torch.Tensor, base: torch.Tensor, k: int, exclude=None,
                       chunk: int | None = None) -> torch.Tensor:
    """(Q, k) rows of `base` nearest to each query in descriptor l2 (exact, blocked matmul);
    exclude[q] (a base row, e.g. the query itself) is never returned."""
    base_sq = base.pow(2).sum(1)
    chunk = chunk or max(16, (1 << 26) // max(1, base.shape[0]))  # a (chunk, N) block of at most 256 MB
    out = []
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk]
        sq = torch.addmm(base_sq, q, base.T, alpha=-2)
        if exclude is not None:
            sq[torch.arange(len(q)), torch.as_tensor(exclude[s:s + chunk])] = float("inf")
        out.append(sq.topk(min(k, base.shape[0] - 1), dim=1, largest=False).indices)
    return torch.cat(out)


def calibrate(unique_uint8: torch.Tensor, metric: str = "tiled", max_shift: int = 1, blur: int = 1,
              resolution: int = 32, lowpass: float = LOWPASS, resample: float = RESAMPLE, sample: int = 2000,
              recall: float = 0.99, max_false_rate: float = 0.002, seed: int = 0,
              desc: torch.Tensor | None = None) -> dict:
    """The calibrated threshold and its evidence (module doc), for images with no byte-identical pair."""
    start = time.perf_counter()
    n, tiles, prep = unique_uint8.shape[0], TILES[metric], Filter(resolution, blur, lowpass, resample)
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:min(sample, n)])
    originals = unique_uint8[torch.from_numpy(rows)]
    x = prep(originals)
    copies = {}
    for k, kind in enumerate(TRANSFORMS):
        y = prep(transform(originals, kind, np.random.default_rng([seed, k])))
        both = torch.cat([x, y])
        copies[kind] = pair_distances(both, range(len(rows)), range(len(rows), 2 * len(rows)), tiles,
                                      max_shift, resample=resample).numpy()
    desc = descriptors(unique_uint8, metric, blur, resolution, lowpass) if desc is None else desc
    cand = nearest_candidates(desc[torch.from_numpy(rows)], desc, NEIGHBOUR_CANDIDATES, exclude=rows)
    bounds = torch.cat([_bounds_to(x[s:s + 128], unique_uint8[cand[s:s + 128]], tiles, max_shift, prep)
                        for s in range(0, len(rows), 128)])  # (m, K, combos), 128 queries at a time
    low = bounds.amin(2)
    neigh = torch.full(low.shape, float("inf"))  # exact where <= upto (else: only known to exceed upto)
    upto = torch.full(low.shape, -float("inf"))
    # Exact distances where the bound could beat the best so far: the 4 lowest bounds, then the rest under it.
    first = torch.zeros(low.shape, dtype=torch.bool).scatter_(1, low.topk(4, 1, largest=False).indices, True)
    inf = torch.full((len(rows), 1), float("inf"))
    _fill(neigh, upto, first, inf, bounds, x, unique_uint8, cand, tiles, max_shift, prep)
    best = neigh.min(1, keepdim=True).values
    _fill(neigh, upto, low < best, best, bounds, x, unique_uint8, cand, tiles, max_shift, prep)
    nearest = neigh.min(1).values.numpy()
    chosen = _choose(copies, nearest, n, recall, max_false_rate)
    # Every candidate that can be within the threshold, for the expected false pairs.
    t = torch.full((len(rows), 1), chosen["threshold"])
    _fill(neigh, upto, low <= t, t, bounds, x, unique_uint8, cand, tiles, max_shift, prep)
    within = ((neigh > chosen["duplicate_distance"]) & (neigh <= chosen["threshold"])).sum(1).float().mean()
    return chosen | {
        "expected_false_pairs": round(float(n / 2 * within), 1),
        "sample": len(rows), "seed": seed, "neighbour_candidates": int(cand.shape[1]),
        "copy_distances": {k: np.round(v, 5).tolist() for k, v in copies.items()},
        "nearest_distinct": np.round(nearest, 5).tolist(), "seconds": round(time.perf_counter() - start, 2)}


def _bounds_to(x: torch.Tensor, cand_uint8: torch.Tensor, tiles: int, max_shift: int, prep: Filter) -> torch.Tensor:
    """(Q, K, shifts x variants) lower bounds (neardup's per-shift cell means) of the tiled distances of
    preprocessed queries x (Q, C, H, W) to their K candidates (Q, K, C, H, W) uint8, per (shift, variant)."""
    q, k = cand_uint8.shape[:2]
    y = prep(cand_uint8.reshape(q * k, *cand_uint8.shape[2:]))
    moves = [overlap_windows(*x.shape[-2:], dy, dx) for dy, dx in shifts(max_shift)]
    # Every shift's windows from one summed-area table per image set; blurred too for the blur search.
    fa, fb = window_features(x, tiles, [w[0] for w in moves]), window_features(y, tiles, [w[1] for w in moves])
    pairs = [(fa, fb)]
    if prep.resample > 0:
        ga = window_features(gaussian(x, prep.resample), tiles, [w[0] for w in moves])
        gb = window_features(gaussian(y, prep.resample), tiles, [w[1] for w in moves])
        pairs += [(ga, fb), (fa, gb)]  # neardup.variants' order
    # (Q, K, shifts x variants), variant fastest (neardup.combo_distances' order); the tile-max bound.
    sizes = [(r1 - r0, c1 - c0) for r0, r1, c0, c1 in (w[0] for w in moves)]
    out = torch.stack([tile_bound_sq((sa[m][:, None] - sb[m].reshape(q, k, -1)).pow(2), *sizes[m], tiles).sqrt()
                       for m in range(len(moves)) for sa, sb in pairs], 2)
    return out * (1 - 1e-4) - 1e-6  # float slack: it stays a bound


def _fill(neigh, upto, want, limit, bounds, x, unique_uint8, cand, tiles, max_shift, prep: Filter):
    """Distances into neigh (m, K) where `want` and not yet known up to limit (m, 1): the tiled distance
    at the (shift, variant) combinations whose bound is within the limit, 4096 pairs at a time; exact
    where it is within the limit (upto records the limit each entry is exact up to)."""
    qi, ki = (want & (upto < limit)).nonzero(as_tuple=True)
    for s in range(0, len(qi), 4096):
        q, k = qi[s:s + 4096], ki[s:s + 4096]
        y = prep(unique_uint8[cand[q, k]])
        lim = limit[q, 0]
        d = combo_distances(x[q], y, bounds[q, k] <= lim[:, None], tiles, max_shift, prep.resample)
        neigh[q, k] = torch.where(d <= lim, d, torch.full_like(d, float("inf")))
        upto[q, k] = lim


def _choose(copies: dict[str, np.ndarray], nearest: np.ndarray, n: int, recall: float,
            max_false_rate: float) -> dict:
    """The rule of the module doc, and what it predicts."""
    # The data's own duplicates pull nearest-neighbour distances down to copy distances. Whatever lies
    # within what the mildest transformation reaches (t_low) is taken as a duplicate, not as a false
    # pair; the false-pair rate counts the sampled images with a neighbour in (t_low, t].
    t_low = float(max(np.quantile(copies[k], recall, method="higher") for k in IN_PLACE))
    ordered = np.sort(nearest[nearest > t_low])
    allowed = int(np.floor(max_false_rate * len(nearest)))
    # Just under the (allowed + 1)-th nearest-distinct distance above t_low, on the report's 5-decimal grid
    # (so that the rounded threshold stays under the rounded distance too).
    hi = round(round(float(ordered[allowed]), 5) - 1e-5, 5) if allowed < len(ordered) else float(nearest.max())
    lo = float(max(np.quantile(v, recall, method="higher") for v in copies.values()))
    threshold = (lo + hi) / 2 if lo <= hi else hi
    expected_recall = {k: round(float((v <= threshold).mean()), 4) for k, v in copies.items()}
    short = [k for k, r in expected_recall.items() if r < recall]
    rule = (f"midpoint of the copies' {recall:.0%} quantile (worst transformation, {lo:.4f}) and the distinct "
            f"neighbours' {max_false_rate:g} quantile ({hi:.4f})" if lo <= hi else
            f"the distributions overlap: copies need {lo:.4f} for {recall:.0%} recall, distinct neighbours allow "
            f"{hi:.4f} at false rate {max_false_rate:g}; false pairs win, recall falls short for {', '.join(short)}")
    return {
        "threshold": round(threshold, 5), "rule": rule, "separated": lo <= hi, "copies_quantile": lo,
        "distinct_quantile": hi, "recall_target": recall, "max_false_rate": max_false_rate,
        "expected_recall": expected_recall, "recall_short": short,
        "expected_flagged_fraction": round(float((nearest <= threshold).mean()), 5),
        "duplicate_distance": round(t_low, 5), "duplicate_share": round(float((nearest <= t_low).mean()), 5),
        "count": n,
    }


def threshold_picture(record: dict, path) -> None:
    """Histograms of the copy distances (one per transformation) and of the nearest distinct
    neighbours, with the chosen threshold and the expected recall / false pairs in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    values = [np.asarray(v) for v in record["copy_distances"].values()] + [np.asarray(record["nearest_distinct"])]
    top = float(np.quantile(np.concatenate(values), 0.995)) * 1.1
    bins = np.linspace(0, max(top, record["threshold"] * 1.5), 80)
    for kind, v in record["copy_distances"].items():
        ax.hist(np.clip(v, 0, bins[-1]), bins, histtype="step", label=f"{kind} copy (recall {record['expected_recall'][kind]:.1%})")
    ax.hist(np.clip(record["nearest_distinct"], 0, bins[-1]), bins, color="0.6", alpha=0.6,
            label=f"nearest distinct ({record['expected_false_pairs']:g} false pairs expected)")
    ax.axvline(record["threshold"], color="k", ls="--", label=f"threshold {record['threshold']:.4f}")
    ax.set_xlabel("near-duplicate distance (blurred tiled l2, min over shifts)")
    ax.set_ylabel(f"sampled images (of {record['sample']})")
    ax.set_title("dedup.threshold=auto: copies vs nearest distinct neighbour", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
