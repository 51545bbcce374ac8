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


def figure_context(report: dict) -> dict:
    """What report labels refer to: thresholds, features, the δ and n actually used."""
    e = report.get("extraction") or {}
    return {**(report.get("thresholds") or {}), "features": (report.get("quality") or {}).get("features", ""),
            "confidence": (report.get("semantic") or {}).get("confidence", ""),
            **{k: e[k] for k in ("delta", "adaptive_n") if k in e}}


# Rows whose value is shown inside another row's cell ("0.84 [0.71, 0.97]") or in the null columns.
def _folded(section: str, key: str) -> bool:
    return section == "excess" or (section in schema.MEMBERSHIP_SECTIONS and "_ci_" in key) or key.endswith("_std")


def _cell(report: dict, section: str, key: str, value, fmt: str) -> str:
    text = schema.format_value(value, fmt)
    body = report.get(section) or {}
    low, high = body.get(f"{key}_ci_low"), body.get(f"{key}_ci_high")
    if low is not None and high is not None:
        text += f" [{low:.3g}, {high:.3g}]"
    if value is None and body.get(f"{key}_note"):
        text = body[f"{key}_note"]
    return text


def _rows(report: dict, with_null: bool) -> list[str]:
    """One table row per figure, in the order of schema.FIELDS (families expanded); with a null
    reference, its value and the excess over it beside the model's."""
    context = figure_context(report)
    present = {(s, k): v for s, k, v in schema.figures(report)}
    null, excess = report.get("null") or {}, report.get("excess") or {}
    rows, done = [], set()
    for field in schema.FIELDS:
        if field.section == "mia" and report.get("mia") is None:
            if "mia" not in done:
                rows.append("| membership inference | n/a (mia.enabled=false, a folder audit, or no held-out "
                            "non-members: train with dataset.holdout) |" + (" | |" if with_null else ""))
                done.add("mia")
            continue
        keys = [k for (s, k) in present if s == field.section and schema.field_for(s, k) == field]
        for key in keys:
            if (field.section, key) in done or _folded(field.section, key):
                continue
            done.add((field.section, key))
            row = f"| {schema.label_of(field, key, context)} | " \
                  f"{_cell(report, field.section, key, present[(field.section, key)], field.fmt)} |"
            if with_null:
                other = (null.get(field.section) or {}).get(key)
                diff = excess.get(key) if field.section in ("extraction", "cliques", "memorization",
                                                            "replication") else None
                ci = excess.get(f"{key}_ci")
                diff_text = "" if diff is None else f"{diff:+.4g}" + (f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "")
                row += f" {'' if other is None else schema.format_value(other, field.fmt)} | {diff_text} |"
            rows.append(row)
    return rows


def markdown(report: dict) -> str:
    e = report["extraction"]
    with_null = report.get("null") is not None
    lines = ["# Extraction attack report", "", f"Source: `{json.dumps(report['source'])}`", ""]
    if report.get("verdict"):
        lines += ["## Verdict", "", report["verdict"]["text"], ""]
    if with_null:
        lines += [f"Null reference: {report['null']['counts'].get('source', '')}. Each memorization figure is "
                  "computed again with these real images in place of the generations; the excess is model − null "
                  "(95% bootstrap CI where shown). A model at the null level copies no more than a perfect "
                  "generator that never saw the training set.", ""]
        calibration = report.get("calibration") or {}
        if calibration:
            lines += [f"Calibrated δ = {calibration['delta']:.4g} ({calibration['rule']}); the paper's δ = "
                      f"{calibration['paper_delta']}. Extracted at the paper's δ: model "
                      f"{calibration['extracted_at_paper_delta']}, null {calibration['null_extracted_at_paper_delta']}; "
                      f"at the calibrated δ: model {calibration['extracted_at_calibrated_delta']}, null "
                      f"{calibration['null_extracted_at_calibrated_delta']}.", ""]
        lowpass = report.get("lowpass")
        if lowpass:
            lines += [f"After a low-pass (σ = {lowpass['sigma']:g} px, both sides; δ = {lowpass['delta']:.4g} calibrated "
                      f"on the low-passed null): extracted model {lowpass['extracted']}, null {lowpass['null_extracted']} "
                      f"(excess 95% CI [{lowpass['excess_ci'][0]:g}, {lowpass['excess_ci'][1]:g}]).", ""]
    else:  # the figures alone do not say copying: a perfect non-copier "extracts" most images at δ = 0.15
        lines += ["**No null reference**: these figures cannot be read as copying or not copying (real images the "
                  "model never saw reach many training images within δ too). Train with a held-out split "
                  "(`dataset.holdout`, e.g. `experiment=digits_memorization`) or pass `reference_data=DIR`.", ""]
    lines += (["| measure | model | null | excess |", "|---|---|---|---|"] if with_null else
              ["| measure | value |", "|---|---|"]) + _rows(report, with_null)
    notes = [body["note"] for body in [report.get("quality")] + [report.get(s) for s in schema.MEMBERSHIP_SECTIONS]
             if isinstance(body, dict) and body.get("note")]
    if notes:
        lines += [""] + [f"Note: {n}." for n in dict.fromkeys(notes)]
    if e["images"]:
        lines += ["", "## Extracted training images", "", "| index | path | distance | generations within δ | training images within δ (copies) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['train_index']} | {x['path'] or ''} | {x['distance']} | {x['generations_within_delta']} | "
                  f"{x['training_copies']} |" for x in e["images"]]
    lines += ["", f"Picture: `{report['picture']}` — {report['picture_caption']}", ""]
    if (report.get("reconstruction") or {}).get("picture"):
        r = report["reconstruction"]
        lines += [f"Reconstruction: `{r['picture']}` — per row, a member then a held-out image: the image, what the "
                  f"attack showed ({r['region']}, {r['fraction']:g} hidden, grey), the best of {r['samples']} "
                  "completions", ""]
    if (report.get("canaries") or {}).get("picture"):
        c = report["canaries"]
        lines += [f"Canaries: `{c['picture']}` — per planted canary (in the order of `canaries.per_canary`: by times "
                  "planted), the canary, its nearest generation"
                  + (", its best completion" if "reconstruction" in c["per_canary"][0] else ""), ""]
    if report.get("histogram"):
        lines += [f"Distances: `{report['histogram']}` — {report['histogram_caption']}", ""]
    return "\n".join(lines)


def _histogram(report: dict, path: Path) -> bool:
    """Training image -> nearest generation, and -> nearest unseen real image (the null), with δ lines."""
    distances = report.get("distances") or {}
    if not distances.get("train_to_generation"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [distances["train_to_generation"]] + ([distances["train_to_reference"]]
                                                   if distances.get("train_to_reference") else [])
    top = max(max(v) for v in values)
    bins = [top * i / 40 for i in range(41)]
    ax.hist(distances["train_to_generation"], bins=bins, alpha=0.6, label="nearest generation (model)")
    if distances.get("train_to_reference"):
        ax.hist(distances["train_to_reference"], bins=bins, alpha=0.6, label="nearest unseen real image (null)")
    ax.axvline(report["extraction"]["delta"], color="k", ls="--", lw=1, label=f"δ used = {report['extraction']['delta']:.3g}")
    calibration = report.get("calibration") or {}
    if calibration and abs(calibration["paper_delta"] - report["extraction"]["delta"]) > 1e-12:
        ax.axvline(calibration["paper_delta"], color="grey", ls=":", lw=1, label=f"paper δ = {calibration['paper_delta']}")
    elif calibration:
        ax.axvline(calibration["delta"], color="grey", ls=":", lw=1, label=f"calibrated δ = {calibration['delta']:.3g}")
    ax.set_xlabel("normalized ℓ2 from each training image")
    ax.set_ylabel("training images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
    histogram = out / f"distances{stem.removeprefix('report')}.png"
    if _histogram(report, histogram):
        report["histogram"] = histogram.name
        report["histogram_caption"] = ("per training image: distance to its nearest generation and to its nearest "
                                       "unseen real image (the null reference); extracted = left of δ")
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
