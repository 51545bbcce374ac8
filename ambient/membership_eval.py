"""The membership sections of evaluate.py's report: every membership attack on a run's members
against its held-out images (the null: AUC 0.5), with bootstrap CIs, thresholds calibrated on
non-members the evaluation never sees, and a breakdown: within each class (the split's class shares
do not count) and, with planted copies, each image counted once.

The scores come from attack/membership.py (the loss attack) and attack/inversion.py (SecMI, PIA).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ambient.attack.membership import loss_scores, mia_metrics
from ambient.data import ImageSet
from ambient.pipeline import AmbientPipeline as TrainedModel
from ambient.seeding import seeded_generator

# name -> (member rows, non-member rows), boolean masks over the scored rows
DuplicationGroups = dict[str, tuple[np.ndarray, np.ndarray]]


def conditioning(model: TrainedModel, images: ImageSet):
    """What an image is attacked conditioned on: its own caption (text models; Carlini et al. 2023 prompt
    with the training caption) or label (class-conditional models), else None."""
    if model.is_text:
        return list(images.prompts)
    return images.labels if model.settings.get("num_classes") and images.labels is not None else None


def membership_scores(model: TrainedModel, images: ImageSet, cfg, batch_size: int = 256) -> torch.Tensor:
    """The loss attack's scores, conditioned on each image's own label or caption."""
    return loss_scores(model, images.as_float(), images.indices.tolist(), cfg.timestep, cfg.draws, cfg.seed,
                       conditioning(model, images), batch_size=batch_size)


MIN_NON_MEMBERS = 200  # below this the MIA figures carry wide intervals, and the report says so


def loss_attack(model: TrainedModel, members: ImageSet, holdout: ImageSet, cfg,
                rows: ScoredRows | None = None) -> dict | None:
    """The loss attack's section (membership_figures and its breakdown); None when it is off."""
    if not cfg.enabled or len(holdout) == 0 or "loss" not in cfg.get("attacks", ["loss"]):
        return None
    m, h = membership_scores(model, members, cfg), membership_scores(model, holdout, cfg)
    m, h = m.numpy(), h.numpy()
    return membership_figures(m, h, cfg) | breakdown(m, h, rows, int(cfg.seed))


def duplication_groups(members: ImageSet, holdout: ImageSet) -> DuplicationGroups | None:
    """With planted copies (dataset.duplicate) every row is scored, so an image planted 10 times weighs
    10 rows in a membership AUC (and copies of held-out images weigh on the other side). These groups
    count each image once, by its original row: every distinct member, the members planted with
    copies, and those without, each against the distinct held-out images. None without planted copies."""
    m_copy, h_copy = members.planted_copy.numpy(), holdout.planted_copy.numpy()
    if not (m_copy.any() or h_copy.any()):
        return None
    copied = np.isin(members.indices.numpy(), members.source_index[members.planted_copy].numpy()) & ~m_copy
    distinct_holdout = ~h_copy
    return {"distinct": (~m_copy, distinct_holdout), "duplicated": (copied, distinct_holdout),
            "single": (~m_copy & ~copied, distinct_holdout)}


@dataclass
class ScoredRows:
    """What the breakdown of a membership AUC needs about the scored rows: each row's class (None for
    unlabelled data) and the planted-copy groups (duplication_groups)."""

    member_classes: np.ndarray | None = None
    holdout_classes: np.ndarray | None = None
    groups: DuplicationGroups | None = None

    @classmethod
    def of(cls, members: ImageSet, holdout: ImageSet) -> ScoredRows:
        labelled = members.labels is not None and holdout.labels is not None
        return cls(members.labels.numpy() if labelled else None, holdout.labels.numpy() if labelled else None,
                   duplication_groups(members, holdout))

    def subset(self, m_rows, h_rows) -> ScoredRows:
        """The rows m_rows / h_rows (integer indices) only."""
        pick = lambda xs, rows: None if xs is None else xs[rows]  # noqa: E731
        groups = None if self.groups is None else {k: (ms[m_rows], hs[h_rows]) for k, (ms, hs) in self.groups.items()}
        return ScoredRows(pick(self.member_classes, m_rows), pick(self.holdout_classes, h_rows), groups)


def breakdown(m: np.ndarray, h: np.ndarray, rows: ScoredRows | None, seed: int) -> dict:
    """A membership attack's AUC within each class (pooled; `stratified_auc`) and per planted-copy group
    (`distinct_auc`, `duplicated_auc`, `single_auc`), each with its 95% CI; {} when neither applies.
    Why within each class: a random split of a few hundred images shares the classes unevenly (measured:
    15.5% trousers among 200 members, 8.8% among 600 held-out), and a class's difficulty moves a loss
    score far more than membership does at this scale, so the pooled AUC partly measures the split."""
    from ambient.attack.stats import mia_intervals, stratified_auc

    out = {}
    if rows is None:
        return out
    if rows.member_classes is not None and len(np.unique(rows.member_classes)) > 1:
        found = stratified_auc(m, h, rows.member_classes, rows.holdout_classes, seed=seed)
        if found is not None:
            auc, (low, high), strata = found
            out.update(stratified_auc=auc, stratified_auc_ci_low=low, stratified_auc_ci_high=high, strata=strata)
    for name, (m_rows, h_rows) in (rows.groups or {}).items():
        if not (m_rows.any() and h_rows.any()):
            continue
        low, high = mia_intervals(m[m_rows], h[h_rows], (), seed=seed)["auc"]
        out.update({f"{name}_auc": mia_metrics(m[m_rows], h[h_rows], fpr_levels=()).auc,
                    f"{name}_auc_ci_low": low, f"{name}_auc_ci_high": high, f"{name}_members": int(m_rows.sum())})
        out["distinct_non_members"] = int(h_rows.sum())
    return out


def roc_figures(m: np.ndarray, h: np.ndarray, seed: int = 0) -> dict:
    """Members vs non-members (lower score = member): AUC and TPR at 1% / 0.1% FPR with bootstrap
    95% CIs; a TPR at an FPR below 1/n_non_members is n/a, said so."""
    from ambient.attack.stats import mia_intervals

    levels = {"1%": 0.01, "0.1%": 0.001}
    res = mia_metrics(m, h, fpr_levels=tuple(levels.values()))
    ci = mia_intervals(m, h, tuple(levels.values()), seed=seed)
    out = {"auc": res.auc, "auc_ci_low": ci["auc"][0], "auc_ci_high": ci["auc"][1]}
    for name, level in levels.items():
        key = f"tpr_at_{name}_fpr"
        if ci[level] is None:
            out[key] = None
            out[f"{key}_note"] = f"n/a (need ≥ {int(np.ceil(1 / level))} non-members, have {len(h)})"
        else:
            out[key], (out[f"{key}_ci_low"], out[f"{key}_ci_high"]) = res.tpr_at_fpr[level], ci[level]
    out.update({"members": len(m), "non_members": len(h)})
    if len(h) < MIN_NON_MEMBERS:
        out["note"] = (f"{len(h)} non-members (< {MIN_NON_MEMBERS}): the intervals are wide; train with a larger "
                       "dataset.holdout where the data has the images")
    return out


def membership_figures(m: np.ndarray, h: np.ndarray, cfg) -> dict:
    """The loss attack's figures (roc_figures) and its settings.
    mia.calibration=split: the threshold for each FPR level is set on a seeded part of the
    non-members (mia.calibration_fraction) and TPR/FPR are measured on the rest, so the threshold
    never sees the evaluated labels (Carlini et al. 2022's critique of tuning on the test set)."""
    out = roc_figures(m, h, int(cfg.seed))
    out.update({"timestep": cfg.timestep, "draws": cfg.draws,
                "member_score_mean": float(m.mean()), "non_member_score_mean": float(h.mean())})
    if cfg.get("calibration", "none") == "split":
        out.update(_calibrated_threshold(m, h, {"1%": 0.01, "0.1%": 0.001}, float(cfg.calibration_fraction),
                                         int(cfg.seed)))
    return out


MIA_SECTIONS = {"loss_multi_t": "mia_multi_t", "secmi": "secmi", "pia": "pia"}  # mia.attacks -> report section


def stronger_membership(model: TrainedModel, members: ImageSet, holdout: ImageSet, cfg,
                        rows: ScoredRows | None = None) -> dict:
    """The report sections of the attacks in mia.attacks beyond the loss attack: the loss attack at the
    best of several t (chosen on a calibration split), SecMI and PIA (attack/inversion.py); None when off.
    Each also broken down by class and planted copies (breakdown)."""
    from ambient.attack.inversion import PIA_CALLS, pia_scores, secmi_calls, secmi_scores
    from ambient.attack.membership import best_timestep, calibration_split, loss_scores_over_t

    wanted = list(cfg.get("attacks", ["loss"]))
    out = {section: None for section in MIA_SECTIONS.values()}
    if not cfg.enabled or len(holdout) == 0:
        return out

    def run(attack, **kwargs):
        return [attack(model, s.as_float(), s.indices.tolist(), seed=int(cfg.seed), cond=conditioning(model, s), **kwargs
                       ).numpy() for s in (members, holdout)]

    masked = model.sampling_masks([seeded_generator(int(cfg.seed))]) is not None  # an ambient model: Ã·x
    draws = int(cfg.get("mask_draws", 1)) if masked else 1
    if "secmi" in wanted:
        t_sec, k = int(cfg.secmi.t_sec), int(cfg.secmi.interval)
        m, h = run(secmi_scores, t_sec=t_sec, interval=k, mask_draws=draws)
        out["secmi"] = _attack_figures(m, h, cfg, {"t_sec": t_sec, "interval": k, "mask_draws": draws,
                                                    "net_calls_per_image": secmi_calls(t_sec, k) * draws}, rows)
    if "pia" in wanted:
        t, p = int(cfg.pia.timestep), float(cfg.pia.p)
        m, h = run(pia_scores, timestep=t, p=p, mask_draws=draws)
        out["pia"] = _attack_figures(m, h, cfg, {"timestep": t, "p": p, "mask_draws": draws,
                                                  "net_calls_per_image": PIA_CALLS * draws}, rows)
    if "loss_multi_t" in wanted:
        steps = [int(t) for t in cfg.multi_t.timesteps]
        m, h = run(loss_scores_over_t, timesteps=steps, draws=int(cfg.draws))
        cal_m, ev_m, cal_h, ev_h = calibration_split(m.shape[1], h.shape[1], float(cfg.calibration_fraction),
                                                     int(cfg.seed))
        if min(map(len, (cal_m, ev_m, cal_h, ev_h))) == 0:
            out["mia_multi_t"] = {"note": f"{m.shape[1]} members / {h.shape[1]} non-members cannot be split by "
                                          f"mia.calibration_fraction={cfg.calibration_fraction} into a part that "
                                          "chooses t and a part that is evaluated"}
        else:
            best, aucs = best_timestep(m[:, cal_m], h[:, cal_h])  # the evaluated rows are never looked at here
            out["mia_multi_t"] = _attack_figures(m[best, ev_m], h[best, ev_h], cfg, {
                "chosen_timestep": steps[best], "t_selection_members": len(cal_m),
                "t_selection_non_members": len(cal_h), "draws": int(cfg.draws),
                "net_calls_per_image": int(cfg.draws) * len(steps)}, None if rows is None else rows.subset(ev_m, ev_h))
            out["mia_multi_t"]["t_selection_auc"] = {str(t): float(a) for t, a in zip(steps, aucs)}
    return out


def _attack_figures(m: np.ndarray, h: np.ndarray, cfg, settings: dict,
                    rows: ScoredRows | None = None) -> dict:
    """roc_figures and score means of a membership attack, its settings, with mia.calibration=split
    the thresholds set on calibration non-members (as for the loss attack), and by_duplication."""
    out = roc_figures(m, h, int(cfg.seed)) | breakdown(m, h, rows, int(cfg.seed))
    out.update({**settings, "member_score_mean": float(m.mean()), "non_member_score_mean": float(h.mean())})
    if cfg.get("calibration", "none") == "split":
        out.update(_calibrated_threshold(m, h, {"1%": 0.01, "0.1%": 0.001}, float(cfg.calibration_fraction),
                                         int(cfg.seed)))
    return out


def _calibrated_threshold(m: np.ndarray, h: np.ndarray, levels: dict, fraction: float, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(len(h))
    n_cal = int(round(fraction * len(h)))
    cal, test = h[order[:n_cal]], h[order[n_cal:]]
    out = {"calibration_non_members": len(cal), "evaluation_non_members": len(test)}
    for name, level in levels.items():
        k = int(np.floor(level * len(cal) + 1e-9))
        if level * len(cal) < 1 or len(test) == 0:
            out[f"calibrated_tpr_at_{name}_fpr"] = out[f"calibrated_fpr_at_{name}_fpr"] = None
            continue
        cut = np.sort(cal)[k]  # scores strictly below it are called members
        out[f"calibrated_tpr_at_{name}_fpr"] = float((m < cut).mean())
        out[f"calibrated_fpr_at_{name}_fpr"] = float((test < cut).mean())
    return out
