"""The extraction attack on a set of generations (Carlini et al. 2023), as one report dict.

Input: generations grouped by prompt (tensors, or streaming sources such as PNG files read a block
at a time), and the training images, all in [0, 1]. Output: the
figures for report.json plus the pairs the picture shows. Thresholds come from `attack` config
keys whose defaults are the papers' values (conf/evaluate.yaml names the sources).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ambient.attack.cliques import Clique, find_cliques
from ambient.attack.distances import normalized_l2
from ambient.attack.extraction import (
    DELTA,
    adaptive_extraction,
    clique_precision,
    extraction_of,
    gu_ratio,
    verify_extraction,
)
from ambient.attack.features import (
    EfficientNetLite0Features,
    InceptionFeatures,
    RandomProjectionFeatures,
    extract_features,
    pixel_features,
)
from ambient.attack.quality import fid, kid
from ambient.attack.replication import feature_replication, replication_of_features
from ambient.attack.stats import mean_difference, paired_difference
from ambient.attack.streaming import ConcatSource, ImageSource, LowPassed, Nearest, blocks, rows_of, stream_nearest
from ambient.images import gaussian

# Generations are read a block at a time (they may be PNG files: streaming.PngFiles); what is kept
# is O(1) per generation (nearest distances, flags) plus its feature vector (FID/KID, replication).
GENERATION_BLOCK = 1024


@dataclass
class TrainingImages:
    """Training images in [0, 1] with their stable indices, optional paths and duplicate counts."""

    images: torch.Tensor
    indices: list[int]
    paths: list[str] | None = None
    copies: dict[int, list[int]] | None = None  # index -> every original index it stands for (dedup)


def feature_extractor(cfg, device):
    """FID/KID features: Inception when local weights are given, else attack.features (default: the
    offline ImageNet EfficientNet-Lite0)."""
    if cfg.get("inception_weights"):
        return InceptionFeatures(cfg.inception_weights, device), "inception_v3"
    if cfg.features == "pixels":
        return pixel_features, "pixels"
    if cfg.features == "efficientnet_lite0":
        resolution = int(cfg.get("feature_resolution") or 224)
        return EfficientNetLite0Features(device, resolution), f"efficientnet_lite0_{resolution}px"
    return RandomProjectionFeatures(dim=256, resolution=16, seed=0), "random_projection_256"


def is_pretrained(cfg) -> bool:
    return bool(cfg.get("inception_weights")) or cfg.features == "efficientnet_lite0"


def _cliques_by_prompt(generations: dict[str, torch.Tensor | ImageSource], cfg, device) -> list[tuple[str, Clique]]:
    found, offset = [], 0
    for prompt, images in generations.items():
        for c in find_cliques(images, cfg.edge_threshold, cfg.min_clique, cfg.tiles, device=device):
            found.append((prompt, Clique(tuple(m + offset for m in c.members), c.mean_distance, c.medoid + offset)))
        offset += len(images)
    return sorted(found, key=lambda pc: pc[1].mean_distance)


def _quality(features: dict[str, torch.Tensor | None], name: str, cfg) -> dict:
    """FID/KID against held-out real images (the reference) and against the training images, both
    named: quality measured against the training set alone rewards copying."""
    fg = features["gen"]
    out = {"features": name}
    for suffix, fr in (("", features.get("ref")), ("_train", features["train"])):
        if fr is None or len(fr) < 2:
            out[f"fid{suffix}"], out[f"kid{suffix}"] = None, None
            continue
        subset = min(int(cfg.kid_subset_size), len(fg), len(fr))
        kid_mean, kid_std = kid(fg, fr, num_subsets=int(cfg.kid_subsets), subset_size=subset)
        out.update({f"fid{suffix}": fid(fg, fr), f"kid{suffix}": kid_mean, f"kid{suffix}_std": kid_std})
    sizes = [len(f) for f in features.values() if f is not None]
    if min(sizes) < STABLE_FID_IMAGES:
        out["note"] = (f"FID from {min(sizes)} images is biased upward (it needs ~{STABLE_FID_IMAGES}+ per set to be "
                       "stable): compare FIDs only at equal set sizes")
    return out


STABLE_FID_IMAGES = 2000
NULL_EXTRACTED_FRACTION = 0.001  # the calibrated δ: the null reference extracts at most 0.1% of training images


@dataclass
class _Memorization:
    """One generator's memorization figures (model or null reference) at one δ."""

    sections: dict
    verification: object
    train_nn: torch.Tensor      # per training image: distance to its nearest generation
    train_nn_index: torch.Tensor
    gu_memorized: torch.Tensor  # per generation
    prompt_of: list[str]


def _memorization(generations: dict[str, torch.Tensor | ImageSource], train: TrainingImages, cfg, delta: float,
                  device, features: tuple[torch.Tensor, torch.Tensor] | None = None,
                  feature_name: str = "", nn: Nearest | None = None) -> _Memorization:
    """features: pretrained (generation, training) features for the replication cosine; None: pixels.
    nn: the generations x training pass, when already made (the null's, made for the calibration)."""
    prompts = list(generations)
    gen = ConcatSource([generations[p] for p in prompts])
    prompt_of = [p for p in prompts for _ in range(len(generations[p]))]
    x = train.images.float()
    verification = verify_extraction(gen, x, delta=delta, device=device) if nn is None else extraction_of(nn, delta)
    # Carlini et al. 2023, Def. 1: a training image is extracted when *some* generation is within δ
    # of it, whether or not it is that generation's nearest training image (same streamed pass).
    train_nn, train_nn_index = verification.train_nn_distance, verification.train_nn_index
    cliques = _cliques_by_prompt(generations, cfg, device)
    precision = clique_precision([c for _, c in cliques], verification)
    adaptive = adaptive_extraction(gen, x, alpha=cfg.adaptive_alpha, n=cfg.adaptive_n, device=device)
    gu = gu_ratio(gen, x, threshold=cfg.gu_threshold, device=device) if len(x) > 1 else None
    if features is None:
        replication = feature_replication(gen, x, thresholds=tuple(cfg.replication_thresholds), device=device)
        feature_name = "pixels (centred, unit norm)"
    else:
        replication = replication_of_features(*features, thresholds=tuple(cfg.replication_thresholds), device=device)
    flagged = [{
        "prompt": prompt, "size": len(c), "mean_distance": round(c.mean_distance, 5), "medoid": c.medoid,
        "members": list(c.members), "nearest_train_index": train.indices[int(verification.nn_index[c.medoid])],
        "nearest_train_distance": round(float(verification.nn_distance[c.medoid]), 5),
        "true_extraction": hit,
    } for (prompt, c), hit in zip(cliques, precision.true_positive)]
    adaptive_hits = adaptive.is_extracted
    sections = {
        "counts": {"generations": len(gen), "prompts": len(prompts), "train_images": len(x)},
        "extraction": {
            "extracted": int((train_nn <= delta).sum()),
            "extracted_fraction": float((train_nn <= delta).float().mean()) if len(x) else 0.0,
            "extracted_nearest": len(verification.extractions),
            "generations_within_delta": int(verification.is_extracted.sum()),
            "adaptive_extracted": len({int(i) for i in adaptive.nn_index[adaptive_hits].tolist()}),
            "adaptive_generations": int(adaptive_hits.sum()),
            "adaptive_n": int(adaptive.n),
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
    }
    sections["replication"]["features"] = feature_name
    gu_flags = gu.is_memorized.cpu() if gu is not None else torch.zeros(len(gen), dtype=torch.bool)
    return _Memorization(sections, verification, train_nn, train_nn_index, gu_flags, prompt_of)


def calibrated_delta(train_to_reference: torch.Tensor, fraction: float = NULL_EXTRACTED_FRACTION) -> float:
    """The largest δ at which the null reference extracts at most `fraction` of the training images
    (Def. 1): just below the (k+1)-th smallest training→reference distance, k = ⌊fraction·N⌋."""
    d = torch.sort(train_to_reference.float()).values
    k = int(fraction * len(d))
    # a float32 value, so comparisons in float32 (distances) and float64 agree on which side it falls
    return float(torch.nextafter(d[k], torch.tensor(0.0)))


def _extracted_images(found: _Memorization, gen: ConcatSource, train: TrainingImages, delta: float,
                      device) -> list[dict]:
    copies = train.copies or {}
    x = train.images.float()
    rows = torch.nonzero(found.train_nn <= delta).flatten()
    rows = rows[torch.argsort(found.train_nn[rows], stable=True)].tolist()
    if not rows:
        return []
    within_delta = torch.zeros(len(rows), dtype=torch.long)
    for _, block in blocks(gen, GENERATION_BLOCK):
        within_delta += (normalized_l2(x[rows], block, device=device).cpu() <= delta).sum(1)
    # Duplication drives memorization: how many training images lie within δ of each extracted one.
    near_copies = (normalized_l2(x[rows], x, device=device) <= delta).sum(1).tolist()
    out = []
    for row, within, in_training in zip(rows, within_delta.tolist(), near_copies):
        index = train.indices[row]
        g = int(found.train_nn_index[row])
        out.append({
            "train_index": index,
            "path": train.paths[row] if train.paths else None,
            "closest_generation": g,
            "prompt": found.prompt_of[g],
            "distance": round(float(found.train_nn[row]), 5),
            "generations_within_delta": int(within),
            "training_copies": int(in_training),
            "dedup_originals": copies.get(index, [index]),
        })
    return out


def _without_lists(sections: dict) -> dict:
    return {name: {k: v for k, v in body.items() if not isinstance(v, (list, dict))}
            for name, body in sections.items()}


def _excess(model: dict, null: dict) -> dict:
    out = {}
    for section in ("extraction", "cliques", "memorization", "replication"):
        for key, value in model.get(section, {}).items():
            other = null.get(section, {}).get(key)
            if key != "adaptive_n" and is_figure(value) and is_figure(other):
                out[key] = value - other
    return out


def is_figure(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_attack(generations: dict[str, torch.Tensor | ImageSource], train: TrainingImages, cfg, device="cpu",
               reference: dict[str, torch.Tensor] | None = None, reference_source: str = "",
               lowpass: float = 0.0) -> tuple[dict, list]:
    """All attack figures; returns (report sections, [(train row, [generation rows])] to draw).

    reference: real images the model never trained on, grouped like the generations (the null
    reference): every memorization figure is computed for them too, with the excess over them.
    lowpass > 0 (px): Definition 1 also after a Gaussian low-pass of both sides (section `lowpass`),
    for models whose generations carry noise (see lowpass_extraction); it needs the null reference.
    """
    x = train.images.float()
    gen = ConcatSource(list(generations.values()))
    ref = torch.cat(list(reference.values())).float() if reference else None
    calibration = null_nn = None
    if ref is not None and len(ref):
        # One pass gives the calibration and the null's Def. 1 distances below: computed two ways (e.g.
        # nearest(x, ref) here) a last-ulp difference can put a null image at δ itself.
        null_nn = stream_nearest(ConcatSource(list(reference.values())), x, device=device)
        calibration = {"delta": calibrated_delta(null_nn.reverse_distance), "rule": f"largest δ at which the null reference "
                       f"extracts ≤ {NULL_EXTRACTED_FRACTION:.1%} of the training images (Def. 1)",
                       "paper_delta": DELTA}
    if str(cfg.delta) == "auto":
        if calibration is None:
            raise ValueError("attack.delta=auto needs a null reference: held-out images (train with "
                             "dataset.holdout) or reference_data=DIR")
        delta = calibration["delta"]
    else:
        delta = float(cfg.delta)
    extractor, feature_name = feature_extractor(cfg, device)
    features = {"gen": extract_features(gen, extractor), "train": extract_features(x, extractor),
                "ref": extract_features(ref, extractor) if ref is not None and len(ref) else None}
    pretrained = is_pretrained(cfg)
    model = _memorization(generations, train, cfg, delta, device,
                          (features["gen"], features["train"]) if pretrained else None, feature_name)
    report = dict(model.sections)
    report["extraction"]["delta"] = delta
    report["extraction"]["images"] = _extracted_images(model, gen, train, delta, device)
    report["quality"] = _quality(features, feature_name, cfg)
    report["distances"] = {"train_to_generation": [round(float(v), 5) for v in model.train_nn]}
    if calibration is not None:
        null = _memorization(reference, train, cfg, delta, device,
                             (features["ref"], features["train"]) if pretrained else None, feature_name, null_nn)
        report["null"] = _without_lists(null.sections)
        report["null"]["counts"]["source"] = reference_source
        report["excess"] = _excess(report, report["null"])
        report["distances"]["train_to_reference"] = [round(float(v), 5) for v in null.train_nn]
        for name, level in (("paper", DELTA), ("calibrated", calibration["delta"])):
            flags_model, flags_null = (model.train_nn <= level).numpy(), (null.train_nn <= level).numpy()
            calibration[f"extracted_at_{name}_delta"] = int(flags_model.sum())
            calibration[f"null_extracted_at_{name}_delta"] = int(flags_null.sum())
            low, high = paired_difference(flags_model, flags_null)
            calibration[f"excess_at_{name}_delta"] = int(flags_model.sum() - flags_null.sum())
            calibration[f"excess_at_{name}_delta_ci"] = [low, high]
        gu_low, gu_high = mean_difference(model.gu_memorized.numpy(), null.gu_memorized.numpy())
        report["excess"]["gu_fraction_ci"] = [gu_low, gu_high]
        report["calibration"] = calibration
        if lowpass > 0:
            report["lowpass"] = lowpass_extraction(gen, ConcatSource(list(reference.values())), x, lowpass, device)
        report["verdict"] = verdict(calibration, report["excess"], len(x), report.get("lowpass"))
    pairs = _pairs_to_draw(model, report["extraction"]["images"], train, gen, cfg.grid_columns, device)
    return report, [(image, list(rows_of(gen, gens))) for image, gens in pairs]


def lowpass_extraction(generations: ImageSource, reference: ImageSource, x: torch.Tensor, sigma: float,
                       device="cpu") -> dict:
    """Definition 1 with both sides low-passed (Gaussian, sigma px, edges repeated), δ calibrated on the
    null reference through the same low-pass. A model trained on noisy data can return a training image
    with noise on top: the pixel l2 counts the noise as distance and misses the copy (README, noise
    study: 21 of 30 copies found this way at sigma_n = 0.2, none at the pixel δ). The null goes through
    the same filter, so the comparison stays like for like."""
    smooth = gaussian(x, sigma)
    model = stream_nearest(LowPassed(generations, sigma), smooth, device=device).reverse_distance
    null = stream_nearest(LowPassed(reference, sigma), smooth, device=device).reverse_distance
    delta = calibrated_delta(null)
    flags_model, flags_null = (model <= delta).numpy(), (null <= delta).numpy()
    low, high = paired_difference(flags_model, flags_null)
    return {"sigma": sigma, "delta": delta, "extracted": int(flags_model.sum()), "null_extracted": int(flags_null.sum()),
            "excess": int(flags_model.sum() - flags_null.sum()), "excess_ci": [low, high],
            "rule": f"Def. 1 after a Gaussian low-pass of σ = {sigma:g} px on both sides; δ calibrated on the "
                    f"low-passed null reference as the pixel δ is",
            "train_to_generation": [round(float(v), 5) for v in model],
            "train_to_reference": [round(float(v), 5) for v in null]}


def verdict(calibration: dict, excess: dict, train_images: int, lowpass: dict | None = None) -> dict:
    """Copying beyond the null level: the model extracts more training images than unseen real images
    do at the calibrated δ (also after the low-pass, when measured), or more of its generations pass the
    Gu et al. ratio test (95% CIs)."""
    ext_low = calibration["excess_at_calibrated_delta_ci"][0]
    gu_low = excess["gu_fraction_ci"][0]
    lowpass_low = lowpass["excess_ci"][0] if lowpass else 0
    copies = ext_low > 0 or gu_low > 0 or lowpass_low > 0
    if copies:
        why = []
        if ext_low > 0:
            why.append(f"it extracts {calibration['extracted_at_calibrated_delta']} of {train_images} training images "
                       f"at the calibrated δ = {calibration['delta']:.4g}, unseen real images "
                       f"{calibration['null_extracted_at_calibrated_delta']} (excess 95% CI "
                       f"[{calibration['excess_at_calibrated_delta_ci'][0]:.3g}, "
                       f"{calibration['excess_at_calibrated_delta_ci'][1]:.3g}])")
        if lowpass_low > 0:
            why.append(f"after a low-pass of σ = {lowpass['sigma']:g} px it extracts {lowpass['extracted']} of "
                       f"{train_images} training images at the low-passed calibrated δ = {lowpass['delta']:.4g}, unseen "
                       f"real images {lowpass['null_extracted']} (excess 95% CI [{lowpass['excess_ci'][0]:.3g}, "
                       f"{lowpass['excess_ci'][1]:.3g}]): copies under noise")
        if gu_low > 0:
            why.append(f"{excess['gu_fraction']:+.3g} more of its generations pass the Gu et al. copy test than unseen "
                       f"real images do (95% CI [{excess['gu_fraction_ci'][0]:.3g}, {excess['gu_fraction_ci'][1]:.3g}])")
        text = "The model copies training images beyond the null level: " + "; ".join(why) + "."
    else:
        text = ("The model is at the null level: it reproduces training images no more than real images it never "
                "saw do (extraction at the calibrated δ and the Gu et al. test, 95% CIs include 0 or lie below). "
                "The defense removed measurable copying at this sample size.")
    return {"copies": copies, "text": text}


def _pairs_to_draw(found: _Memorization, extracted: list[dict], train, gen: ConcatSource, columns: int,
                   device=None) -> list[tuple[torch.Tensor, list[int]]]:
    """Each extracted image's closest generations; with none extracted, the training images closest
    to any generation."""
    rows = [train.indices.index(e["train_index"]) for e in extracted]
    if not rows:
        rows = torch.argsort(found.train_nn)[:16].tolist()
    rows = rows[:16]
    if not rows:
        return []
    closest = _closest_generations(train.images[rows].float(), gen, columns, device)
    return [(train.images[row], closest[k].tolist()) for k, row in enumerate(rows)]


def _closest_generations(x: torch.Tensor, gen: ConcatSource, k: int, device=None) -> torch.Tensor:
    """Per row of x, the indices of its k nearest generations, closest first (a block at a time)."""
    best_d = best_i = None
    for start, block in blocks(gen, GENERATION_BLOCK):
        d = normalized_l2(x, block, device=device).cpu()
        v, i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False, sorted=True)
        if best_d is not None:
            v, i = torch.cat([best_d, v], 1), torch.cat([best_i, i + start], 1)
            order = torch.argsort(v, dim=1, stable=True)[:, :k]
            best_d, best_i = v.gather(1, order), i.gather(1, order)
        else:
            best_d, best_i = v, i + start
    return best_i
