"""SecMI and PIA (attack/inversion.py) against their published definitions, on denoisers with a closed form.

Gaussian data x0 ~ N(μ, s²) per pixel: the optimal denoiser is linear, D(x; σ) = μ + s²/(s² + σ²)·(x − μ), and
the optimal ε-network of DDPM's VP process is ε(x_t, t) = √(1 − ᾱ_t)·(x_t − √ᾱ_t·μ)/(ᾱ_t·s² + 1 − ᾱ_t). The
references below are the published algorithms written in the VP form of the official codes; the attack
runs on the model's σ form (EDM models) or on its own DDPM steps (DDPM models) and must agree. A model that
memorized a few points (the optimal denoiser of their empirical distribution) must give its members away;
the Gaussian one, which never saw them, must not.
"""
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ambient.attack.inversion import pia_scores, secmi_calls, secmi_scores
from ambient.attack.membership import best_timestep, calibration_split
from ambient.membership_eval import roc_figures
from ambient.pipeline import AmbientPipeline, linear_vp_alpha_bar

MU, S = 0.1, 0.5
EDM = {"objective": "edm", "mask_channel": False, "channels": 1, "resolution": 8, "num_classes": 0,
       "corruption": {"kind": "none"}, "delta": 0.0, "sigma_data": 0.5}


class GaussianDenoiser(torch.nn.Module):
    """E[x0 | x0 + σ·ε] for x0 ~ N(μ, s²) per pixel."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, mask=None, cond=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


class Memorizer(GaussianDenoiser):
    """E[x0 | x] for x0 uniform over `train`: Σ softmax(−‖x − x_i‖²/2σ²)·x_i (a model that memorized them)."""

    def __init__(self, train):
        super().__init__()
        self.register_buffer("points", train.flatten(1))

    def forward(self, x, sigma, mask=None, cond=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1)
        w = torch.softmax(-torch.cdist(x.flatten(1), self.points) ** 2 / (2 * sigma ** 2), dim=1)
        return (w @ self.points).reshape(x.shape)


class AnalyticPipeline(AmbientPipeline):
    def _denoiser(self, hidden_readout):
        return self.unet


class GaussianEpsUNet(torch.nn.Module):
    """A DDPM ε-network with the closed form for Gaussian data, on the scheduler's own ᾱ; records its steps."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.abar, self.steps = alphas_cumprod.double(), []

    def forward(self, x, t, class_labels=None):
        self.steps.append(int(t[0]))
        a = self.abar[t.long()].reshape(-1, 1, 1, 1).float()
        return type("Out", (), {"sample": (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S ** 2 + 1 - a)})()


def _eps_vp(x, t, abar):
    a = abar[t]
    return (1 - a) ** 0.5 * (x - a ** 0.5 * MU) / (a * S ** 2 + 1 - a)


def _ddim_vp(x, t, t_next, abar):
    """The official SecMI ddim_singlestep (VP): x̂0 from ε, then √ᾱ'·x̂0 + √(1 − ᾱ')·ε."""
    eps = _eps_vp(x, t, abar)
    x0 = (x - (1 - abar[t]) ** 0.5 * eps) / abar[t] ** 0.5
    return abar[t_next] ** 0.5 * x0 + (1 - abar[t_next]) ** 0.5 * eps


def secmi_reference(x0, abar, t_sec=100, k=10):
    """SecMI_stat as in mia_evals/secmia.py: invert 0 → k → … → t_sec − k, up to t_sec and back, Σ squared error."""
    x, t = x0.double(), 0
    for t_next in range(k, t_sec, k):
        x, t = _ddim_vp(x, t, t_next, abar), t_next
    back = _ddim_vp(_ddim_vp(x, t, t_sec, abar), t_sec, t, abar)
    return ((back - x) ** 2).flatten(1).sum(1)


def pia_reference(x0, abar, t=200, p=4):
    """PIA: ε0 = ε_θ(x0, 0); x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε0; Σ |ε_θ(x_t, t) − ε0|^p."""
    x0 = x0.double()
    eps0 = _eps_vp(x0, 0, abar)
    eps_t = _eps_vp(abar[t] ** 0.5 * x0 + (1 - abar[t]) ** 0.5 * eps0, t, abar)
    return ((eps_t - eps0).abs() ** p).flatten(1).sum(1)


def _gaussian(n, seed):
    return MU + S * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _linear_abar():
    return torch.tensor([linear_vp_alpha_bar(t) for t in range(1000)], dtype=torch.float64)


def test_edm_models_run_the_published_vp_algorithms_in_sigma_form():
    x = _gaussian(6, 0)
    model = AnalyticPipeline(GaussianDenoiser(), ambient=EDM)
    abar = _linear_abar()
    assert torch.allclose(secmi_scores(model, x, range(6)).double(), secmi_reference(x, abar), rtol=1e-3, atol=1e-9)
    assert torch.allclose(pia_scores(model, x, range(6)).double(), pia_reference(x, abar), rtol=1e-3, atol=1e-9)
    assert torch.allclose(pia_scores(model, x, range(6), timestep=50, p=2).double(),
                          pia_reference(x, abar, t=50, p=2), rtol=1e-3, atol=1e-9)
    # A wrong step (e.g. σ' confused with σ, or no inversion) would not match: the t-error is not trivially 0.
    assert secmi_reference(x, abar).min() > 0


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_ddpm_models_are_probed_at_their_own_steps_and_schedule(beta_schedule):
    scheduler = DDPMScheduler(beta_schedule=beta_schedule)
    unet = GaussianEpsUNet(scheduler.alphas_cumprod)
    settings = dict(EDM, objective="ddpm", prediction_type="epsilon")
    model = AmbientPipeline(unet, scheduler, ambient=settings)
    x, abar = _gaussian(5, 1), scheduler.alphas_cumprod.double()
    got = secmi_scores(model, x, range(5), t_sec=60, interval=20)
    # ε at 0 (0→20), 20 (20→40): the inversion to t_sec − k = 40; at 40 (40→60) and 60 (60→40): up and back
    assert unet.steps == [0, 20, 40, 60] and secmi_calls(60, 20) == 4
    assert torch.allclose(got.double(), secmi_reference(x, abar, 60, 20), rtol=1e-3, atol=1e-9)
    unet.steps.clear()
    assert torch.allclose(pia_scores(model, x, range(5), timestep=150).double(), pia_reference(x, abar, 150),
                          rtol=1e-3, atol=1e-9)
    assert unet.steps == [0, 150]


def _auc(m, h):
    return roc_figures(m.numpy(), h.numpy())


@pytest.mark.parametrize("attack", [secmi_scores, pia_scores])
def test_a_memorizing_model_gives_its_members_away(attack):
    members, others = _gaussian(32, 2), _gaussian(100, 3)
    model = AnalyticPipeline(Memorizer(members), ambient=EDM)
    figures = _auc(attack(model, members, range(32)), attack(model, others, range(32, 132)))
    assert figures["auc"] > 0.95 and figures["tpr_at_1%_fpr"] > 0.9


@pytest.mark.parametrize("attack", [secmi_scores, pia_scores])
def test_a_model_that_never_saw_the_members_is_at_chance(attack):
    members, others = _gaussian(100, 2), _gaussian(100, 3)
    model = AnalyticPipeline(GaussianDenoiser(), ambient=EDM)
    figures = _auc(attack(model, members, range(100)), attack(model, others, range(100, 200)))
    assert figures["auc_ci_low"] <= 0.5 <= figures["auc_ci_high"]


def _masked_ddpm():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    settings = dict(EDM, objective="ddpm", prediction_type="epsilon", mask_channel=True,
                    corruption={"kind": "mask", "p": 0.6, "delta": 0.1}, delta=0.1)
    return AmbientPipeline(unet, DDPMScheduler(), ambient=settings)


def test_masked_models_keep_one_own_sampling_mask_per_probe_and_hide_its_pixels():
    model = _masked_ddpm()
    seen = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    secmi_scores(model, x, range(16), t_sec=30, interval=10)
    masks = [inputs[:, 1:] for inputs in seen]
    assert len(seen) == secmi_calls(30, 10) and all(torch.equal(m, masks[0]) for m in masks)
    assert masks[0].mean().item() == pytest.approx(0.4 * 0.9, abs=0.05)  # keep probability (1 − p)(1 − δ)
    assert all((inputs[:, :1][inputs[:, 1:] == 0] == 0).all() for inputs in seen)
    seen.clear()
    pia_scores(model, x, range(16), mask_draws=2)
    assert len(seen) == 4 and torch.equal(seen[0][:, 1:], seen[1][:, 1:]) and not torch.equal(seen[0][:, 1:],
                                                                                               seen[2][:, 1:])


def test_probe_scores_do_not_depend_on_the_batch():
    model = _masked_ddpm()
    x = torch.rand(7, 1, 8, 8) * 2 - 1
    for attack in (lambda **kw: secmi_scores(model, x, range(10, 17), t_sec=20, interval=10, **kw),
                   lambda **kw: pia_scores(model, x, range(10, 17), mask_draws=2, **kw)):
        assert torch.allclose(attack(batch_size=7), attack(batch_size=3), rtol=1e-5)


def test_the_loss_attacks_t_is_chosen_on_the_calibration_split_only():
    cal_m, ev_m, cal_h, ev_h = calibration_split(40, 60, 0.5, seed=3)
    assert len(cal_m) == 20 and len(cal_h) == 30
    assert sorted([*cal_m, *ev_m]) == list(range(40)) and sorted([*cal_h, *ev_h]) == list(range(60))
    assert all((a == b).all() for a, b in zip((cal_m, ev_m, cal_h, ev_h), calibration_split(40, 60, 0.5, seed=3)))
    rng = torch.Generator().manual_seed(0)
    members, non_members = torch.rand(3, 40, generator=rng), torch.rand(3, 60, generator=rng)
    # t index 1 separates on the calibration rows only; t index 2 separates on the evaluation rows only
    # (and better): choosing on the evaluated labels would pick 2.
    members[1, cal_m], non_members[1, cal_h] = members[1, cal_m] * 0.5, non_members[1, cal_h] * 0.5 + 0.45
    members[2, ev_m], non_members[2, ev_h] = members[2, ev_m] * 0.1, non_members[2, ev_h] * 0.1 + 0.5
    chosen, aucs = best_timestep(members[:, cal_m], non_members[:, cal_h])
    assert chosen == 1 and aucs[1] == max(aucs)
    everything, _ = best_timestep(members, non_members)
    assert everything == 2
    members[:, ev_m] = 0.0  # the evaluation rows can change at will: the choice does not move
    assert best_timestep(members[:, cal_m], non_members[:, cal_h])[0] == 1
