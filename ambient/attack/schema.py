"""The report layout, declared once: every figure of report.json with its label and format.

report.md's table, the wandb flattening and `ambient.compare`'s columns are all driven by
`FIELDS`. A new metric adds its function in attack/ and its fields here; a figure that is not
declared is caught by tests/test_architecture.py instead of silently missing from wandb.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

# Top-level report keys that hold settings and provenance, not figures.
NOT_FIGURES = ("thresholds", "source", "picture", "picture_caption", "null", "verdict", "distances",
               "histogram", "histogram_caption")


@dataclass(frozen=True)
class Field:
    section: str
    key: str                   # may end in "*" for a family of keys (replication thresholds)
    label: str                 # report.md's row label; may name thresholds, e.g. {delta}
    fmt: str = "g"             # "g" (4 significant digits), "int", "pct"
    column: str | None = None  # ambient.compare's column for this figure (None: not compared)
    summary: bool = False      # also in comparison.md's short table

    @property
    def path(self) -> str:
        return f"{self.section}/{self.key}"


FIELDS: tuple[Field, ...] = (
    Field("counts", "generations", "generations", "int", "generations"),
    Field("counts", "prompts", "prompts", "int"),
    Field("counts", "train_images", "training images", "int", "train_images"),
    Field("extraction", "extracted", "**extracted training images** (Def. 1: some generation within ℓ2 ≤ {delta:.4g})",
          "int", "extracted", True),
    Field("extraction", "extracted_fraction", "extracted fraction of the training images", "pct",
          "extracted_fraction", True),
    Field("extraction", "extracted_nearest", "extracted, counting only each generation's nearest training image",
          "int", "extracted_nearest"),
    Field("extraction", "generations_within_delta", "generations within δ of a training image", "int"),
    Field("extraction", "adaptive_extracted", "extracted by the adaptive score (α={adaptive_alpha}, n={adaptive_n})",
          "int", "adaptive_extracted"),
    Field("extraction", "adaptive_generations", "generations passing the adaptive score", "int"),
    Field("extraction", "adaptive_n", "adaptive score: neighbours used (n, clipped to the training set)", "int"),
    Field("extraction", "delta", "δ used (paper: 0.15; attack.delta=auto: calibrated)"),
    Field("cliques", "flagged", "flagged cliques (tiled ℓ2 < {edge_threshold}, ≥ {min_clique})", "int",
          "cliques_flagged"),
    Field("cliques", "precision", "clique precision"),
    Field("memorization", "gu_fraction", "Gu et al. memorized fraction (ratio < {gu_threshold:.3g})", "g",
          "gu_fraction", True),
    Field("memorization", "gu_ratio_median", "Gu et al. median nearest / second-nearest ratio"),
    Field("memorization", "nn_distance_mean", "mean nearest-training ℓ2", "g", "nn_distance_mean"),
    Field("memorization", "nn_distance_min", "min nearest-training ℓ2"),
    Field("replication", "above_0.5", "replication: cosine > 0.5 fraction", "g", "replication_0.5"),
    Field("replication", "above_0.95", "replication: cosine > 0.95 fraction", "g", "replication_0.95"),
    Field("replication", "above_*", "replication: cosine > {suffix} fraction"),
    Field("quality", "fid", "FID vs held-out real images ({features})", "g", "fid", True),
    Field("quality", "kid", "KID vs held-out real images ({features})", "g", "kid", True),
    Field("quality", "kid_std", "KID std over subsets (held-out)"),
    Field("quality", "fid_train", "FID vs the training images ({features}; rewards copying)", "g", "fid_train"),
    Field("quality", "kid_train", "KID vs the training images ({features})", "g", "kid_train"),
    Field("quality", "kid_train_std", "KID std over subsets (training)"),
    Field("calibration", "delta", "calibrated δ (the null extracts ≤ 0.1% of training images)", "g",
          "calibrated_delta"),
    Field("calibration", "paper_delta", "the paper's δ"),
    Field("calibration", "extracted_at_paper_delta", "extracted at the paper's δ", "int", "extracted_at_0.15"),
    Field("calibration", "null_extracted_at_paper_delta", "null reference: extracted at the paper's δ", "int",
          "null_extracted_at_0.15"),
    Field("calibration", "excess_at_paper_delta", "excess over the null at the paper's δ", "int"),
    Field("calibration", "extracted_at_calibrated_delta", "extracted at the calibrated δ", "int",
          "extracted_at_calibrated", True),
    Field("calibration", "null_extracted_at_calibrated_delta", "null reference: extracted at the calibrated δ",
          "int", "null_extracted_at_calibrated", True),
    Field("calibration", "excess_at_calibrated_delta", "excess over the null at the calibrated δ", "int",
          "excess_at_calibrated"),
    Field("lowpass", "sigma", "low-pass σ (px) of the Def. 1 check for copies under noise"),
    Field("lowpass", "delta", "low-passed calibrated δ"),
    Field("lowpass", "extracted", "extracted after the low-pass (copies under noise)", "int", "lowpass_extracted"),
    Field("lowpass", "null_extracted", "null reference: extracted after the low-pass", "int", "lowpass_null_extracted"),
    Field("lowpass", "excess", "excess over the null after the low-pass", "int"),
    Field("excess", "*", "excess over the null: {suffix}"),
    Field("semantic", "confident_fraction", "generations a real-image classifier labels with confidence > {confidence}",
          "g", "confident_fraction", True),
    Field("semantic", "real_confident_fraction", "held-out real images labelled with confidence > {confidence} "
          "(the reference)", "g", "real_confident_fraction", True),
    Field("semantic", "class_balance", "balance of the generations' predicted classes (1 = uniform)", "g",
          "class_balance"),
    Field("semantic", "real_class_balance", "balance of held-out real images' predicted classes"),
    Field("semantic", "label_accuracy", "generations classified as the class they were prompted with", "g",
          "label_accuracy"),
    Field("semantic", "real_label_accuracy", "classifier accuracy on held-out real images"),
    Field("semantic", "classifier_train_images", "real images the classifier trained on", "int"),
    Field("semantic", "reference_images", "held-out real images (the reference)", "int"),
    Field("semantic", "confidence", "classifier confidence threshold"),
    Field("mia", "auc", "membership inference AUC", "g", "mia_auc", True),
    Field("mia", "auc_ci_low", "membership inference AUC, 95% CI low", "g", "mia_auc_ci_low"),
    Field("mia", "auc_ci_high", "membership inference AUC, 95% CI high", "g", "mia_auc_ci_high"),
    Field("mia", "tpr_at_1%_fpr", "membership inference TPR at 1% FPR", "g", "mia_tpr_at_1%_fpr"),
    Field("mia", "tpr_at_0.1%_fpr", "membership inference TPR at 0.1% FPR"),
    Field("mia", "tpr_at_*_fpr_ci_*", "membership inference TPR at FPR: 95% CI bound"),
    Field("mia", "calibrated_tpr_at_*_fpr", "TPR with the threshold set on calibration non-members"),
    Field("mia", "calibrated_fpr_at_*_fpr", "FPR on evaluation non-members with that threshold"),
    Field("mia", "calibration_non_members", "non-members used to set the threshold", "int"),
    Field("mia", "evaluation_non_members", "non-members it was evaluated on", "int"),
    Field("reconstruction", "auc", "reconstruction attack AUC (members vs held-out, best completion's hidden-region ℓ2)",
          "g", "reconstruction_auc", True),
    Field("reconstruction", "auc_ci_*", "reconstruction attack AUC: 95% CI bound"),
    Field("reconstruction", "tpr_at_1%_fpr", "reconstruction attack TPR at 1% FPR", "g", "reconstruction_tpr_at_1%_fpr"),
    Field("reconstruction", "tpr_at_0.1%_fpr", "reconstruction attack TPR at 0.1% FPR"),
    Field("reconstruction", "tpr_at_*_fpr_ci_*", "reconstruction attack TPR at FPR: 95% CI bound"),
    Field("reconstruction", "reconstructed_members", "members reconstructed within δ on the hidden region", "g",
          "reconstructed_members", True),
    Field("reconstruction", "reconstructed_non_members", "held-out images reconstructed within δ (the null)", "g",
          "reconstructed_non_members", True),
    Field("reconstruction", "member_distance_mean", "mean best hidden-region ℓ2, members"),
    Field("reconstruction", "non_member_distance_mean", "mean best hidden-region ℓ2, held-out"),
    Field("reconstruction", "members", "members attacked", "int"),
    Field("reconstruction", "non_members", "held-out images attacked", "int"),
    Field("reconstruction", "fraction", "hidden fraction"),
    Field("reconstruction", "samples", "completions per image", "int"),
    Field("reconstruction", "delta", "reconstruction δ"),
    Field("mia", "members", "members scored", "int"),
    Field("mia", "non_members", "non-members scored", "int"),
    Field("mia", "timestep", "loss attack timestep t", "int"),
    Field("mia", "draws", "noise draws per image", "int"),
    Field("mia", "member_score_mean", "mean member loss"),
    Field("mia", "non_member_score_mean", "mean non-member loss"),
)



def _breakdown(section: str, name: str) -> tuple[Field, ...]:
    """A membership attack's AUC within each class and counting each image once (membership_eval.breakdown)."""
    return (
        Field(section, "stratified_auc", f"{name} AUC within each class, pooled (the split's class shares do not count)",
              "g", f"{section}_stratified_auc", section == "mia"),
        Field(section, "stratified_auc_ci_*", f"{name} AUC within each class, 95% CI bound"),
        Field(section, "strata", f"{name}: classes with members and held-out images", "int"),
        Field(section, "distinct_auc", f"{name} AUC, each image once (planted copies not counted)", "g",
              f"{section}_distinct_auc"),
        Field(section, "duplicated_auc", f"{name} AUC: members planted with copies vs held-out", "g",
              f"{section}_duplicated_auc"),
        Field(section, "single_auc", f"{name} AUC: members without copies vs held-out", "g", f"{section}_single_auc"),
        Field(section, "*_auc_ci_*", f"{name} AUC by duplication, 95% CI bound"),
        Field(section, "distinct_members", f"{name}: distinct members", "int"),
        Field(section, "duplicated_members", f"{name}: members planted with copies", "int"),
        Field(section, "single_members", f"{name}: members without copies", "int"),
        Field(section, "distinct_non_members", f"{name}: distinct held-out images", "int"),
    )


def _membership_attack(section: str, name: str, settings: tuple[Field, ...]) -> tuple[Field, ...]:
    """The figures every membership attack reports (as the loss attack's above), then its settings."""
    return (
        Field(section, "auc", f"{name} AUC", "g", f"{section}_auc", True),
        Field(section, "auc_ci_low", f"{name} AUC, 95% CI low", "g", f"{section}_auc_ci_low"),
        Field(section, "auc_ci_high", f"{name} AUC, 95% CI high", "g", f"{section}_auc_ci_high"),
        Field(section, "tpr_at_1%_fpr", f"{name} TPR at 1% FPR", "g", f"{section}_tpr_at_1%_fpr"),
        Field(section, "tpr_at_0.1%_fpr", f"{name} TPR at 0.1% FPR"),
        Field(section, "tpr_at_*_fpr_ci_*", f"{name} TPR at FPR: 95% CI bound"),
        Field(section, "calibrated_tpr_at_*_fpr", f"{name}: TPR with the threshold set on calibration non-members"),
        Field(section, "calibrated_fpr_at_*_fpr", f"{name}: FPR on evaluation non-members with that threshold"),
        Field(section, "calibration_non_members", f"{name}: non-members used to set the threshold", "int"),
        Field(section, "evaluation_non_members", f"{name}: non-members it was evaluated on", "int"),
        Field(section, "members", f"{name}: members scored", "int"),
        Field(section, "non_members", f"{name}: non-members scored", "int"),
        Field(section, "member_score_mean", f"{name}: mean member score"),
        Field(section, "non_member_score_mean", f"{name}: mean non-member score"),
        Field(section, "net_calls_per_image", f"{name}: denoiser calls per image", "int"),
    ) + _breakdown(section, name) + settings


FIELDS += _breakdown("mia", "membership inference")
# The stronger membership attacks (mia.attacks; attack/membership.py, attack/inversion.py).
FIELDS += _membership_attack("mia_multi_t", "loss attack at the t chosen on a calibration split", (
    Field("mia_multi_t", "chosen_timestep", "loss attack: t chosen on the calibration split", "int",
          "mia_multi_t_timestep"),
    Field("mia_multi_t", "t_selection_members", "loss attack: members that chose t (not evaluated)", "int"),
    Field("mia_multi_t", "t_selection_non_members", "loss attack: non-members that chose t (not evaluated)", "int"),
    Field("mia_multi_t", "draws", "loss attack at the chosen t: noise draws per image and t", "int"),
))
FIELDS += _membership_attack("secmi", "SecMI (t-error)", (
    Field("secmi", "t_sec", "SecMI t_SEC", "int"),
    Field("secmi", "interval", "SecMI step interval k", "int"),
    Field("secmi", "mask_draws", "SecMI: sampling masks per image", "int"),
))
FIELDS += _membership_attack("pia", "PIA (proximal initialization)", (
    Field("pia", "timestep", "PIA t", "int"),
    Field("pia", "p", "PIA ℓ_p exponent"),
    Field("pia", "mask_draws", "PIA: sampling masks per image", "int"),
))
# Canaries (dataset.duplicate kind=canary; attack/exposure.py), by times planted m, references as the null.
FIELDS += (
    Field("canaries", "planted", "canaries planted (distinct patterns)", "int"),
    Field("canaries", "references", "reference canaries (same kind, never planted)", "int"),
    Field("canaries", "exposure", "canary exposure, mean over planted canaries (bits)", "g", "canary_exposure", True),
    Field("canaries", "reference_exposure", "reference canaries' exposure among each other (the null, bits)", "g",
          "canary_reference_exposure"),
    Field("canaries", "max_exposure", "largest possible exposure, log2(references + 1)"),
    Field("canaries", "exposure_m*", "canaries planted {suffix}×: mean exposure (bits)"),
    Field("canaries", "rank1_m*", "canaries planted {suffix}×: ranked first (lower loss than every reference)"),
    Field("canaries", "extracted_m*", "canaries planted {suffix}×: extracted (a generation within ℓ2 δ)"),
    Field("canaries", "reference_extracted", "reference canaries within δ of a generation (the null)"),
    Field("canaries", "reconstruction_m*", "canaries planted {suffix}×: mean best hidden-region ℓ2"),
    Field("canaries", "reference_reconstruction", "reference canaries: mean best hidden-region ℓ2 (the null)"),
    Field("canaries", "delta", "canary extraction δ"),
    Field("canaries", "timestep", "canary exposure: loss attack t", "int"),
    Field("canaries", "draws", "canary exposure: noise draws per image", "int"),
)

# Sections whose CI bounds report.md folds into the figure's cell.
MEMBERSHIP_SECTIONS = ("mia", "mia_multi_t", "secmi", "pia", "reconstruction")

COLUMNS: tuple[Field, ...] = tuple(f for f in FIELDS if f.column)


def is_figure(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def field_for(section: str, key: str) -> Field | None:
    """The declared field of report[section][key] (exact keys before families)."""
    for f in FIELDS:
        if f.section == section and f.key == key:
            return f
    for f in FIELDS:
        if f.section == section and fnmatch.fnmatchcase(key, f.key):
            return f
    return None


def figures(report: dict) -> list[tuple[str, str, object]]:
    """(section, key, value) of every scalar figure in a report, in report order."""
    out = []
    for section, body in report.items():
        if section in NOT_FIGURES or not isinstance(body, dict):
            continue
        out += [(section, key, value) for key, value in body.items() if is_figure(value) or value is None]
    return out


def lookup(report: dict, field: Field):
    return (report.get(field.section) or {}).get(field.key)


def flatten(report: dict) -> dict[str, float]:
    """`section/key` -> value for every declared numeric figure (what wandb logs)."""
    return {f"{s}/{k}": v for s, k, v in figures(report) if is_figure(v) and field_for(s, k) is not None}


def format_value(value, fmt: str = "g") -> str:
    if value is None:
        return "n/a"
    if fmt == "int" and is_figure(value):
        return str(int(value))
    if fmt == "pct" and is_figure(value):
        return f"{value:.2%}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def label_of(field: Field, key: str, context: dict) -> str:
    """The field's label with thresholds and settings filled in; unknown names are left as is."""
    suffix = key.removeprefix(field.key.rstrip("*")) if field.key.endswith("*") else ""
    try:
        return field.label.format(suffix=suffix, **context)
    except (KeyError, ValueError, IndexError):
        return field.label
