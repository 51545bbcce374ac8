"""Deduplication defense: duplicated training images are far more likely to be extracted
(Carlini et al. 2023, arXiv 2301.13188), so train on one copy of each.

    python train.py dedup=near corruption=mask60          # dedup before the member/holdout split
    python -m ambient.defenses.dedup dataset=imagefolder dataset.path=DIR dedup=near    # report only
    python train.py experiment=smoke dedup=exact 'dataset.duplicate={count: 5, times: 10, seed: 0}'

`exact`: identical pixels after the dataset's own resize (hashed bytes). `near`: the blurred,
shift-tolerant tiled l2 of ambient/neardup.py under `dedup.threshold`. Groups are not chained
(ambient/defenses/grouping.py): every member lies within the threshold of its group's kept image,
the smallest stable index.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ambient import rundir
from ambient.config import DEDUP_KINDS, DEDUP_METRICS, DEDUP_SEARCH
from ambient.data import ImageSet
from ambient.errors import ConfigError
from ambient.defenses.calibrate import calibrate, descriptors, threshold_picture
from ambient.defenses.grouping import leader_groups, left_out
from ambient.defenses.neardup import (
    LOWPASS,
    RESAMPLE,
    TILES,
    near_pairs,
    pair_distances,
    preprocess,
)
from ambient.defenses.nnsearch import index_pairs
from ambient.defenses.shards import as_settings, merge_shards, parse_shard, save_shard
from ambient.images import save_grid


def _exact_edges(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Edges linking every image to the first row with byte-identical pixels (exact duplicates)."""
    first: dict[bytes, int] = {}
    rows = [first.setdefault(hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest(), r)
            for r, img in enumerate(images.contiguous())]
    i = np.asarray(rows)
    j = np.arange(len(rows))
    return i[i != j], j[i != j]


def duplicate_pairs(images_uint8: torch.Tensor, threshold: float | str = "auto", metric: str = "tiled",
                    block_size: int = 1024, max_shift: int = 1, blur: int = 1, resolution: int = 32,
                    calibration: dict | None = None, search: str = "auto", index: str = "auto",
                    neighbours: int = 16, index_above: int = 1000,
                    progress: bool = False, lowpass: float = LOWPASS,
                    resample: float = RESAMPLE, shard: tuple[int, int] = (0, 1)) -> tuple[tuple, tuple, dict | None]:
    """Exact edges (copy -> first row with its pixels), the near pairs (i, j, distance) within the
    threshold between first rows of exact classes (a copy is as close as its original), and the
    calibration record when threshold="auto" (ambient/defenses/calibrate.py). search: `exact` (all
    pairs, neardup.near_pairs), `index` (ambient/defenses/nnsearch.py), `auto` (index above
    `index_above` distinct images, when faiss is installed). shard=(k, K): only the near pairs shard k
    owns (ambient/defenses/shards.py); the K shards' pairs together are the whole set's."""
    if metric not in DEDUP_METRICS:
        raise ValueError(f"dedup.metric={metric!r}; allowed: {' | '.join(DEDUP_METRICS)}")
    if search not in DEDUP_SEARCH:
        raise ValueError(f"dedup.search={search!r}; allowed: {' | '.join(DEDUP_SEARCH)}")
    n = images_uint8.shape[0]
    ei, ej = _exact_edges(images_uint8)
    # Compare only one image of each exact class: a thousand copies cost one row, not a million pairs.
    unique = np.setdiff1d(np.arange(n), ej)
    images = images_uint8[torch.from_numpy(unique)]
    # auto: the index above index_above distinct images, when faiss is installed (else all pairs, exact).
    use_index = search == "index" or (search == "auto" and len(unique) > index_above
                                      and importlib.util.find_spec("faiss") is not None)
    desc = descriptors(images, metric, blur, resolution, lowpass) if use_index or threshold == "auto" else None
    calibrated = None
    if threshold == "auto":
        calibrated = calibrate(images, metric, max_shift, blur, resolution, lowpass, resample, **(calibration or {}),
                               desc=desc)
        threshold = calibrated["threshold"]
    if use_index:
        ni, nj, nd = index_pairs(images, threshold, desc, metric, max_shift, blur, resolution, neighbours, index,
                                 progress=progress, lowpass=lowpass, resample=resample, shard=shard)
    else:
        x = preprocess(images, resolution, blur, lowpass)
        ni, nj, nd = near_pairs(x, threshold, TILES[metric], max_shift, block_size, progress, resample, shard)
    return (ei, ej), (unique[ni], unique[nj], nd), calibrated


def _groups(n: int, exact, near, priority, grouping: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Groups (grouping.py) over exact classes: each class is one node, its members join its group.
    Returns the groups (rows) and each row's kept row."""
    ei, ej = (np.asarray(a, np.int64) for a in exact)
    cls = np.arange(n)
    cls[ej] = ei  # exact edges link every copy to its class's first row
    priority = np.asarray(priority, np.int64)
    prio = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(prio, cls, priority)  # a class keeps its smallest-priority member
    _, label = leader_groups(n, *near, priority=prio, grouping=grouping)
    kept_row = np.full(n, -1)
    order = np.argsort(priority, kind="stable")[::-1]
    kept_row[cls[order]] = order  # each class's smallest-priority row (written last wins)
    keeper = kept_row[label[cls]]
    nodes = np.flatnonzero(keeper != np.arange(n))
    return _split(np.r_[nodes, keeper[nodes]], keeper), keeper


def _split(rows: np.ndarray, keeper: np.ndarray) -> list[np.ndarray]:
    """Rows grouped by kept row, largest groups first, then by first row."""
    rows = np.unique(rows)
    order = np.argsort(keeper[rows], kind="stable")
    rows = rows[order]
    parts = np.split(rows, np.flatnonzero(np.diff(keeper[rows])) + 1) if len(rows) else []
    return sorted((np.sort(g) for g in parts if len(g) > 1), key=lambda g: (-len(g), g[0]))


def find_duplicate_groups(images_uint8: torch.Tensor, method: str = "exact", threshold: float | str = "auto",
                          metric: str = "tiled", block_size: int = 1024, max_shift: int = 1, blur: int = 1,
                          resolution: int = 32, grouping: str = "kept", priority=None,
                          progress: bool = False, **search) -> list[np.ndarray]:
    """Duplicate groups as lists of rows (each sorted, size >= 2), for `exact` or `near`; `search`:
    lowpass, resample, calibration, search, index, neighbours, index_above (duplicate_pairs)."""
    return _find(images_uint8, method, threshold, metric, block_size, max_shift, blur, resolution, grouping,
                 priority, progress, **search)[0]


def _find(images_uint8, method, threshold="auto", metric="tiled", block_size=1024, max_shift=1, blur=1,
          resolution=32, grouping="kept", priority=None, progress=False, **search):
    """find_duplicate_groups, plus each row's kept row, the near pairs and the calibration (for the report)."""
    if method not in DEDUP_KINDS[1:]:
        raise ValueError(f"dedup.kind={method!r}; allowed: {' | '.join(DEDUP_KINDS[1:])}")
    n = images_uint8.shape[0]
    priority = np.arange(n) if priority is None else np.asarray(priority)
    calibrated = None
    if method == "exact":
        exact, near = _exact_edges(images_uint8), (np.zeros(0, np.int64),) * 2 + (np.zeros(0),)
    else:
        exact, near, calibrated = duplicate_pairs(images_uint8, threshold, metric, block_size, max_shift, blur,
                                                  resolution, progress=progress, **search)
    groups, keeper = _groups(n, exact, near, priority, grouping)
    return groups, keeper, near, calibrated


def dedup_kind(cfg) -> str:
    """The selector of a `dedup` node: `kind` (runs saved before it was renamed: `method`)."""
    return str((cfg or {}).get("kind") or (cfg or {}).get("method") or "none")


def dedup_label(cfg) -> str:
    """How the comparison table names a dedup setting ("" when off)."""
    kind = dedup_kind(cfg if isinstance(cfg, dict) else {"kind": cfg})
    if kind.lower() in ("", "none", "false", "null"):
        return ""
    threshold = cfg.get("threshold") if isinstance(cfg, dict) else None
    return f"dedup {kind}" + (f" ({threshold:g})" if isinstance(threshold, (int, float)) else
                              f" ({threshold})" if isinstance(threshold, str) else "")


def _params(cfg) -> dict:
    """The near/exact settings of a `dedup` config node as find_duplicate_groups arguments."""
    keys = ("threshold", "metric", "block_size", "max_shift", "blur", "lowpass", "resample", "resolution", "grouping",
            "calibration", "search", "index", "neighbours", "index_above")
    params = {"method": dedup_kind(cfg), **{k: cfg[k] for k in keys if cfg.get(k) is not None}}
    if "blur" in params and "lowpass" not in params:  # settings saved before dedup.lowpass: neither filter then
        params.update(lowpass=0.0, resample=0.0)
    return params


def _distances(images: torch.Tensor, group: np.ndarray, kept_row: int, params: dict) -> list[float]:
    """Each member's distance to the kept image (0 for exact groups), for the report."""
    if params["method"] == "exact":
        return [0.0] * len(group)
    x = preprocess(images[torch.from_numpy(group)], params.get("resolution", 32), params.get("blur", 1),
                   params.get("lowpass", LOWPASS))
    pos = int(np.flatnonzero(group == kept_row)[0])
    d = pair_distances(x, [pos] * len(group), range(len(group)), TILES[params.get("metric", "tiled")],
                       params.get("max_shift", 1), resample=params.get("resample", RESAMPLE))
    return [round(float(v), 5) for v in d]


def deduplicate(data: ImageSet, cfg, progress: bool = False, pairs: tuple | None = None) -> tuple[ImageSet, dict]:
    """The training set without duplicates, and a JSON-ready record of what was removed and why.
    pairs: (exact edges, near pairs, calibration) found already (shards.merge_shards): no search."""
    cfg = as_settings(cfg or {})
    method = dedup_kind(cfg)
    params = _params(cfg) if method != "none" else {}
    indices = data.indices.numpy()
    if method == "none":
        groups, keeper, near, calibrated = [], np.arange(len(data)), (np.zeros(0, np.int64),) * 2 + (np.zeros(0),), None
    elif pairs is not None:
        exact, near, calibrated = pairs
        groups, keeper = _groups(len(data), exact, near, indices, params.get("grouping", "kept"))
    else:
        groups, keeper, near, calibrated = _find(data.images, **params, priority=indices, progress=progress)
    entries, dropped = [], []
    for g in groups:
        kept_row = int(keeper[g[0]])  # smallest stable index of its group: the same whatever the row order
        entries.append({
            "kept": int(indices[kept_row]),
            "members": indices[g].tolist(),
            "paths": [data.paths[r] for r in g] if data.paths else None,
            "source_index": data.source_index[g].tolist() if data.source_index is not None else None,
            "distance_to_kept": _distances(data.images, g, kept_row, params),
        })
        dropped += [int(r) for r in g if r != kept_row]
    rows = np.setdiff1d(np.arange(len(data)), dropped)
    count, closest = left_out(*near, keeper)
    for pair in closest:  # rows -> stable indices
        pair["indices"] = [int(indices[r]) for r in pair.pop("rows")]
    report = {
        "method": method, "settings": cfg,
        "metric": params.get("metric") if method == "near" else None,
        # The threshold used: the calibrated one under threshold=auto (settings.threshold says "auto").
        "threshold": (calibrated or {}).get("threshold", params.get("threshold")) if method == "near" else None,
        "calibration": calibrated,
        "grouping": params.get("grouping", "kept") if method == "near" else None,
        "count_before": len(data), "count_after": len(rows), "removed": len(dropped),
        "removed_indices": sorted(indices[dropped].tolist()),
        "near_pairs": len(near[0]),
        # Pairs within the threshold whose images ended in different groups (what chaining would merge).
        "pairs_left_out": count, "pairs_left_out_closest": closest,
        "largest_group": max((len(g) for g in groups), default=0),
        "groups": entries,
        "planted_copies": _planted(data),
    }
    return data.select(rows), report


def _planted(data: ImageSet) -> dict[str, int] | None:
    """Copy index -> the original it was planted from (dataset.duplicate), for the evaluator."""
    if data.source_index is None:
        return None
    copies = data.planted_copy.nonzero().flatten().tolist()
    return {str(int(data.indices[r])): int(data.source_index[r]) for r in copies}


def duplicate_map(report: dict) -> dict[int, list[int]]:
    """Kept index -> every training index it stands for (TrainingImages.copies in the attack)."""
    return {int(g["kept"]): [int(m) for m in g["members"]] for g in report["groups"]}


def write_report(report: dict, images: ImageSet, out_dir, max_groups: int = 16,
                 max_members: int = 12) -> tuple[Path, Path | None]:
    """Dedup.json plus dedup.png (largest groups, one row each, kept image first) and, when the
    threshold was calibrated, dedup_threshold.png (the two distributions and the threshold)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    # An existing different report is never overwritten; the same report again (a resume) is kept.
    stem, existed = rundir.free_stem(out_dir, rundir.DEDUP, (".json",), same_text=text)
    path, picture = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    if not existed:
        path.write_text(text)
    if report.get("calibration") and not (out_dir / f"{stem}{rundir.DEDUP_THRESHOLD}").exists():
        threshold_picture(report["calibration"], out_dir / f"{stem}{rundir.DEDUP_THRESHOLD}")
    groups = report["groups"][:max_groups]
    if not groups:
        return path, None
    if not existed or not picture.exists():
        _group_grid(groups, images, picture, max_members)
    return path, picture


def _group_grid(groups: list[dict], images: ImageSet, path: Path, max_members: int) -> Path:
    """One row per group, padded with white, so the removed copies can be checked by eye."""
    row_of = {int(idx): r for r, idx in enumerate(images.indices.tolist())}
    cols = min(max_members, max(len(g["members"]) for g in groups))
    blank = torch.ones(images.images.shape[1:])
    tiles = []
    for g in groups:
        order = [g["kept"]] + [m for m in g["members"] if m != g["kept"]]
        row = [images.images[row_of[m]].float() / 255 for m in order[:cols]]
        tiles += row + [blank] * (cols - len(row))
    return save_grid(torch.stack(tiles), path, nrow=cols)


def prepare_training_set(cfg: DictConfig, data: ImageSet, run_dir=None) -> tuple[ImageSet, dict]:
    """Train()'s dedup step: dedup as configured, write the report (main process passes run_dir), and return
    what the model settings need to rebuild the training set and map copies back.
    """
    dedup_cfg = cfg.get("dedup") or {"kind": "none"}
    entry = {"method": dedup_kind(dedup_cfg), "groups_file": None,
             "duplicate": OmegaConf.to_container(cfg.dataset, resolve=True).get("duplicate")}
    if entry["method"] == "none" and data.source_index is None:
        return data, entry
    kept, report = deduplicate(data, dedup_cfg, progress=True)
    name = f"{rundir.DEDUP}.json"
    if run_dir is not None:
        name = write_report(report, data, run_dir)[0].name
    entry.update(groups_file=name, settings=report["settings"], count_before=report["count_before"],
                 count_after=report["count_after"])
    return kept, entry


def write_shard(images_uint8: torch.Tensor, cfg, shard: tuple[int, int], shard_dir, progress: bool = False) -> Path:
    """Shard k of K of the near-pair search (ambient/defenses/shards.py), written to shard_dir."""
    settings = as_settings(cfg)
    if dedup_kind(settings) != "near":
        raise ConfigError(f"dedup.kind={dedup_kind(settings)!r} cannot be sharded; allowed: near (exact is one hash pass)")
    params = {key: v for key, v in _params(settings).items() if key not in ("method", "grouping")}
    return save_shard(images_uint8, settings, shard, shard_dir,
                      lambda: duplicate_pairs(images_uint8, **params, shard=shard, progress=progress))


# Hydra app: python -m ambient.defenses.dedup dataset=... dedup=near  (config conf/dedup_app.yaml).
def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ambient.config import validate_dataset, validate_dedup
    from ambient.data import load_dataset

    validate_dataset(cfg)
    validate_dedup(cfg)
    shard = parse_shard(cfg.shard) if cfg.get("shard") is not None else None
    if shard is not None and cfg.get("merge"):
        raise ConfigError(f"shard={cfg.shard!r} with merge=true; allowed: one of them (shards first, then one merge)")
    out = Path(HydraConfig.get().runtime.output_dir)
    data = load_dataset(cfg.dataset)
    if shard is not None:
        path = write_shard(data.images, cfg.dedup, shard, cfg.shard_dir, progress=True)
        print(f"shard {shard[0]}/{shard[1]}: {path}  (merge with merge=true shard_dir={cfg.shard_dir})")
        return
    pairs = merge_shards(data.images, cfg.dedup, cfg.shard_dir) if cfg.get("merge") else None
    _, report = deduplicate(data, cfg.dedup, progress=True, pairs=pairs)
    if pairs is not None:
        report["merged_from"] = str(cfg.shard_dir)
    path, picture = write_report(report, data, out)
    print(f"{report['count_before']} images -> {report['count_after']} after dedup={report['method']} "
          f"({len(report['groups'])} groups)")
    if report.get("calibration"):
        cal = report["calibration"]
        print(f"threshold: {cal['threshold']} (auto: {cal['rule']}; expected recall {cal['expected_recall']}, "
              f"~{cal['expected_false_pairs']:g} false pairs)  {path.with_name(path.stem + rundir.DEDUP_THRESHOLD)}")
    print(f"report:  {path}")
    print(f"picture: {picture or '(no duplicates found)'}")


def main() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path="../../conf", config_name="dedup_app")(_app)()


if __name__ == "__main__":
    main()
