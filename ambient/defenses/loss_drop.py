"""Drop suspiciously well-fitted samples from the loss (Wen et al. 2024, training-time mitigation).

Wen et al. flag a text prompt as memorized when its conditional noise prediction is unusually strong,
and leave such samples out of that step's loss. For class-conditional and unconditional models we use
the per-sample loss itself: a sample whose loss is below the running `quantile` of recent losses *at
the same noise level* is dropped (its weight in the step's mean is 0). Losses differ by orders of
magnitude across noise levels, so the running quantiles are kept per noise-level bin: the loss reports
each sample's level as a number in [0, 1) (EDM: Φ((ln σ − P_mean)/P_std), uniform under its σ
distribution; DDPM: t/T), cut into `bins` equal bins.

    python train.py train.loss_drop.quantile=0.1          # drop the lowest-loss 10% per noise level

No sample is dropped before `warmup` steps or while its bin holds fewer than `min_count` losses.
Counts are logged (`loss_dropped` per step, mean over the log interval) and kept per image in
summary.json (`loss_drop`: totals and the most dropped images). Each process keeps its own quantiles.
"""
from __future__ import annotations

import torch


class LossDrop:
    def __init__(self, quantile: float, window: int = 256, bins: int = 8, warmup: int = 100, min_count: int = 32):
        self.quantile, self.window, self.bins = float(quantile), int(window), int(bins)
        self.warmup, self.min_count = int(warmup), int(min_count)
        self.buffers = [torch.empty(0) for _ in range(self.bins)]  # recent log-losses per noise-level bin
        self.dropped, self.seen = {}, {}  # per stable image index
        self.interval = 0  # dropped since the last log line

    def weights(self, losses: torch.Tensor, levels: torch.Tensor, indices: torch.Tensor, step: int) -> torch.Tensor:
        """1 for the samples kept in this step's loss, 0 for the dropped; then remember these losses."""
        log_loss = losses.detach().float().clamp_min(1e-20).log().cpu()
        which = (levels.detach().float().cpu() * self.bins).long().clamp(0, self.bins - 1)
        keep = torch.ones_like(log_loss)
        if step >= self.warmup:
            for b in which.unique().tolist():
                buf = self.buffers[b]
                if len(buf) >= self.min_count:
                    threshold = torch.quantile(buf, self.quantile)
                    sel = which == b
                    keep[sel] = (log_loss[sel] >= threshold).float()
        for b in which.unique().tolist():  # after deciding: a sample is not compared with itself
            self.buffers[b] = torch.cat([self.buffers[b], log_loss[which == b]])[-self.window:]
        for index, kept in zip(indices.tolist(), keep.tolist()):
            self.seen[index] = self.seen.get(index, 0) + 1
            if not kept:
                self.dropped[index] = self.dropped.get(index, 0) + 1
        self.interval += int((keep == 0).sum())
        return keep.to(losses.device)

    def reduce(self, losses: torch.Tensor, levels: torch.Tensor, indices: torch.Tensor, step: int) -> torch.Tensor:
        """The step's loss: the mean over the kept samples (0 with a gradient of 0 if none is kept)."""
        keep = self.weights(losses, levels, indices, step).to(losses.dtype)
        return (losses * keep).sum() / keep.sum().clamp_min(1)

    def log(self) -> dict:
        """Samples dropped since the last call (for the log line)."""
        out, self.interval = {"loss_dropped": self.interval}, 0
        return out

    def summary(self, top: int = 20) -> dict:
        seen, dropped = sum(self.seen.values()), sum(self.dropped.values())
        most = sorted(self.dropped, key=lambda i: (-self.dropped[i], i))[:top]
        return {"quantile": self.quantile, "seen": seen, "dropped": dropped,
                "dropped_fraction": dropped / seen if seen else 0.0,
                "most_dropped": [{"index": i, "dropped": self.dropped[i], "seen": self.seen[i]} for i in most]}

    # accelerate custom checkpoint object: a resumed run keeps its quantiles and counts
    def state_dict(self):
        ids = sorted(self.seen)
        return {"buffers": [b.clone() for b in self.buffers], "interval": self.interval,
                "counts": torch.tensor([[i, self.seen[i], self.dropped.get(i, 0)] for i in ids],
                                       dtype=torch.long).reshape(-1, 3)}

    def load_state_dict(self, state):
        self.buffers = [b.clone() for b in state["buffers"]]
        self.interval = int(state["interval"])
        self.seen = {int(i): int(s) for i, s, _ in state["counts"].tolist()}
        self.dropped = {int(i): int(d) for i, _, d in state["counts"].tolist() if d}


def drop_label(cfg) -> str:
    """How the comparison table names a `train.loss_drop` node ("" when off)."""
    if not isinstance(cfg, dict) or not cfg.get("quantile"):
        return ""
    return f"loss-drop q={cfg['quantile']:g}"


def build_loss_drop(cfg) -> LossDrop | None:
    """From a `train.loss_drop` node; None when off (quantile 0 or the node absent)."""
    if cfg is None or not cfg.get("quantile"):
        return None
    return LossDrop(cfg.quantile, cfg.window, cfg.bins, cfg.warmup, cfg.min_count)
