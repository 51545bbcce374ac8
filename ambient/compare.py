"""Compare defenses: one row per run, memorization against quality.

    python -m ambient.compare outputs/multirun/2026-11-25/12-00-00-000000      # a sweep
    python -m ambient.compare RUN_A RUN_B --out results/ --wandb              # runs, to wandb (offline)

Each DIR is a run directory or any folder above some (a sweep): every folder holding a
config.yaml or a failed.json is a run. Per run: the defense stack in one column (corruption kind and
level, dedup method, caption-side defenses, DP-SGD, loss-drop, augmentations), the ε spent (DP-SGD), summary.json (steps, train seconds, final loss), the newest <run>/eval*/report.json
(evaluate.py; a missing report or figure leaves its cells blank) and failed.json. Writes
comparison.md, comparison.csv and comparison.png (the trade-off: extracted beyond the null reference,
with its 95% CI, vs FID; one labelled point per evaluated run, one panel per training-set size) into --out (default: the first DIR); existing files are never overwritten:
a second comparison goes beside them as comparison-1.*.
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from omegaconf import OmegaConf

from ambient import rundir
from ambient.attack import schema
from ambient.defenses.captions import caption_label
from ambient.defenses.augment import augment_label
from ambient.defenses.dedup import dedup_kind, dedup_label
from ambient.defenses.loss_drop import drop_label
from ambient.defenses.privacy import privacy_label
from ambient.rundir import RunDir

# (column, path in report.json), from the report layout (attack/schema.py): a missing key gives a blank cell.
REPORT_COLUMNS = [(f.column, (f.section, f.key)) for f in schema.COLUMNS]
EXCESS_CI = ("calibration", "excess_at_calibrated_delta_ci")  # [low, high]: the picture's error bars
COLUMNS = (["run", "status", "defense", "corruption", "p", "dedup", "steps", "train_seconds", "final_loss", "epsilon"]
           + [name for name, _ in REPORT_COLUMNS] + ["excess_ci_low", "excess_ci_high", "report", "error"])
MD_COLUMNS = ([("run", "run"), ("defense", "defense"), ("status", "status"), ("steps", "steps"),
               ("train_seconds", "train s"), ("final_loss", "final loss"), ("epsilon", "ε spent")]
              + [(f.column, f.column.replace("_", " ")) for f in schema.COLUMNS if f.summary])


def find_runs(root: Path) -> list[Path]:
    """root itself if it is a run, else every run below it (not inside another run's internals)."""
    root = Path(root)
    if RunDir(root).is_run():
        return [root]
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in rundir.INTERNAL_DIRS and not d.startswith(rundir.HYDRA))
        if rundir.CONFIG in filenames or rundir.FAILED in filenames:
            found.add(Path(dirpath))
            dirnames[:] = []  # a run's eval*/ folders are not runs
    return sorted(found)


def _read_json(path: Path) -> dict:
    try:
        return rundir.read_json(path)
    except (OSError, ValueError):
        return {}


def dig(data, keys):
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def defense_label(cfg: dict) -> tuple[str, str, object, str]:
    """(label, corruption kind, level, dedup kind) from a run's config; each defense names itself."""
    c = cfg.get("corruption") or {}
    c = c if isinstance(c, dict) else {"kind": c}
    kind = str(c.get("kind", "none"))
    level = {"mask": c.get("p"), "box": c.get("size"), "box_official": c.get("p"), "noise": c.get("sigma")}.get(kind)
    try:
        from ambient.defenses.corruption import build_corruption

        label = build_corruption(OmegaConf.create(c)).label
    except (ValueError, KeyError, TypeError, AttributeError):  # unknown or incomplete: still a row
        label = kind
    if kind == "noise":  # how the noisy images were trained on (runs saved before loss.noisy: naive)
        loss = cfg.get("loss") if isinstance(cfg.get("loss"), dict) else {}
        ambient = loss.get("kind", "edm") == "edm" and loss.get("noisy", "naive") == "ambient"
        label += " (ambient)" if ambient else " (naive)"
    if c.get("mask_key") == "content":
        label += " (one mask per duplicate group)"
    d = cfg.get("dedup")
    method = dedup_kind(d if isinstance(d, dict) else {"kind": d})
    method = "" if method.lower() in ("", "none", "false", "null") else method
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    parts = [label, dedup_label(d if isinstance(d, dict) else {"kind": d}), _caption_defense(cfg),
             privacy_label(cfg.get("privacy")), drop_label(train.get("loss_drop")), augment_label(train.get("augment"))]
    return " + ".join(p for p in parts if p), kind, level, method


# The caption-side defenses of a text-conditional run.
def _caption_defense(cfg: dict) -> str:
    encoder, captions = cfg.get("text_encoder"), cfg.get("captions")
    if not isinstance(encoder, dict) or encoder.get("kind", "none") == "none" or not isinstance(captions, dict):
        return ""
    return caption_label(captions)


def gather(run: Path, base: Path) -> dict:
    """One row: everything known about a run; unknown values are None (blank cells)."""
    cfg = RunDir(run).read_config()
    summary = _read_json(RunDir(run).summary)
    failed = _read_json(RunDir(run).failed) if RunDir(run).failed.is_file() else None
    label, kind, level, method = defense_label(cfg)
    status = "finished" if summary else "failed" if failed is not None else "incomplete"
    name = run.relative_to(base).as_posix() if run != base else run.name
    row = dict.fromkeys(COLUMNS)
    row.update(run=name or str(run), status=status, defense=label, corruption=kind, p=level, dedup=method or None,
               steps=summary.get("steps", dig(cfg, ("train", "steps"))), train_seconds=summary.get("train_seconds"),
               final_loss=summary.get("final_loss"), epsilon=(summary.get("privacy") or {}).get("epsilon"))
    report_path = RunDir(run).newest_report()
    if report_path is not None:
        try:
            report = rundir.read_json(report_path)
        except (OSError, ValueError) as err:  # say so: a blank row would read as "not evaluated"
            report = {}
            row["error"] = f"unreadable report {report_path.relative_to(run)}: {err}"
        row.update({name: dig(report, keys) for name, keys in REPORT_COLUMNS})
        ci = dig(report, EXCESS_CI)
        if isinstance(ci, list) and len(ci) == 2:
            row["excess_ci_low"], row["excess_ci_high"] = ci
        row["report"] = str(report_path.relative_to(run))
        if row["extracted_fraction"] is None and row["extracted"] is not None and row["train_images"]:
            row["extracted_fraction"] = row["extracted"] / row["train_images"]
    if failed is not None and status != "finished":
        row["error"] = str(failed.get("error", "unknown error"))
    return row


def _cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("x", newline="") as f:  # "x": never overwrite
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])


def write_markdown(rows: list[dict], path: Path, png: Path, dirs) -> None:
    lines = ["# Defenses compared", "", "Runs under: " + ", ".join(f"`{d}`" for d in dirs), "",
             "| " + " | ".join(h for _, h in MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[k]) for k, _ in MD_COLUMNS) + " |" for row in rows]
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "## Failed runs and unreadable reports", ""] + [f"- `{r['run']}` ({r['defense']}): {_cell(r['error'])}" for r in failed]
    lines += ["", "Extracted: training images with some generation within normalized l2 delta (Carlini et al. 2023, "
              "Def. 1), as a fraction of the training images; null: the same with held-out real images the model "
              "never saw in place of the generations (a run at its null level copies nothing measurable). FID "
              "against held-out real images on evaluate.py's features (lower is better; older reports: against "
              "the training images). Blank: not evaluated.", "",
              f"![memorization vs quality]({png.name})", ""]
    with path.open("x") as f:
        f.write("\n".join(lines))


def tradeoff_points(rows: list[dict]) -> dict[int, list[dict]]:
    """The picture's points per training-set size (0: unknown): quality (FID vs held-out, else vs the
    training images) and memorization — the excess over the null reference at the calibrated δ as a
    fraction of the training images, with its 95% CI (`calibrated`), or for reports without the null the
    plain extracted fraction (`calibrated` False). Runs missing either are left out."""
    panels: dict[int, list[dict]] = {}
    for r in rows:
        fid = r["fid"] if r["fid"] is not None else r.get("fid_train")
        n = r["train_images"]
        if r["excess_at_calibrated"] is not None and n:
            lo, hi = r["excess_ci_low"], r["excess_ci_high"]
            y, ci, calibrated = r["excess_at_calibrated"] / n, None if lo is None else (lo / n, hi / n), True
        else:
            y, ci, calibrated = r["extracted_fraction"], None, False
        if fid is None or y is None:
            continue
        panels.setdefault(n or 0, []).append(
            {"run": r["run"], "defense": r["defense"], "fid": fid, "y": y, "ci": ci, "calibrated": calibrated})
    return dict(sorted(panels.items()))


def plot(rows: list[dict], path: Path) -> int:
    """The trade-off: memorization (extracted beyond the null, tradeoff_points) against quality, a labelled
    point per evaluated run, one panel per training-set size; 0 (dashed) is the null level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = tradeoff_points(rows)
    sizes = list(panels) or [0]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.6), sharey=True, squeeze=False)
    colours = {d: f"C{k % 10}" for k, d in enumerate(sorted({p["defense"] for ps in panels.values() for p in ps}))}
    for ax, size in zip(axes[0], sizes):
        here = panels.get(size, [])
        for p in here:
            err = None if p["ci"] is None else [[max(0.0, p["y"] - p["ci"][0])], [max(0.0, p["ci"][1] - p["y"])]]
            ax.errorbar(p["fid"], p["y"], yerr=err, fmt="o", mfc=None if p["calibrated"] else "none",
                        color=colours[p["defense"]], capsize=3, ms=7)
            label = f"{p['defense']}\n{p['run']}" if len(here) > len({q["defense"] for q in here}) else p["defense"]
            ax.annotate(label, (p["fid"], p["y"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.axhline(0, color="0.5", ls="--", lw=1)
        ax.set_title(f"{size:,} training images" if size else "training-set size unknown", fontsize=10)
        ax.set_xlabel("FID vs held-out real images (quality; lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("memorization: extracted beyond the null (fraction, 95% CI)\n"
                          "open marker: extracted fraction, no null in the report")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no run has both an extraction result and an FID yet\n(run evaluate.py on the runs)",
                        ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle("memorization vs quality per defense (dashed: the null level)", fontsize=11)
    fig.tight_layout()
    with path.open("xb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return sum(len(ps) for ps in panels.values())


def log_wandb(rows: list[dict], png: Path, mode: str, project: str, out: Path) -> None:
    import wandb

    run = wandb.init(project=project, job_type="compare", mode=mode, dir=str(out), reinit="finish_previous")
    try:
        table = wandb.Table(columns=COLUMNS, data=[[_cell(r[c]) if c in ("p", "error") else r[c] for c in COLUMNS]
                                                   for r in rows])
        run.log({"comparison": table, "memorization_vs_quality": wandb.Image(str(png))})
    finally:
        run.finish()


def compare(dirs, out: Path | None = None, wandb_mode: str | None = None, project: str = "ambient") -> dict:
    """Gather every run under dirs and write the comparison; returns {"rows", "md", "csv", "png"}."""
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a directory")
    rows, seen = [], set()
    for d in dirs:
        for run in find_runs(d):
            if run.resolve() not in seen:
                seen.add(run.resolve())
                rows.append(gather(run, d))
    out = Path(out) if out is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    stem, _ = rundir.free_stem(out, "comparison", (".md", ".csv", ".png"))
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "csv", "png")}
    plot(rows, paths["png"])
    write_csv(rows, paths["csv"])
    write_markdown(rows, paths["md"], paths["png"], dirs)
    if wandb_mode:
        log_wandb(rows, paths["png"], wandb_mode, project, out)
    return {"rows": rows, **paths}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ambient.compare", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first DIR)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plot to wandb")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--project", default="ambient")
    args = parser.parse_args(argv)
    for d in args.dirs:
        if not d.is_dir():
            parser.error(f"{d}: not a directory")
    result = compare(args.dirs, args.out, args.wandb_mode if args.wandb else None, args.project)
    rows = result["rows"]
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"{len(rows)} runs ({failed} failed)")
    for ext in ("md", "csv", "png"):
        print(f"{ext + ':':5}{result[ext]}")


if __name__ == "__main__":
    main()
