"""Attack reports: report.json (every figure), report.md (a table people read), extracted.png.

A finished report is never overwritten: a second evaluation into the same folder writes
report-1.json / report-1.md / extracted-1.png beside it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ambient.images import save_grid


def free_stem(out: Path, stem: str = "report") -> str:
    """`report`, or `report-N` for the first N whose files do not exist yet."""
    n = 0
    while (out / f"{stem if n == 0 else f'{stem}-{n}'}.json").exists():
        n += 1
    return stem if n == 0 else f"{stem}-{n}"


def _fmt(value, digits=4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    c, e, q, m = report["counts"], report["extraction"], report["quality"], report["memorization"]
    t = report["thresholds"]
    lines = [
        "# Extraction attack report", "",
        f"Source: `{json.dumps(report['source'])}`", "",
        "| measure | value |", "|---|---|",
        f"| generations / prompts / training images | {c['generations']} / {c['prompts']} / {c['train_images']} |",
        f"| **extracted training images** (ℓ2 ≤ {t['delta']}) | **{e['extracted']}** ({e['extracted_fraction']:.2%}) |",
        f"| generations within δ of a training image | {e['generations_within_delta']} |",
        f"| extracted by the adaptive score (α={t['adaptive_alpha']}, n={t['adaptive_n']}) | {e['adaptive_extracted']} |",
        f"| flagged cliques (tiled ℓ2 < {t['edge_threshold']}, ≥ {t['min_clique']}) | {report['cliques']['flagged']} |",
        f"| clique precision | {_fmt(report['cliques']['precision'])} |",
        f"| Gu et al. memorized fraction (ratio < {_fmt(t['gu_threshold'], 3)}) | {_fmt(m['gu_fraction'])} |",
        f"| mean nearest-training ℓ2 | {_fmt(m['nn_distance_mean'])} |",
    ]
    lines += [f"| replication: cosine {k.removeprefix('above_')} fraction | {_fmt(v)} |"
              for k, v in report["replication"].items() if k.startswith("above_")]
    lines += [f"| FID ({q['features']}) | {_fmt(q['fid'])} |", f"| KID ({q['features']}) | {_fmt(q['kid'])} ± {_fmt(q['kid_std'], 2)} |"]
    mia = report.get("mia")
    if mia:
        lines += [f"| membership inference AUC | {_fmt(mia['auc'])} |",
                  f"| TPR at 1% / 0.1% FPR | {_fmt(mia['tpr_at_1%_fpr'])} / {_fmt(mia['tpr_at_0.1%_fpr'])} |"]
    else:
        lines += ["| membership inference | n/a (no held-out non-members: train with dataset.holdout) |"]
    if e["images"]:
        lines += ["", "## Extracted training images", "", "| index | path | distance | generations within δ | training images within δ (copies) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['train_index']} | {x['path'] or ''} | {x['distance']} | {x['generations_within_delta']} | "
                  f"{x['training_copies']} |" for x in e["images"]]
    lines += ["", f"Picture: `{report['picture']}` — {report['picture_caption']}", ""]
    return "\n".join(lines)


def write_report(report: dict, pairs: list, cfg, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out)
    report["thresholds"] = {k: v for k, v in OmegaConf.to_container(cfg.attack, resolve=True).items()
                            if k not in ("batch_size",)}
    picture = out / f"{'extracted' if report['extraction']['extracted'] else 'closest'}{stem.removeprefix('report')}.png"
    report["picture"] = picture.name
    report["picture_caption"] = ("left: training image, right: its closest generations" if report["extraction"]["extracted"]
                                 else "nothing extracted; left: the training images closest to any generation, "
                                      "right: those generations")
    if pairs:
        columns = 1 + max(len(g) for _, g in pairs)
        tiles = []
        for train_image, gens in pairs:
            row = [train_image] + gens + [torch.ones_like(train_image)] * (columns - 1 - len(gens))
            tiles += row
        save_grid(torch.stack(tiles), picture, nrow=columns)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report))
    return out / f"{stem}.json"
