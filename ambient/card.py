"""The model card (`model/README.md`, Hugging Face format: YAML metadata, then markdown).

It states what a model was trained on and with which defenses, and every evaluation of it: the
headline attack figures of each evaluation, with the null reference next to them when the report
has one, oldest first. The card is derived: it is rebuilt from settings, summary, the history of
evaluations appended to model/evaluations.jsonl (so a report written outside the run, or one whose
folder was deleted, stays on the card) and any report.json under the run that predates the history.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from ambient.attack.report import figure_context
from ambient.attack.schema import FIELDS, label_of
from ambient.rundir import CARD, SPLIT, SUMMARY, ModelDir, RunDir, read_json

# What the card reads of a report (HEADLINE sections, their null levels, the labels' context): kept in
# the history so the card can be rebuilt without the report file.
_CONTEXT_SECTIONS = ("thresholds", "verdict", "quality", "semantic", "extraction")

HEADLINE = tuple(f for f in FIELDS if f.summary)


def _defenses(settings: dict) -> list[str]:
    corruption = settings.get("corruption") or {}
    kind = corruption.get("kind", "none")
    lines = []
    if kind in ("mask", "box", "box_official"):
        detail = ", ".join(f"{k}={v}" for k, v in corruption.items() if k not in ("kind", "delta"))
        lines.append(f"Ambient corruption: {kind} ({detail}); further mask δ = {settings.get('delta')}; the model "
                     "never saw a pixel its mask A hid (Daras et al. 2023)")
    elif kind == "noise":
        noisy = settings.get("noisy") or {}
        if noisy.get("objective") == "ambient":
            lines.append(f"Noisy observations: σ_n = {corruption.get('sigma')}, ambient Tweedie loss (Daras et al. "
                         f"2024), trained at σ ≥ σ_n only; sampling stops at σ_n unless sampler.below_sigma_n=continue")
        else:
            lines.append(f"Noisy observations: σ = {corruption.get('sigma')}, ordinary loss on the noisy images")
    else:
        lines.append("No corruption: the model trained on clean images")
    dedup = (settings.get("dataset") or {}).get("dedup") or settings.get("dedup")
    if dedup and dedup.get("kind", "none") != "none":
        lines.append(f"Deduplication: {dedup.get('kind')} (threshold {dedup.get('threshold')})")
    captions = settings.get("captions") or {}
    if captions and captions.get("kind", "standard") != "standard":
        lines.append(f"Caption defense: {captions.get('kind')}")
    privacy = settings.get("privacy") or {}
    if privacy.get("epsilon") is not None:
        lines.append(f"DP-SGD: ε = {privacy['epsilon']}, δ = {privacy.get('delta')}")
    return lines


def _figure(report: dict, field) -> str | None:
    value = (report.get(field.section) or {}).get(field.key)
    if value is None:
        return None
    null = ((report.get("null") or {}).get(field.section) or {}).get(field.key)
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if null is None else f"{text} (null {null:.4g})" if isinstance(null, float) else f"{text} (null {null})"


def evaluation_record(report: dict, path) -> dict:
    """The history line of one evaluation: its date, its report's path and what the card shows."""
    sections = {f.section for f in HEADLINE} | set(_CONTEXT_SECTIONS)
    kept = {k: report[k] for k in sections if k in report}
    kept["null"] = {k: v for k, v in (report.get("null") or {}).items() if k in sections}
    return {"date": _date(report, Path(path)), "path": str(Path(path).resolve()), "report": kept}


def _date(report: dict, path: Path) -> str:
    return (report.get("source") or {}).get("date") or _dt.datetime.fromtimestamp(
        path.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _evaluations(model: ModelDir, run: RunDir | None) -> list[tuple[str, str, dict]]:
    """(date, where, report) of every evaluation: the history, then reports under the run it lacks."""
    found = {r["path"]: (r.get("date", "?"), r["path"], r["report"]) for r in model.read_evaluations()}
    for path in run.eval_reports() if run is not None else []:
        if str(path.resolve()) in found:
            continue
        try:
            report = read_json(path)
        except (OSError, ValueError):
            continue
        found[str(path.resolve())] = (_date(report, path), str(path.resolve()), report)
    return sorted(found.values(), key=lambda item: (item[0], item[1]))


def render_model_card(model_dir, run_dir=None) -> str:
    model = ModelDir(model_dir)
    settings = model.read_settings()
    run = RunDir(run_dir) if run_dir is not None else None
    summary = read_json(run / SUMMARY) if run is not None and (run / SUMMARY).is_file() else {}
    split = read_json(run / SPLIT) if run is not None and (run / SPLIT).is_file() else {}
    dataset = settings.get("dataset") or {}
    text = settings.get("conditioning") == "text"
    tags = ["ambient-diffusion", "memorization", "privacy", "diffusers"]
    kind = (settings.get("corruption") or {}).get("kind", "none")
    tags.append(f"corruption-{kind}")
    meta = ["---", "library_name: diffusers",
            f"pipeline_tag: {'text-to-image' if text else 'unconditional-image-generation'}",
            "tags:", *[f"- {t}" for t in tags], "---", ""]
    lines = [f"# Ambient model: {dataset.get('kind', 'dataset')} at {settings.get('resolution')} px, "
             f"corruption {kind}", "",
             "Trained with the ambient framework (training on corrupted data, Daras et al. 2023). Load it with "
             "`AmbientPipeline.from_pretrained(this_folder)` (`from ambient import AmbientPipeline`) or "
             "`DiffusionPipeline.from_pretrained(this_folder, trust_remote_code=True)`.", "",
             "## Training", "",
             f"- dataset: {dataset.get('kind')} (limit {dataset.get('limit')}), "
             f"{len(split.get('members', [])) or '?'} training images, {len(split.get('holdout', [])) or 0} held out",
             f"- objective: {settings.get('objective')}, {settings.get('channels')} channel(s), "
             f"{settings.get('resolution')} px, conditioning: {settings.get('conditioning')}",
             f"- training steps: {summary.get('steps', settings.get('train_steps'))}, seed {settings.get('seed')}",
             f"- sampler: {(settings.get('sampler') or {}).get('kind')}", "",
             "## Defenses", "", *[f"- {line}" for line in _defenses(settings)], "",
             "## Measured memorization", ""]
    evaluations = _evaluations(model, run)
    if not evaluations:
        lines += ["Not evaluated yet (`python evaluate.py run_dir=...`).", ""]
    for date, path, report in evaluations:
        where = Path(path)
        if run is not None and where.is_relative_to(run.path.resolve()):
            where = where.relative_to(run.path.resolve())
        lines += [f"### {date} ({where})", ""]
        if report.get("verdict"):
            lines += [report["verdict"]["text"], ""]
        lines += ["| figure | value |", "|---|---|"]
        context = figure_context(report)
        for field in HEADLINE:
            value = _figure(report, field)
            if value is not None:
                label = label_of(field, field.key, context).replace("**", "")
                lines.append(f"| {label} | {value} |")
        lines.append("")
    return "\n".join(meta + lines)


def write_model_card(model_dir, run_dir=None, new_report: tuple[dict, Path] | None = None) -> Path:
    """(Re)write model/README.md from the model's settings and, when given, its run's summary and
    every evaluation; `new_report` = (report, its path) is first added to the history."""
    model = ModelDir(model_dir)
    if new_report is not None:
        model.append_evaluation(evaluation_record(*new_report))
    if run_dir is None and (model.path.parent / SPLIT).is_file():
        run_dir = model.path.parent
    path = model.path / CARD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_model_card(model.path, run_dir))
    tmp.replace(path)
    return path
