"""The extraction attack on a set of generations (Carlini et al. 2023), as one report dict.

Input: generations grouped by prompt, and the training images, all in [0, 1]. Output: the
figures for report.json plus the pairs the picture shows. Thresholds come from `attack` config
keys whose defaults are the papers' values (conf/evaluate.yaml names the sources).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ambient.attack.cliques import Clique, find_cliques
from ambient.attack.distances import normalized_l2
from ambient.attack.extraction import (
    adaptive_extraction,
    clique_precision,
    gu_ratio,
    verify_extraction,
)
from ambient.attack.features import (
    InceptionFeatures,
    RandomProjectionFeatures,
    extract_features,
    pixel_features,
)
from ambient.attack.quality import fid, kid
from ambient.attack.replication import feature_replication


@dataclass
class TrainingImages:
    """Training images in [0, 1] with their stable indices, optional paths and duplicate counts."""

    images: torch.Tensor
    indices: list[int]
    paths: list[str] | None = None
    copies: dict[int, list[int]] | None = None  # index -> every original index it stands for (dedup)


def feature_extractor(cfg, device):
    """FID/KID features: Inception when local weights are given, else a documented offline default."""
    if cfg.get("inception_weights"):
        return InceptionFeatures(cfg.inception_weights, device), "inception_v3"
    if cfg.features == "pixels":
        return pixel_features, "pixels"
    return RandomProjectionFeatures(dim=256, resolution=16, seed=0), "random_projection_256"


def _cliques_by_prompt(generations: dict[str, torch.Tensor], cfg, device) -> list[tuple[str, Clique]]:
    found, offset = [], 0
    for prompt, images in generations.items():
        for c in find_cliques(images, cfg.edge_threshold, cfg.min_clique, cfg.tiles, device=device):
            found.append((prompt, Clique(tuple(m + offset for m in c.members), c.mean_distance, c.medoid + offset)))
        offset += len(images)
    return sorted(found, key=lambda pc: pc[1].mean_distance)


def _quality(gen: torch.Tensor, train: torch.Tensor, cfg, device) -> dict:
    extractor, name = feature_extractor(cfg, device)
    fg, ft = extract_features(gen, extractor), extract_features(train, extractor)
    subset = min(int(cfg.kid_subset_size), len(fg), len(ft))
    kid_mean, kid_std = kid(fg, ft, num_subsets=int(cfg.kid_subsets), subset_size=subset)
    return {"fid": fid(fg, ft), "kid": kid_mean, "kid_std": kid_std, "features": name}


def run_attack(generations: dict[str, torch.Tensor], train: TrainingImages, cfg, device="cpu") -> tuple[dict, list]:
    """All attack figures; returns (report sections, [(train row, [generation rows])] to draw)."""
    prompts = list(generations)
    gen = torch.cat([generations[p] for p in prompts]).float()
    prompt_of = [p for p in prompts for _ in range(len(generations[p]))]
    x = train.images.float()

    verification = verify_extraction(gen, x, delta=cfg.delta, device=device)
    cliques = _cliques_by_prompt(generations, cfg, device)
    precision = clique_precision([c for _, c in cliques], verification)
    adaptive = adaptive_extraction(gen, x, alpha=cfg.adaptive_alpha, n=cfg.adaptive_n, device=device)
    gu = gu_ratio(gen, x, threshold=cfg.gu_threshold, device=device) if len(x) > 1 else None
    replication = feature_replication(gen, x, thresholds=tuple(cfg.replication_thresholds), device=device)

    copies = train.copies or {}
    rows = [e.train_index for e in verification.extractions]
    # Duplication drives memorization: how many training images lie within δ of each extracted one.
    near_copies = (normalized_l2(x[rows], x, device=device) <= cfg.delta).sum(1).tolist() if rows else []
    extracted = []
    for e, in_training in zip(verification.extractions, near_copies):
        index = train.indices[e.train_index]
        hits = (verification.nn_index == e.train_index) & verification.is_extracted
        extracted.append({
            "train_index": index,
            "path": train.paths[e.train_index] if train.paths else None,
            "closest_generation": e.generation_index,
            "prompt": prompt_of[e.generation_index],
            "distance": round(float(e.distance), 5),
            "generations_within_delta": int(hits.sum()),
            "training_copies": int(in_training),
            "dedup_originals": copies.get(index, [index]),
        })
    flagged = [{
        "prompt": prompt, "size": len(c), "mean_distance": round(c.mean_distance, 5), "medoid": c.medoid,
        "members": list(c.members), "nearest_train_index": train.indices[int(verification.nn_index[c.medoid])],
        "nearest_train_distance": round(float(verification.nn_distance[c.medoid]), 5),
        "true_extraction": hit,
    } for (prompt, c), hit in zip(cliques, precision.true_positive)]

    adaptive_hits = adaptive.is_extracted
    report = {
        "counts": {"generations": len(gen), "prompts": len(prompts), "train_images": len(x)},
        "extraction": {
            "extracted": len(extracted),
            "extracted_fraction": len(extracted) / max(1, len(x)),
            "generations_within_delta": int(verification.is_extracted.sum()),
            "adaptive_extracted": len({int(i) for i in adaptive.nn_index[adaptive_hits].tolist()}),
            "adaptive_generations": int(adaptive_hits.sum()),
            "images": extracted,
        },
        "cliques": {"flagged": len(flagged), "precision": None if not flagged else precision.precision,
                    "groups": flagged},
        "memorization": {
            "nn_distance_mean": float(verification.nn_distance.mean()),
            "nn_distance_min": float(verification.nn_distance.min()),
            "gu_fraction": None if gu is None else float(gu.is_memorized.float().mean()),
            "gu_ratio_median": None if gu is None else float(gu.ratio.median()),
        },
        "replication": {f"above_{t}": float(v) for t, v in replication.fraction_above.items()},
        "quality": _quality(gen, x, cfg, device),
    }
    report["replication"]["features"] = "pixels (centred, unit norm)"
    pairs = _pairs_to_draw(verification, extracted, train, cfg.grid_columns)
    return report, [(image, [gen[g] for g in gens]) for image, gens in pairs]


def _pairs_to_draw(verification, extracted, train, columns: int) -> list[tuple[torch.Tensor, list[int]]]:
    """Each extracted image's closest generations; with none extracted, the closest pairs overall."""
    rows = [train.indices.index(e["train_index"]) for e in extracted]
    if not rows:
        order = torch.argsort(verification.nn_distance)
        rows = list(dict.fromkeys(int(verification.nn_index[g]) for g in order[:64]))
    out = []
    for row in rows[:16]:
        gens = torch.nonzero(verification.nn_index == row).flatten()
        gens = gens[torch.argsort(verification.nn_distance[gens])][:columns].tolist()
        out.append((train.images[row], gens))
    return out
