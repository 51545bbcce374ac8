"""Near-duplicate dedup on 50,000 Fashion-MNIST images (32 px, zero-padded) plus 500 planted copies
(100 each: exact, JPEG q75, 1-px shift, Gaussian noise sigma 5/255, resize 32->24->32), same run:

    python benchmarks/dedup.py --part main             # baseline + the default (~10 min on 2 busy cores)
    python benchmarks/dedup.py --part scaling          # all pairs vs index at 5k/10k/20k: crossover, index recall
    python benchmarks/dedup.py --part large --n 100000 # real + synthetic images, index path: time, peak RSS
    python benchmarks/dedup.py --part imagededup       # the peer users pick: imagededup PHash / DHash, same images

baseline   : the previous default: threshold 0.06, 3x3 box blur, no low-pass, no blur search, all pairs,
             connected components (chains)
auto/index : the default now: dedup.threshold=auto (calibrated here, included in the time), lowpass 1,
             blur search (resample 0.8), grouped without chaining (kept image), faiss index search
scaling    : exact (all pairs) vs index at the calibrated threshold, seconds and the index's recall of
             the all-pairs pairs (the crossover sets dedup.index_above)
large      : Fashion-MNIST train+test (70k) plus synthetic images (blends of two flipped real images, no
             planted copies) up to --n, the default settings; seconds and peak RSS (ru_maxrss)
imagededup : imagededup's PHash and DHash (`pip install imagededup`, an optional benchmark dependency) on
             the same uint8 arrays: encode + find_duplicates (one distance worker), at their default Hamming
             threshold 10 and tighter ones (--hash-thresholds); the same recall / false pairs / groups
Prints per run: seconds, peak RSS so far, recall per planted kind, non-planted pairs flagged,
images removed, largest group, pairs left out by the no-chaining rule. Writes to --out: the calibration
picture, and the 20 closest non-planted pairs (left image | right image per row) to be checked by eye.
Caveat: the planted kinds (but exact) are the calibration's own transformations (other images,
other seeds): the recall printed is the calibration's promise checked, not an independent test.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from ambient.data import load_fashion_mnist
from ambient.defenses.calibrate import threshold_picture, transform
from ambient.defenses.dedup import _groups, duplicate_pairs
from ambient.images import save_grid

KINDS = ("exact", "jpeg", "shift", "noise", "resize")


def planted_set(n: int, per_kind: int, seed: int = 123) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    """n Fashion-MNIST train images + per_kind copies of each kind: images, copy rows, their sources, kinds."""
    base = load_fashion_mnist(None, "train", 32, 1).images[:n]
    rng = np.random.default_rng(seed)
    sources = rng.permutation(n)[:per_kind * len(KINDS)]
    copies, kinds = [], []
    for k, kind in enumerate(KINDS):
        src = base[torch.from_numpy(sources[k * per_kind:(k + 1) * per_kind])]
        copies.append(src.clone() if kind == "exact" else transform(src, kind, rng))
        kinds += [kind] * per_kind
    images = torch.cat([base, *copies])
    return images, n + np.arange(len(sources)), sources, kinds


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run(images, copy_rows, sources, kinds, **settings) -> dict:
    n = images.shape[0]
    grouping = settings.pop("grouping")
    start = time.perf_counter()
    exact, near, cal = duplicate_pairs(images, **settings)
    searched = time.perf_counter()
    groups, keeper = _groups(n, exact, near, np.arange(n), grouping)
    seconds = time.perf_counter() - start
    return summarize(groups, keeper, near, copy_rows, sources, kinds) | {
        "seconds": seconds, "search_seconds": searched - start, "peak_gib": peak_gib(),
        "threshold": cal["threshold"] if cal else settings["threshold"], "calibration": cal,
        "exact": exact, "near": near}


def summarize(groups, keeper, near, copy_rows, sources, kinds) -> dict:
    """Recall per planted kind, non-planted pairs, removed images, largest group, pairs left out."""
    found = keeper[copy_rows] == keeper[sources]
    planted = {(min(int(s), int(c)), max(int(s), int(c))) for s, c in zip(sources, copy_rows)}
    i, j, d = near
    false = np.array([(int(a), int(b)) not in planted for a, b in zip(i, j)], dtype=bool)
    label = keeper
    return {
        "recall": {k: float(found[np.asarray(kinds) == k].mean()) for k in KINDS},
        "false_pairs": int(false.sum()), "false": (i[false], j[false], d[false]),
        "removed": int(sum(len(g) - 1 for g in groups)), "largest": max((len(g) for g in groups), default=0),
        "left_out": int((label[i] != label[j]).sum()), "pairs": set(zip(i.tolist(), j.tolist())),
    }


def line(name: str, r: dict, base: dict | None = None) -> str:
    recall = " ".join(f"{k} {v:6.1%}" for k, v in r["recall"].items())
    ratio = f"  ({base['seconds'] / r['seconds']:.1f}x baseline)" if base else ""
    return (f"{name:<13} t={r['threshold']:.4f}  {r['seconds']:7.1f} s{ratio}  peak RSS {r['peak_gib']:.2f} GiB\n"
            f"{'':13} recall: {recall}\n"
            f"{'':13} non-planted pairs {r['false_pairs']:6d}   removed {r['removed']:5d}   largest group "
            f"{r['largest']:4d}   pairs left out (no chaining) {r['left_out']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("main", "scaling", "large", "imagededup"), default="main")
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--scaling", default="5000,10000,20000", help="n for the exact-vs-index timing")
    parser.add_argument("--threshold", type=float, default=None, help="scaling: fixed threshold (else calibrated)")
    parser.add_argument("--hash-thresholds", default="10,6,2", help="imagededup: Hamming thresholds (default 10 first)")
    parser.add_argument("--out", default="outputs/benchmarks/dedup")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    print(f"device: CPU, {torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.1f}")
    if args.part == "large":
        return large(args.n)
    print(f"Fashion-MNIST train[:{args.n}] at 32 px + {args.per_kind} planted copies x {len(KINDS)} kinds")
    images, copy_rows, sources, kinds = planted_set(args.n, args.per_kind)
    if args.part == "scaling":
        return scaling(images, args)
    if args.part == "imagededup":
        return hashes(images, copy_rows, sources, kinds, [int(t) for t in args.hash_thresholds.split(",")])

    base = run(images, copy_rows, sources, kinds, threshold=0.06, blur=3, lowpass=0.0, resample=0.0,
               search="exact", grouping="connected")
    print(line("baseline", base))
    auto = run(images, copy_rows, sources, kinds, threshold="auto", search="index", grouping="kept")
    cal = auto["calibration"]
    print(f"calibration ({cal['seconds']:.1f} s, {cal['sample']} sampled images): {cal['rule']}\n  expected recall "
          f"{cal['expected_recall']}, expected false pairs {cal['expected_false_pairs']}")
    threshold_picture(cal, out / "dedup_threshold.png")
    print(line("auto/index", auto, base))
    fi, fj, fd = auto["false"]
    order = np.argsort(fd)[:20]
    if len(order):
        tiles = torch.stack([images[int(r)].float() / 255 for k in order for r in (fi[k], fj[k])])
        save_grid(tiles, out / "closest_non_planted.png", nrow=2)
        print("20 closest non-planted pairs (distances):", np.round(fd[order], 4).tolist())
    print(f"pictures: {out / 'dedup_threshold.png'}  {out / 'closest_non_planted.png'}")


def scaling(images, args) -> None:
    """All pairs vs the index at growing n, at one threshold: seconds, ratio, the index's recall."""
    t = args.threshold
    if t is None:
        t = duplicate_pairs(images, "auto", search="index")[2]["threshold"]
    print(f"scaling (threshold {t:.4f}, search only, default metric):")
    for m in [int(v) for v in args.scaling.split(",") if v]:
        sub = images[:m]
        t0 = time.perf_counter()
        _, pe, _ = duplicate_pairs(sub, t, search="exact")
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, pi, _ = duplicate_pairs(sub, t, search="index")
        ti = time.perf_counter() - t0
        se, si = set(zip(pe[0].tolist(), pe[1].tolist())), set(zip(pi[0].tolist(), pi[1].tolist()))
        print(f"  n={m:>7}: exact {te:6.1f} s   index {ti:6.1f} s   exact/index {te / ti:5.2f}x   "
              f"index recall {len(se & si)}/{len(se)}   peak RSS {peak_gib():.2f} GiB", flush=True)


def hashes(images, copy_rows, sources, kinds, thresholds: list[int]) -> None:
    """imagededup's perceptual hashes on the same images: one search at the loosest threshold with
    scores, then every threshold read from it; groups are connected components of the pairs (what
    find_duplicates' output implies), removals by imagededup's own get_files_to_remove."""
    from imagededup.methods import DHash, PHash
    from imagededup.utils.general_utils import get_files_to_remove
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(images)
    arrays = images[:, 0].numpy()
    for method in (PHash(verbose=False), DHash(verbose=False)):
        start = time.perf_counter()
        encoding = {str(r): method.encode_image(image_array=arrays[r]) for r in range(n)}
        encoded = time.perf_counter()
        found = method.find_duplicates(encoding_map=encoding, max_distance_threshold=max(thresholds), scores=True,
                                       num_dist_workers=1)
        seconds = time.perf_counter() - start
        rows, cols, dists = [], [], []
        for name, hits in found.items():
            a = int(name)
            for other, d in hits:
                if a < int(other):
                    rows.append(a), cols.append(int(other)), dists.append(int(d))
        i, j, d = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), np.array(dists)
        del rows, cols, dists
        print(f"{type(method).__name__}: encode {encoded - start:.1f} s + search {seconds - (encoded - start):.1f} s "
              f"= {seconds:.1f} s (Hamming <= {max(thresholds)}), peak RSS {peak_gib():.2f} GiB", flush=True)
        key = i * n + j
        low, high = np.minimum(sources, copy_rows), np.maximum(sources, copy_rows)
        planted_key = low.astype(np.int64) * n + high
        for t in sorted(thresholds, reverse=True):
            keep = d <= t
            hit = np.isin(planted_key, key[keep])
            recall = {k: float(hit[np.asarray(kinds) == k].mean()) for k in KINDS}
            false = int(keep.sum() - np.isin(key[keep], planted_key).sum())
            graph = coo_matrix((np.ones(int(keep.sum())), (i[keep], j[keep])), shape=(n, n))
            _, labels = connected_components(graph, directed=False)
            merged = int(n - len(np.unique(labels)))
            removed = f", get_files_to_remove {len(get_files_to_remove(found)):,}" if t == max(thresholds) else ""
            print(f"  Hamming <= {t:2d}: recall " + " ".join(f"{k} {v:6.1%}" for k, v in recall.items())
                  + f"\n{'':18}pairs {int(keep.sum()):,}, non-planted {false:,}, images merged away {merged:,}"
                  f", largest group {int(np.bincount(labels).max()):,}{removed}", flush=True)
        del found, encoding, i, j, d


def large(n: int) -> None:
    """The default run (calibration + index) on n images: Fashion-MNIST train + test, then synthetic
    blends a * 0.6 + flip(b) * 0.4 of random real pairs (seeded), to n."""
    real = torch.cat([load_fashion_mnist(None, split, 32, 1).images for split in ("train", "test")])
    rng = np.random.default_rng(0)
    parts, have = [real[:n]], min(n, len(real))
    while have < n:  # in chunks: the float work never holds the whole set
        m = min(65536, n - have)
        a, b = (torch.from_numpy(rng.integers(0, len(real), m)) for _ in range(2))
        blend = real[a].float() * 0.6 + real[b].flip(-1).float() * 0.4
        parts.append(blend.round().clamp(0, 255).to(torch.uint8))
        have += m
    images = torch.cat(parts)
    del parts
    print(f"large: {n} images ({min(n, len(real))} real), uint8 {images.numel() / 2**30:.2f} GiB; "
          f"peak RSS after building them {peak_gib():.2f} GiB")
    start = time.perf_counter()
    exact, near, cal = duplicate_pairs(images, "auto", search="index")
    seconds = time.perf_counter() - start
    print(f"  default run (calibration {cal['seconds']:.0f} s + index): {seconds:.0f} s, threshold {cal['threshold']:.4f}, "
          f"{len(exact[0])} exact + {len(near[0])} near pairs, peak RSS {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
