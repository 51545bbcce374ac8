"""DP-SGD for the diffusion loss, with Opacus: Poisson batches, per-sample clipping, Gaussian noise, and
an accountant that reports the (ε, δ) spent (Abadi et al. 2016; for diffusion models Dockhorn et al. 2023).

    python train.py privacy=dpsgd privacy.epsilon=10 privacy.delta=1e-5 privacy.max_grad_norm=1
    python train.py privacy=dpsgd privacy.epsilon=null privacy.noise_multiplier=1.2   # σ given; ε reported

The unit of privacy is one row of the training set (a planted or natural duplicate is several rows:
group privacy applies). Each step draws its batch by Poisson sampling (every row independently with
rate q = train.batch_size / N, seeded by (seed, step): a resume draws the same batches), as the
accountant assumes. DPDM's noise multiplicity K repeats every image K times with independent noise
levels and averages those K per-sample gradients *before* clipping, so one image still contributes at
most C. The noise multiplier σ is solved from the target ε over train.steps, or given.

Opacus computes per-sample gradients with hooks (GradSampleModule) for every layer of the diffusers
UNets: Conv2d, Linear, GroupNorm, Embedding (class labels), and the attention's Linear projections.
One needed care: Opacus 1.6's `unfold2d` reads its input with `as_strided` as if it were contiguous,
and diffusers' attention hands the next convolution a channels-last-strided tensor, so every
convolution after an attention block got all-zero per-sample gradients without any error. `_conv`
makes the activations contiguous first (tests/test_privacy.py checks that per-sample gradients sum to
the batch gradient for every parameter).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ambient.config import ConfigError
from ambient.errors import RunRefused
from ambient.seeding import Stream, seeded_generator


def enabled(cfg) -> bool:
    """Whether a `privacy` config node (or None: configs older than the group) turns DP-SGD on."""
    return cfg is not None and cfg.get("kind", "none") == "dpsgd"


def poisson_rows(step: int, n: int, rate: float, seed: int) -> torch.Tensor:
    """The rows of step `step`'s batch: each of the n rows independently with probability `rate`."""
    return torch.nonzero(torch.rand(n, generator=seeded_generator(seed, step, Stream.POISSON)) < rate).flatten()


def noise_multiplier(cfg, sample_rate: float, steps: int) -> float:
    """σ: privacy.noise_multiplier if given, else the smallest σ whose ε after `steps` steps at
    `sample_rate` is at most privacy.epsilon (Opacus' search, to 0.01 in ε)."""
    if cfg.get("noise_multiplier") is not None:
        return float(cfg.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=float(cfg.epsilon), target_delta=float(cfg.delta),
                                      sample_rate=sample_rate, steps=int(steps), accountant=cfg.accountant))


def epsilon_spent(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε after the (σ, q, steps) segments in history, by Opacus' accountant ("rdp" or "prv")."""
    if not history or all(steps == 0 for _, _, steps in history):
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history if k]
    return float(acc.get_epsilon(delta=float(delta)))


def _conv(sampler):
    """Opacus' conv grad sampler on contiguous activations (see the module docstring)."""

    def contiguous(layer, activations, backprops):
        return sampler(layer, [a.contiguous() for a in activations], backprops.contiguous())

    return contiguous


def unsupported_layers(net: nn.Module) -> list[str]:
    """Names of modules with trainable parameters of their own that Opacus has no per-sample rule for."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    names = [f"{name} ({type(m).__name__})" for name, m in net.named_modules()
             if any(p.requires_grad for p in m.parameters(recurse=False)) and type(m) not in GradSampleModule.GRAD_SAMPLERS]
    names += [str(err) for err in ModuleValidator.validate(net, strict=False)]
    return names


class PrivacyState:
    """The (σ, q, steps) segments trained so far, checkpointed with the model (accelerate custom object)
    so a resumed run's ε counts every segment, and refuses a resume that would change σ or q."""

    def __init__(self):
        self.history: list[list] = []

    def record(self, sigma: float, rate: float) -> None:
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == rate:
            self.history[-1][2] += 1
        else:
            self.history.append([sigma, rate, 1])

    def steps(self) -> int:
        return sum(k for _, _, k in self.history)

    def state_dict(self):
        return {"history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 3)}

    def load_state_dict(self, state):
        self.history = [[float(s), float(q), int(k)] for s, q, k in state["history"].tolist()]


class DPSGD:
    """Per-sample clipping and noise around the loop's network and optimizer; see the module docstring."""

    def __init__(self, cfg, n: int, batch_size: int, steps: int, seed: int):
        self.cfg, self.n, self.seed = cfg, int(n), int(seed)
        self.rate = min(1.0, batch_size / n)  # q
        self.expected_batch = self.rate * n
        self.multiplicity = int(cfg.noise_multiplicity)
        self.max_grad_norm, self.delta, self.accountant = float(cfg.max_grad_norm), float(cfg.delta), cfg.accountant
        self.sigma = noise_multiplier(cfg, self.rate, steps)
        self.state = PrivacyState()

    def make_private(self, net: nn.Module, optimizer: torch.optim.Optimizer):
        """(GradSampleModule(net), DPOptimizer(optimizer)); a model with a layer Opacus cannot handle
        is refused before any work."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        bad = unsupported_layers(net)
        if bad:
            raise ConfigError(f"privacy=dpsgd: the model has layers without per-sample gradients in Opacus: "
                              f"{'; '.join(bad[:5])}; allowed: models built of Conv2d, Linear, GroupNorm, "
                              f"LayerNorm, Embedding (model=unet_tiny, unet_cifar), or privacy=none")
        gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum", strict=True)
        gsm.GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS,
                             nn.Conv2d: _conv(GradSampleModule.GRAD_SAMPLERS[nn.Conv2d])}
        opt = DPOptimizer(optimizer, noise_multiplier=self.sigma, max_grad_norm=self.max_grad_norm,
                          expected_batch_size=self.expected_batch, loss_reduction="mean")
        return gsm, opt

    def rows(self, step: int) -> torch.Tensor:
        return poisson_rows(step, self.n, self.rate, self.seed)

    def expand(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each image K times in a row (noise multiplicity): the loss draws K noise levels for it."""
        if self.multiplicity == 1:
            return batch
        return {k: v.repeat_interleave(self.multiplicity, dim=0) for k, v in batch.items()}

    def backward(self, per_sample_loss: torch.Tensor, params, backward=None) -> None:
        """Per-sample gradients of the B·K rows, averaged over each image's K rows (before clipping).
        An empty Poisson batch (no forward pass) leaves zero-row gradients: the step is noise alone."""
        params = [p for p in params if p.requires_grad]
        if per_sample_loss is None or per_sample_loss.numel() == 0:
            for p in params:
                p.grad_sample = torch.zeros(0, *p.shape, device=p.device, dtype=p.dtype)
            return
        with warnings.catch_warnings():  # Opacus' hooks on a first layer whose input needs no gradient: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            (backward or torch.Tensor.backward)(per_sample_loss.sum())
        k = self.multiplicity
        for p in params:
            g = p.grad_sample
            if g is None:  # a parameter the loss does not reach (e.g. an unused class embedding row)
                g = torch.zeros(per_sample_loss.shape[0], *p.shape, device=p.device, dtype=p.dtype)
            if k > 1:
                g = g.reshape(-1, k, *p.shape).mean(1)
            p.grad_sample = g

    def stepped(self) -> None:
        self.state.record(self.sigma, self.rate)

    def epsilon(self) -> float:
        return epsilon_spent([tuple(h) for h in self.state.history], self.delta, self.accountant)

    def check_resume(self) -> None:
        """A resume must keep σ and q (a target ε was planned over train.steps); refused otherwise, like
        any other config change of a resumed run (nothing is written)."""
        if self.state.history and (self.state.history[-1][0] != self.sigma or self.state.history[-1][1] != self.rate):
            s, q, _ = self.state.history[-1]
            raise RunRefused(f"privacy: this run trained with noise multiplier {s:.6g} at sample rate {q:.6g}; now "
                              f"{self.sigma:.6g} at {self.rate:.6g} (train.steps or the dataset changed, and "
                              f"privacy.epsilon is planned over train.steps); allowed: resume with the run's "
                              f"train.steps, or set privacy.noise_multiplier={s:.6g} (ε then grows past the target)")

    def record(self) -> dict:
        """What summary.json, the model's settings and the comparison say about the guarantee."""
        return {"kind": "dpsgd", "epsilon": round(self.epsilon(), 4), "delta": self.delta,
                "target_epsilon": None if self.cfg.get("epsilon") is None else float(self.cfg.epsilon),
                "noise_multiplier": self.sigma, "max_grad_norm": self.max_grad_norm, "sample_rate": self.rate,
                "steps": self.state.steps(), "accountant": self.accountant, "noise_multiplicity": self.multiplicity,
                "unit": "one training row"}


def check_processes(cfg, processes: int) -> None:
    """DP-SGD here runs in one process: the DDP all-reduce would average per-rank clipped sums, each
    with its own noise, and the Poisson batch is drawn for one process."""
    if enabled(cfg) and processes > 1:
        raise ConfigError(f"privacy=dpsgd runs in one process; this launch has {processes} processes: allowed: "
                          f"`python train.py privacy=dpsgd ...` (or `accelerate launch --num_processes 1`), or privacy=none")


def privacy_label(cfg) -> str:
    """How the comparison table names a `privacy` node ("" when off); the ε spent has its own column."""
    if not isinstance(cfg, dict) or cfg.get("kind", "none") != "dpsgd":
        return ""
    noise = (f"ε≤{cfg['epsilon']:g}" if cfg.get("epsilon") is not None
             else f"σ={cfg.get('noise_multiplier', 0):g}")
    k = int(cfg.get("noise_multiplicity") or 1)
    return f"DP-SGD {noise} (δ={cfg.get('delta', 0):g}, C={cfg.get('max_grad_norm', 0):g}" + (f", K={k})" if k > 1 else ")")
