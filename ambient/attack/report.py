"""Attack reports: report.json (every figure), report.md (a table people read), extracted.png.

A finished report is never overwritten: a second evaluation into the same folder writes
report-1.json / report-1.md / extracted-1.png beside it. The table follows attack/schema.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ambient import rundir
from ambient.attack import schema
from ambient.images import save_grid


def _rows(report: dict) -> list[str]:
    """One table row per figure, in the order of schema.FIELDS (families expanded)."""
    context = {**(report.get("thresholds") or {}), "features": (report.get("quality") or {}).get("features", ""),
               "confidence": (report.get("semantic") or {}).get("confidence", "")}
    present = {(s, k): v for s, k, v in schema.figures(report)}
    rows, done = [], set()
    for field in schema.FIELDS:
        if field.section == "mia" and report.get("mia") is None:
            if "mia" not in done:
                rows.append("| membership inference | n/a (mia.enabled=false, a folder audit, or no held-out "
                            "non-members: train with dataset.holdout) |")
                done.add("mia")
            continue
        keys = [k for (s, k) in present if s == field.section and schema.field_for(s, k) == field]
        for key in keys:
            if (field.section, key) in done:
                continue
            done.add((field.section, key))
            rows.append(f"| {schema.label_of(field, key, context)} | "
                        f"{schema.format_value(present[(field.section, key)], field.fmt)} |")
    return rows


def markdown(report: dict) -> str:
    e = report["extraction"]
    lines = ["# Extraction attack report", "", f"Source: `{json.dumps(report['source'])}`", "",
             "| measure | value |", "|---|---|", *_rows(report)]
    if e["images"]:
        lines += ["", "## Extracted training images", "", "| index | path | distance | generations within δ | training images within δ (copies) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['train_index']} | {x['path'] or ''} | {x['distance']} | {x['generations_within_delta']} | "
                  f"{x['training_copies']} |" for x in e["images"]]
    lines += ["", f"Picture: `{report['picture']}` — {report['picture_caption']}", ""]
    return "\n".join(lines)


def write_report(report: dict, pairs: list, cfg, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem, _ = rundir.free_stem(out, rundir.REPORT, (".json", ".md"))
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
