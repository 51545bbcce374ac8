"""Near-duplicate dedup on 50,000 Fashion-MNIST images (32 px, zero-padded) plus 500 planted copies
(100 each: exact, JPEG q75, 1-px shift, Gaussian noise sigma 5/255, resize 32->24->32), same run:

    python benchmarks/dedup.py                         # ~10 min on 2 busy CPU cores
    python benchmarks/dedup.py --n 10000 --scaling 2000,5000 --out /tmp/dd

baseline : the previous default, threshold 0.06, all-pairs search, connected components (chains)
auto/*   : dedup.threshold=auto (calibrated here, included in auto/index's time), grouped without
           chaining (kept image), searched by the faiss index (index) and by all pairs (exact: the
           baseline's pairs within the calibrated threshold, so one n^2 search serves both); index
           recall is vs exact's pairs.
Prints per run: seconds, peak RSS so far, recall per planted kind, non-planted pairs flagged,
images removed, largest group, pairs left out by the no-chaining rule; then the scaling of the two
searches at smaller n (the crossover). Writes to --out: the calibration picture, and the 20
closest non-planted pairs (left image | right image per row) to be checked by eye.
Caveat: the planted kinds (but exact) are the calibration's own transformations (other images,
other seeds): the recall printed is the calibration's promise checked, not an independent test.
"""
from __future__ import annotations

import argparse
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


def regroup(base: dict, t: float, n: int, copy_rows, sources, kinds) -> dict:
    """The exact (all-pairs) result at threshold t <= the baseline's, from the baseline's pairs."""
    i, j, d = base["near"]
    keep = d <= t
    near = (i[keep], j[keep], d[keep])
    start = time.perf_counter()
    groups, keeper = _groups(n, base["exact"], near, np.arange(n), "kept")
    return summarize(groups, keeper, near, copy_rows, sources, kinds) | {
        "seconds": base["search_seconds"] + time.perf_counter() - start, "search_seconds": base["search_seconds"],
        "peak_gib": peak_gib(), "threshold": t, "calibration": None}


def line(name: str, r: dict, base: dict | None = None) -> str:
    recall = " ".join(f"{k} {v:6.1%}" for k, v in r["recall"].items())
    ratio = f"  ({base['seconds'] / r['seconds']:.1f}x baseline)" if base else ""
    return (f"{name:<13} t={r['threshold']:.4f}  {r['seconds']:7.1f} s{ratio}  peak RSS {r['peak_gib']:.2f} GiB\n"
            f"{'':13} recall: {recall}\n"
            f"{'':13} non-planted pairs {r['false_pairs']:6d}   removed {r['removed']:5d}   largest group "
            f"{r['largest']:4d}   pairs left out (no chaining) {r['left_out']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--scaling", default="5000,10000,20000", help="n for the exact-vs-index timing")
    parser.add_argument("--out", default="outputs/benchmarks/dedup")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    print(f"device: CPU, {torch.get_num_threads()} torch threads; Fashion-MNIST train[:{args.n}] at 32 px "
          f"+ {args.per_kind} planted copies x {len(KINDS)} kinds")
    images, copy_rows, sources, kinds = planted_set(args.n, args.per_kind)

    base = run(images, copy_rows, sources, kinds, threshold=0.06, search="exact", grouping="connected")
    print(line("baseline", base))
    auto_index = run(images, copy_rows, sources, kinds, threshold="auto", search="index", grouping="kept")
    cal = auto_index["calibration"]
    print(f"calibration ({cal['seconds']:.1f} s, {cal['sample']} sampled images): {cal['rule']}\n  expected recall {cal['expected_recall']}, expected false pairs "
          f"{cal['expected_false_pairs']}")
    threshold_picture(cal, out / "dedup_threshold.png")
    print(line("auto/index", auto_index, base))
    t = auto_index["threshold"]
    # All pairs at t are the baseline's pairs (all within 0.06 >= t) with d <= t: no second n^2 search.
    exact = regroup(base, t, images.shape[0], copy_rows, sources, kinds)
    print(line("auto/exact", exact, base) + "   (search time: the baseline's, at 0.06)")
    hit = len(auto_index["pairs"] & exact["pairs"])
    index_search = auto_index["search_seconds"] - cal["seconds"]
    print(f"index recall vs all pairs at t={t:.4f}: {hit}/{len(exact['pairs'])} = "
          f"{hit / max(1, len(exact['pairs'])):.2%}; index search {index_search:.1f} s (without calibration) vs "
          f"all pairs {exact['search_seconds']:.1f} s ({exact['search_seconds'] / index_search:.1f}x)")

    fi, fj, fd = exact["false"]
    order = np.argsort(fd)[:20]
    if len(order):
        tiles = torch.stack([images[int(r)].float() / 255 for k in order for r in (fi[k], fj[k])])
        save_grid(tiles, out / "closest_non_planted.png", nrow=2)
        print("20 closest non-planted pairs (distances):", np.round(fd[order], 4).tolist())

    print("\nscaling (threshold fixed at the calibrated value, search only):")
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
              f"index recall {len(se & si)}/{len(se)}")
    print(f"pictures: {out / 'dedup_threshold.png'}  {out / 'closest_non_planted.png'}")


if __name__ == "__main__":
    main()
