"""Near-duplicate search split across processes or machines, then merged.

    python -m ambient.defenses.dedup -m dataset=... dedup=near dedup.threshold=0.03 \\
        shard=0/4,1/4,2/4,3/4 shard_dir=/shared/dedup hydra/launcher=submitit_slurm
    python -m ambient.defenses.dedup dataset=... dedup=near dedup.threshold=0.03 merge=true shard_dir=/shared/dedup

Shard k of K computes only the near pairs it owns — those whose smaller row falls in its share of
the rows (neardup.near_pairs: row blocks b with b % K == k; nnsearch.index_pairs: rows i % K == k) —
so the shards partition the pairs and their union is the single-process result (exactly, for the
all-pairs search and the flat index; an HNSW graph built on different machines may differ at the
margin). Each shard writes `dedup-shard-k-of-K.npz` (its pairs and the exact-duplicate edges) and
`.json` (the settings, the threshold, the dataset's fingerprint). The merge refuses a missing shard
and shards made from other data or settings, then groups the pairs as one process would.
With `dedup.threshold=auto` every shard calibrates the same threshold (deterministic, seeded);
calibrating once and passing the number skips that repeated work.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ambient.errors import ConfigError

SHARD_STEM = "dedup-shard-{k}-of-{count}"
_ARRAYS = ("exact_i", "exact_j", "near_i", "near_j", "near_d")


def parse_shard(text) -> tuple[int, int]:
    """`k/K` -> (k, K) with 0 <= k < K, else a ConfigError naming the key."""
    try:
        k, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        k, count = -1, 0
    if not 0 <= k < count:
        raise ConfigError(f"shard={text!r} is invalid; allowed: k/K with 0 <= k < K, e.g. shard=0/4")
    return k, count


def fingerprint(images_uint8: torch.Tensor) -> str:
    """What the shards must agree on: the exact pixels, in order (shape included)."""
    h = hashlib.blake2b(str(tuple(images_uint8.shape)).encode(), digest_size=16)
    h.update(images_uint8.contiguous().numpy().tobytes())
    return h.hexdigest()


def as_settings(cfg) -> dict:
    """A dedup config node as a plain dict (what reports and shard files record)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def save_shard(images_uint8: torch.Tensor, cfg, shard: tuple[int, int], shard_dir, compute) -> Path:
    """Write shard k of K's pairs, from compute() -> (exact edges, near pairs, calibration) (dedup.write_shard);
    a finished shard with the same data and settings is kept (a rerun resumes), one with other data or
    settings is refused, never overwritten."""
    settings = as_settings(cfg)
    k, count = shard
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    stem = shard_dir / SHARD_STEM.format(k=k, count=count)
    meta = {"shard": [k, count], "count": int(images_uint8.shape[0]), "fingerprint": fingerprint(images_uint8),
            "settings": settings}
    meta_file = stem.with_suffix(".json")
    if meta_file.exists():
        before = json.loads(meta_file.read_text())
        if {key: before.get(key) for key in meta} != meta:
            raise FileExistsError(f"{meta_file} holds a shard of other data or settings; use another shard_dir")
        if stem.with_suffix(".npz").exists():
            return stem.with_suffix(".npz")  # finished: a rerun of the same shard does nothing
    (ei, ej), (ni, nj, nd), calibrated = compute()
    meta.update(threshold=(calibrated or {}).get("threshold", settings.get("threshold")), calibration=calibrated,
                near_pairs=int(len(ni)))
    arrays = dict(zip(_ARRAYS, (ei, ej, ni, nj, nd)))
    tmp = stem.with_name(stem.name + ".partial.npz")
    np.savez(tmp, **{key: np.asarray(v) for key, v in arrays.items()})
    meta_file.write_text(json.dumps(meta, indent=2))
    tmp.rename(stem.with_suffix(".npz"))  # the .npz appears only when complete
    return stem.with_suffix(".npz")


def merge_shards(images_uint8: torch.Tensor, cfg, shard_dir) -> tuple[tuple, tuple, dict | None]:
    """(exact edges, near pairs, calibration) of the whole set from its K shard files."""
    shard_dir = Path(shard_dir)
    metas = sorted(shard_dir.glob("dedup-shard-*-of-*.json"))
    if not metas:
        raise FileNotFoundError(f"shard_dir={shard_dir} holds no dedup-shard-*.json (run the shards first)")
    metas = [json.loads(m.read_text()) for m in metas]
    counts = {m["shard"][1] for m in metas}
    if len(counts) != 1:
        raise ValueError(f"shard_dir={shard_dir} mixes shardings of {sorted(counts)} shards")
    count = counts.pop()
    done = {m["shard"][0] for m in metas
            if (shard_dir / (SHARD_STEM.format(k=m["shard"][0], count=count) + ".npz")).exists()}
    missing = sorted(set(range(count)) - done)
    if missing:
        raise FileNotFoundError(f"shard_dir={shard_dir}: shards {missing} of {count} are missing or unfinished")
    want = {"count": int(images_uint8.shape[0]), "fingerprint": fingerprint(images_uint8), "settings": as_settings(cfg)}
    for m in metas:
        if any(m[key] != v for key, v in want.items()):
            bad = [key for key, v in want.items() if m[key] != v]
            raise ValueError(f"shard {m['shard'][0]}/{count} in {shard_dir} was made from other {' and '.join(bad)} "
                             "than this merge's dataset and dedup settings")
    if len({json.dumps(m["threshold"]) for m in metas}) != 1:
        raise ValueError(f"the shards in {shard_dir} used different thresholds: {[m['threshold'] for m in metas]}")
    parts = [np.load(shard_dir / (SHARD_STEM.format(k=k, count=count) + ".npz"), allow_pickle=False)
             for k in range(count)]
    exact = (parts[0]["exact_i"], parts[0]["exact_j"])  # every shard hashes the whole set: the same edges
    near = tuple(np.concatenate([p[key] for p in parts]) for key in ("near_i", "near_j", "near_d"))
    order = np.lexsort((near[1], near[0]))  # the single-process order: by (i, j)
    return exact, tuple(a[order] for a in near), metas[0]["calibration"]
