"""Memorization vs training steps for one run (Gu et al. 2023 track memorization over training).

    python evaluate.py -m run_dir=RUN checkpoint=1000,2000,3000    # each kept checkpoint's EMA model
    python -m ambient.trajectory RUN [--out DIR]

Reads `<run>/eval-step-*/report.json` (earlier checkpoints) and the final model's newest report, and
writes memorization_vs_steps.{md,csv,png} (beside any earlier ones, never over them): per step the
extraction at the calibrated δ and the Gu et al. fraction with their null levels and 95% CIs of the
excess, membership and reconstruction AUCs with CIs, and FID against held-out images.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ambient import rundir
from ambient.compare import dig
from ambient.rundir import RunDir

COLUMNS = ["step", "model", "train_images", "delta", "extracted", "null_extracted", "excess_ci_low", "excess_ci_high",
           "gu_fraction", "null_gu_fraction", "gu_excess_ci_low", "gu_excess_ci_high", "mia_auc", "mia_auc_ci_low",
           "mia_auc_ci_high", "reconstruction_auc", "reconstruction_auc_ci_low", "reconstruction_auc_ci_high", "fid",
           "label_accuracy", "report"]


def _ci(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) and len(value) == 2 else (None, None)


def row_of(report: dict, path: Path, run: Path, final_step: int | None) -> dict:
    """One point of the curve from one evaluation report."""
    step = dig(report, ("source", "checkpoint_step"))
    calibration = report.get("calibration") or {}
    lo, hi = _ci(calibration.get("excess_at_calibrated_delta_ci"))
    glo, ghi = _ci(dig(report, ("excess", "gu_fraction_ci")))
    return {
        "step": step if step is not None else final_step, "model": "final" if step is None else "checkpoint",
        "train_images": dig(report, ("counts", "train_images")), "delta": calibration.get("delta"),
        "extracted": calibration.get("extracted_at_calibrated_delta"),
        "null_extracted": calibration.get("null_extracted_at_calibrated_delta"),
        "excess_ci_low": lo, "excess_ci_high": hi,
        "gu_fraction": dig(report, ("memorization", "gu_fraction")),
        "null_gu_fraction": dig(report, ("null", "memorization", "gu_fraction")),
        "gu_excess_ci_low": glo, "gu_excess_ci_high": ghi,
        "mia_auc": dig(report, ("mia", "auc")), "mia_auc_ci_low": dig(report, ("mia", "auc_ci_low")),
        "mia_auc_ci_high": dig(report, ("mia", "auc_ci_high")),
        "reconstruction_auc": dig(report, ("reconstruction", "auc")),
        "reconstruction_auc_ci_low": dig(report, ("reconstruction", "auc_ci_low")),
        "reconstruction_auc_ci_high": dig(report, ("reconstruction", "auc_ci_high")),
        "fid": dig(report, ("quality", "fid")), "label_accuracy": dig(report, ("semantic", "label_accuracy")),
        "report": str(path.relative_to(run)),
    }


def gather(run: Path) -> list[dict]:
    """Every evaluated step of the run, in step order (the final model last at equal steps)."""
    run = Path(run)
    summary = rundir.read_json(RunDir(run).summary) if RunDir(run).summary.is_file() else {}
    final_step = summary.get("steps")
    paths = list(RunDir(run).step_reports())
    newest = RunDir(run).newest_report()
    if newest is not None:
        paths.append(newest)
    rows = []
    for path in paths:
        try:
            rows.append(row_of(rundir.read_json(path), path, run, final_step))
        except (OSError, ValueError):
            continue  # a report cut short by a kill: its step is simply missing from the curve
    return sorted(rows, key=lambda r: (r["step"] is None, r["step"] or 0, r["model"] == "final"))


def _fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _ci_text(lo, hi) -> str:
    return "" if lo is None else f" [{_fmt(lo)}, {_fmt(hi)}]"


def write_markdown(rows: list[dict], path: Path, png: Path, run: Path) -> None:
    lines = [f"# Memorization vs training steps: `{run}`", "",
             "| step | extracted at calibrated δ (null; excess 95% CI) | Gu memorized (null; excess CI) | "
             "MIA AUC [CI] | reconstruction AUC [CI] | FID vs held-out | label accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        step = f"{_fmt(r['step'])}" + (" (final)" if r["model"] == "final" else "")
        lines.append(
            f"| {step} | {_fmt(r['extracted'])} / {_fmt(r['train_images'])} ({_fmt(r['null_extracted'])};"
            f"{_ci_text(r['excess_ci_low'], r['excess_ci_high'])}) | {_fmt(r['gu_fraction'])} "
            f"({_fmt(r['null_gu_fraction'])};{_ci_text(r['gu_excess_ci_low'], r['gu_excess_ci_high'])}) | "
            f"{_fmt(r['mia_auc'])}{_ci_text(r['mia_auc_ci_low'], r['mia_auc_ci_high'])} | "
            f"{_fmt(r['reconstruction_auc'])}{_ci_text(r['reconstruction_auc_ci_low'], r['reconstruction_auc_ci_high'])} "
            f"| {_fmt(r['fid'])} | {_fmt(r['label_accuracy'])} |")
    if not rows:
        lines.append("| no evaluated step yet: `python evaluate.py -m run_dir=RUN checkpoint=STEP,...` | | | | | | |")
    lines += ["", "Each row attacks the EMA model of one checkpoint (the final model last) with the same settings; the "
              "null is the same attack with held-out real images in place of the generations, so it does not change "
              "with the step. AUC 0.5 = chance.", "", f"![memorization vs steps]({png.name})", ""]
    with path.open("x") as f:
        f.write("\n".join(lines))


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("x", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: "" if r.get(k) is None else r[k] for k in COLUMNS} for r in rows])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["step"] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    def series(key, lo=None, hi=None, scale=None):
        pts = [r for r in rows if r[key] is not None]
        xs = [r["step"] for r in pts]
        div = [(r[scale] or 1) if scale else 1 for r in pts]
        ys = [r[key] / d for r, d in zip(pts, div)]
        err = None
        if lo and all(r[lo] is not None for r in pts) and pts:
            err = [[y - r[lo] / d for r, y, d in zip(pts, ys, div)], [r[hi] / d - y for r, y, d in zip(pts, ys, div)]]
        return xs, ys, err

    ax = axes[0]
    xs, ys, _ = series("extracted", scale="train_images")
    ax.plot(xs, ys, "o-", label="model")
    nx, ny, _ = series("null_extracted", scale="train_images")
    ax.plot(nx, ny, "k--", label="null (unseen real images)")
    xs, ys, _ = series("gu_fraction")
    ax.plot(xs, ys, "s-", label="Gu et al. memorized fraction")
    ax.set_title("copying: extracted fraction at calibrated δ")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, marker in (("mia_auc", "o-"), ("reconstruction_auc", "s-")):
        xs, ys, err = series(key, f"{key}_ci_low", f"{key}_ci_high")
        if xs:
            ax.errorbar(xs, ys, yerr=err, fmt=marker, capsize=3, label=key.replace("_", " "))
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    ax.set_ylim(0.3, 1.02)
    ax.set_title("membership: AUC (95% CI)")
    ax.legend(fontsize=8)
    ax = axes[2]
    xs, ys, _ = series("fid")
    ax.plot(xs, ys, "o-")
    ax.set_title("quality: FID vs held-out (lower is better)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with path.open("xb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def trajectory(run: Path, out: Path | None = None) -> dict:
    run = Path(run)
    if not RunDir(run).is_run():
        raise FileNotFoundError(f"{run}: not a run directory written by train.py")
    rows = gather(run)
    out = Path(out) if out is not None else run
    out.mkdir(parents=True, exist_ok=True)
    stem, _ = rundir.free_stem(out, "memorization_vs_steps", (".md", ".csv", ".png"))
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "csv", "png")}
    plot(rows, paths["png"], str(run))
    write_csv(rows, paths["csv"])
    write_markdown(rows, paths["md"], paths["png"], run)
    return {"rows": rows, **paths}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ambient.trajectory", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run directory with eval-step-*/ reports")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the run directory)")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        parser.error(f"{args.run}: not a directory")
    result = trajectory(args.run, args.out)
    print(f"{len(result['rows'])} evaluated steps")
    for ext in ("md", "csv", "png"):
        print(f"{ext + ':':5}{result[ext]}")


if __name__ == "__main__":
    main()
