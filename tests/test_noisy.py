"""The noisy-data ambient objective (Daras et al. 2024) and sampling from its models.

Toy data with a closed form: x0 ~ N(μ, s²) per pixel, y = x0 + σ_n·z, x_t = x0 + σ_t·ε, so
E[x0 | x_t] = μ + s²/(s² + σ_t²)·(x_t − μ) (the clean denoiser) while the ordinary loss on y learns
E[y | y + σ_t·ε] = μ + (s² + σ_n²)/(s² + σ_n² + σ_t²)·(· − μ) (the naive one).
"""
import math

import pytest
import torch

from ambient.config import ConfigError, validate
from ambient.losses import (
    AmbientDDPMLoss,
    AmbientEDMLoss,
    AmbientNoisyDDPMLoss,
    AmbientNoisyEDMLoss,
    first_timestep_at_or_above,
    truncated_log_normal,
    vp_sigmas,
)
from ambient.precond import EDMPrecond
from tests.helpers import compose

MU, S = 0.2, 0.5


def clean_slope(sigma):
    return S ** 2 / (S ** 2 + sigma ** 2)


def naive_slope(sigma, sigma_n):
    return (S ** 2 + sigma_n ** 2) / (S ** 2 + sigma_n ** 2 + sigma ** 2)


def linear_denoiser(slope):
    """D(x; σ) = μ + slope(σ)·(x − μ), called like the precond wrappers: net(x, sigma, mask, cond)."""
    def net(x, sigma, mask=None, cond=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return MU + slope(sigma) * (x - MU)
    return net


def toy_observations(n, sigma_n, seed=0, shape=(1, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(n, *shape, generator=g)
    return x0 + sigma_n * torch.randn(n, *shape, generator=g)


def ones(obs):
    return torch.ones_like(obs[:, :1])


def test_noisy_loss_is_lower_at_the_clean_posterior_mean_than_at_the_naive_minimizer():
    sigma_n = 0.4
    y = toy_observations(8192, sigma_n)
    loss = AmbientNoisyEDMLoss(sigma_n, fused="off")
    values = {}
    for name, slope in {"clean": clean_slope, "naive": lambda s: naive_slope(s, sigma_n),
                        "identity": lambda s: torch.ones_like(s)}.items():
        torch.manual_seed(3)  # the same σ_t and z′ for every candidate: a paired comparison
        values[name] = loss(linear_denoiser(slope), y, ones(y), ones(y)).mean().item()
    assert values["clean"] < values["naive"] < values["identity"]
    # and the ordinary loss on y ranks them the other way: what naive training converges to
    plain = AmbientEDMLoss(fused="off")
    torch.manual_seed(3)
    at_clean = plain(linear_denoiser(clean_slope), y, ones(y), ones(y)).mean().item()
    torch.manual_seed(3)
    at_naive = plain(linear_denoiser(lambda s: naive_slope(s, sigma_n)), y, ones(y), ones(y)).mean().item()
    assert at_naive < at_clean


@pytest.mark.parametrize("sigma_t", [0.45, 0.7, 1.0])
def test_the_minimizer_at_each_level_is_the_clean_denoiser(sigma_t):
    """At a fixed σ_t and fixed draws the loss of D = μ + a·(x − μ) is a parabola in a; its vertex is
    s²/(s² + σ_t²), not the naive (s² + σ_n²)/(s² + σ_n² + σ_t²): a wrong Tweedie coefficient moves it."""
    sigma_n = 0.4
    y = toy_observations(16384, sigma_n, seed=1)
    loss = AmbientNoisyEDMLoss(sigma_n, fused="off")
    loss.sample_sigma = lambda count, device=None: torch.full((count,), sigma_t)

    def at(a):
        torch.manual_seed(5)
        return loss(linear_denoiser(lambda s: a + 0 * s), y, ones(y), ones(y)).double().mean().item()
    l0, l1, l2 = at(0.0), at(0.5), at(1.0)
    best = 0.5 * (l0 - l2) / (2 * (l0 - 2 * l1 + l2)) + 0.5  # vertex through (0, l0), (0.5, l1), (1, l2)
    assert abs(best - clean_slope(sigma_t)) < 0.015, (best, clean_slope(sigma_t))
    assert abs(naive_slope(sigma_t, sigma_n) - clean_slope(sigma_t)) > 0.06  # the test can tell them apart


class LevelAffine(torch.nn.Module):
    """A UNet stand-in for EDMPrecond: F = α(c_noise)·x_in + β(c_noise), α, β from a small MLP.
    It can represent the clean linear denoiser at every level (and the naive one)."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def forward(self, x, c_noise, class_labels=None):
        alpha, beta = self.mlp(c_noise.reshape(-1, 1).float()).unbind(1)
        return type("Out", (), {"sample": alpha.reshape(-1, 1, 1, 1) * x + beta.reshape(-1, 1, 1, 1)})()


def _fit(loss, y, steps=400, seed=0):
    torch.manual_seed(seed)
    net = EDMPrecond(LevelAffine(), sigma_data=0.5, mask_channel=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(steps):
        rows = torch.randint(0, len(y), (256,))
        batch = y[rows]
        value = loss(net, batch, ones(batch), ones(batch)).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
    return net


def _slope(net, sigma):
    """The effective a(σ) of a trained linear denoiser: D(μ + 1) − D(μ)."""
    with torch.no_grad():
        x = torch.full((2, 1, 4, 4), MU)
        x[1] += 1
        d = net(x, torch.full((2,), sigma))
    return float((d[1] - d[0]).mean())


def test_training_a_tiny_denoiser_on_noisy_data_reaches_the_clean_posterior_mean():
    sigma_n = 0.4
    y = toy_observations(4096, sigma_n, seed=2)
    ambient = _fit(AmbientNoisyEDMLoss(sigma_n, fused="off"), y)
    naive = _fit(AmbientEDMLoss(fused="off"), y)
    for sigma in (0.6, 1.0):
        target, wrong = clean_slope(sigma), naive_slope(sigma, sigma_n)
        assert abs(_slope(ambient, sigma) - target) < 0.03, (sigma, _slope(ambient, sigma), target)
        # the ordinary loss on y learns the noisy data's denoiser instead (nearer to it than to the clean one)
        assert abs(_slope(naive, sigma) - wrong) < abs(_slope(naive, sigma) - target), (sigma, _slope(naive, sigma))
        # the naive model is off by the gap; the ambient one is well inside it
        assert abs(_slope(ambient, sigma) - target) < 0.5 * abs(wrong - target)


class LevelSpy:
    def __init__(self):
        self.sigmas = []

    def __call__(self, x, sigma, mask=None, cond=None):
        self.sigmas.append(torch.as_tensor(sigma).detach().reshape(-1).clone())
        return x * 0.5


@pytest.mark.parametrize("sigma_n", [0.02, 0.4, 5.0, 80.0])
def test_training_never_uses_a_level_below_sigma_n_and_keeps_edm_s_law_above_it(sigma_n):
    P_mean, P_std = -1.2, 1.2
    loss = AmbientNoisyEDMLoss(sigma_n, P_mean, P_std, fused="off")
    spy = LevelSpy()
    torch.manual_seed(0)
    y = toy_observations(512, sigma_n)
    for _ in range(8):
        loss(spy, y, ones(y), ones(y))
    sigmas = torch.cat(spy.sigmas).double()
    assert len(sigmas) == 8 * 512 and (sigmas >= sigma_n).all()
    # ln σ is N(P_mean, P_std²) conditioned on σ ≥ σ_n: check the conditional law's quartiles
    a = (math.log(sigma_n) - P_mean) / P_std
    tail = 0.5 * math.erfc(a / math.sqrt(2))
    normal = torch.distributions.Normal(0.0, 1.0)
    for q in (0.25, 0.5, 0.75):
        expected = P_mean + P_std * float(normal.icdf(torch.tensor(1 - tail * (1 - q), dtype=torch.float64)))
        observed = float(torch.quantile(sigmas.log(), q))
        assert abs(observed - expected) < 0.05 * P_std, (q, observed, expected)


def test_the_loss_refuses_a_level_below_sigma_n():
    loss = AmbientNoisyEDMLoss(0.3, fused="off")
    loss.sample_sigma = lambda count, device=None: torch.full((count,), 0.2)
    y = toy_observations(4, 0.3)
    with pytest.raises(RuntimeError, match="below σ_n"):
        loss(LevelSpy(), y, ones(y), ones(y))


def test_truncated_log_normal_far_in_the_tail_is_not_a_clamp():
    sigmas = truncated_log_normal(4096, -1.2, 1.2, 80.0)
    assert (sigmas >= 80.0).all() and (sigmas > 80.5).float().mean() > 0.5  # spread above, not piled at 80


@pytest.mark.parametrize("sigma_n", [0, -0.1])
def test_sigma_n_not_positive_is_a_config_error_naming_corruption_sigma(sigma_n):
    with pytest.raises(ConfigError, match="corruption.sigma"):
        validate(compose("train", ["corruption=noise", f"corruption.sigma={sigma_n}"]))
    with pytest.raises(ConfigError, match="corruption.sigma"):
        AmbientNoisyEDMLoss(sigma_n)


@pytest.mark.parametrize("override,key", [
    ("loss.consistency_weight=-1", "loss.consistency_weight"),
    ("loss.noisy=naive loss.consistency_weight=0.5", "loss.consistency_weight"),
    ("loss=ddpm loss.consistency_weight=0.5", "loss.consistency_weight"),
    ("loss.noisy=exact", "loss.noisy"),
    ("corruption.delta=0.1", "corruption.delta"),
    ("sampler.below_sigma_n=skip", "sampler.below_sigma_n"),
    ("sampler.sigma_max=0.05", "sampler.sigma_max"),
])
def test_bad_noisy_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate(compose("train", ["corruption=noise", *override.split()]))
    if "loss=ddpm" in override:
        assert "loss=edm only" in str(err.value)
    validate(compose("train", ["corruption=noise", "loss.consistency_weight=0.5"]))  # EDM: implemented


def test_the_objective_follows_loss_noisy():
    from ambient.training import build_objective, noisy_settings

    def loss_of(*overrides):
        cfg = compose("train", list(overrides))
        validate(cfg)
        return build_objective(cfg, torch.nn.Identity(), False)[1], noisy_settings(cfg)

    loss, settings = loss_of("corruption=noise", "corruption.sigma=0.2")
    assert isinstance(loss, AmbientNoisyEDMLoss) and loss.sigma_n == 0.2
    assert settings == {"objective": "ambient", "sigma_n": 0.2, "lowest_trained_sigma": 0.2, "consistency_weight": 0.0}
    loss, settings = loss_of("corruption=noise", "loss.noisy=naive")
    assert type(loss) is AmbientEDMLoss and settings["lowest_trained_sigma"] is None
    loss, settings = loss_of("corruption=none")
    assert type(loss) is AmbientEDMLoss and settings is None


# --- sampling


def _gaussian_pipeline(sigma_n, below=None, objective="ambient"):
    """An AmbientPipeline whose denoiser is the exact clean one for the toy data."""
    from diffusers import UNet2DModel

    from ambient.pipeline import AmbientPipeline

    sampler = {"kind": "edm_heun", "num_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0,
               "clip_denoised": False}
    if below is not None:
        sampler["below_sigma_n"] = below
    settings = {"objective": "edm", "sigma_data": 0.5, "mask_channel": False, "conditioning": "none",
                "corruption": {"kind": "noise", "sigma": sigma_n, "delta": 0.0}, "delta": 0.0,
                "noisy": {"objective": objective, "sigma_n": sigma_n,
                          "lowest_trained_sigma": sigma_n if objective == "ambient" else None},
                "channels": 1, "resolution": 4, "num_classes": 0, "sampler": sampler}
    unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    pipeline = AmbientPipeline(unet, ambient=settings)
    spy = LevelSpy()
    exact = linear_denoiser(clean_slope)

    def denoiser(_readout):
        def net(x, sigma, mask=None, cond=None):
            spy(x, sigma)
            return exact(x, sigma)
        return net
    pipeline._denoiser = denoiser
    return pipeline, spy


@pytest.mark.parametrize("below", [None, "stop"])
def test_sampling_a_noisy_ambient_model_stops_at_sigma_n_with_its_posterior_mean(below):
    """The default: the schedule ends at σ_n and returns D(x; σ_n) = E[x0 | x_σn]. With the exact denoiser
    the samples' per-pixel variance is then s⁴/(s² + σ_n²), the posterior mean's, not s²."""
    sigma_n = 0.4
    pipeline, spy = _gaussian_pipeline(sigma_n, below)
    images = pipeline.generate_range(0, 1024, seed=0)
    levels = torch.cat(spy.sigmas)
    assert levels.min() >= sigma_n - 1e-6 and torch.isclose(levels.min(), torch.tensor(sigma_n))
    var = images.var().item()
    assert abs(var - S ** 4 / (S ** 2 + sigma_n ** 2)) < 0.1 * S ** 4 / (S ** 2 + sigma_n ** 2)
    assert abs(images.mean().item() - MU) < 0.03


def test_sampling_continue_goes_below_sigma_n_to_the_full_distribution():
    sigma_n = 0.4
    pipeline, spy = _gaussian_pipeline(sigma_n, "continue")
    images = pipeline.generate_range(0, 1024, seed=0)
    assert torch.cat(spy.sigmas).min() < 0.01  # down to sampler.sigma_min = 0.002
    assert abs(images.var().item() - S ** 2) < 0.1 * S ** 2  # the exact denoiser all the way: N(μ, s²)


def test_a_naive_noise_model_samples_down_to_sigma_min():
    pipeline, spy = _gaussian_pipeline(0.4, "stop", objective="naive")
    pipeline.generate_range(0, 8, seed=0)
    assert pipeline.lowest_trained_sigma is None and torch.cat(spy.sigmas).min() < 0.01


# --- end to end


@pytest.mark.slow
def test_smoke_noisy_ambient_run_leaves_a_loadable_model_that_samples_from_sigma_n(tmp_path):
    from ambient.rundir import ModelDir
    from ambient.trained import load_run
    from tests.helpers import run_script

    run = tmp_path / "noisy"
    run_script("train.py", "experiment=smoke", "corruption=noise", "corruption.sigma=0.2", "loss.noisy=ambient",
               "train.steps=20", "train.checkpoint_every=0", "sample.count=4", f"run_dir={run}")
    settings = ModelDir(run / "model").read_settings()
    assert settings["noisy"] == {"objective": "ambient", "sigma_n": 0.2, "lowest_trained_sigma": 0.2,
                                 "consistency_weight": 0.0}
    assert settings["sampler"]["below_sigma_n"] == "stop"
    assert "ambient Tweedie loss" in (run / "model" / "README.md").read_text()
    model = load_run(run)
    assert model.lowest_trained_sigma == 0.2
    seen = []
    model.unet.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1].reshape(-1)[0])))
    images = model.generate_range(0, 2, seed=0, num_steps=4)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    assert min(math.exp(4 * c) for c in seen) == pytest.approx(0.2, rel=1e-4)  # c_noise = ln σ / 4


def test_comparison_rows_name_how_noisy_images_were_trained_on():
    from ambient.compare import defense_label

    noise = {"kind": "noise", "sigma": 0.2, "delta": 0.0}
    assert defense_label({"corruption": noise, "loss": {"kind": "edm", "noisy": "ambient"}})[0] == "noise sigma=0.2 (ambient)"
    assert defense_label({"corruption": noise, "loss": {"kind": "edm", "noisy": "naive"}})[0] == "noise sigma=0.2 (naive)"
    assert defense_label({"corruption": noise, "loss": {"kind": "edm"}})[0] == "noise sigma=0.2 (naive)"  # saved before



# --- the DDPM (VP) form


def _linear_alphas():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def vp_linear_denoiser(alphas, slope):
    """x0 estimate μ + slope(σ_t)·(x_t/√ᾱ_t − μ), called like DDPMPrecond: net(x_t, t, mask, cond)."""
    def net(x, t, mask=None, cond=None):
        abar = alphas[torch.as_tensor(t).long().reshape(-1)].reshape(-1, 1, 1, 1)
        sigma = ((1 - abar) / abar).sqrt()
        return MU + slope(sigma) * (x / abar.sqrt() - MU)
    return net


@pytest.mark.parametrize("timestep", [150, 250])
def test_ddpm_form_minimizer_at_each_step_is_the_clean_denoiser(timestep):
    alphas, sigma_n = _linear_alphas(), 0.4
    sigma_t = float(vp_sigmas(alphas)[timestep])
    assert sigma_t > sigma_n
    y = toy_observations(16384, sigma_n, seed=4)
    loss = AmbientNoisyDDPMLoss(sigma_n, 1000, alphas)
    loss.sample_timesteps = lambda count, device=None: torch.full((count,), timestep)

    def at(a):
        torch.manual_seed(6)
        return loss(vp_linear_denoiser(alphas, lambda s: a + 0 * s), y, ones(y), ones(y)).double().mean().item()
    l0, l1, l2 = at(0.0), at(0.5), at(1.0)
    best = 0.5 * (l0 - l2) / (2 * (l0 - 2 * l1 + l2)) + 0.5
    assert abs(best - clean_slope(sigma_t)) < 0.015, (best, clean_slope(sigma_t))
    assert abs(naive_slope(sigma_t, sigma_n) - clean_slope(sigma_t)) > 0.06


def test_ddpm_form_trains_only_at_steps_whose_level_is_at_least_sigma_n():
    alphas, sigma_n = _linear_alphas(), 0.4
    t_n = first_timestep_at_or_above(alphas, sigma_n)
    sigmas = vp_sigmas(alphas)
    assert sigmas[t_n] >= sigma_n > sigmas[t_n - 1]
    seen = []
    loss = AmbientNoisyDDPMLoss(sigma_n, 1000, alphas, snr_weight=True)
    y = toy_observations(256, sigma_n)
    for _ in range(8):
        loss(lambda x, t, m=None, c=None: seen.append(t.clone()) or x, y, ones(y), ones(y))
    seen = torch.cat(seen)
    assert seen.min() >= t_n and seen.max() <= 999 and len(seen.unique()) > 500  # uniform on [t_n, T)
    loss.sample_timesteps = lambda count, device=None: torch.full((count,), t_n - 1)
    with pytest.raises(RuntimeError, match="below"):
        loss(lambda x, t, m=None, c=None: x, y, ones(y), ones(y))
    with pytest.raises(ConfigError, match="corruption.sigma"):
        AmbientNoisyDDPMLoss(1e4, 1000, alphas)  # above the schedule's largest level


def test_ddim_stops_at_the_last_step_at_or_above_t_n_with_the_x0_estimate():
    """The DDPM-form model's sampler: with the exact clean denoiser the result is E[x0 | x_t] at the last
    DDIM step t ≥ t_n, so its variance is s⁴/(s² + σ_t²) for that step's σ_t; without t_stop it is ≈ s²."""
    from diffusers import DDIMScheduler

    from ambient.samplers import ddim_sample

    alphas, sigma_n = _linear_alphas(), 0.4
    t_n = first_timestep_at_or_above(alphas, sigma_n)
    exact = vp_linear_denoiser(alphas, clean_slope)
    seen = []

    def net(x, t, mask=None, cond=None):
        seen.append(int(t))
        return exact(x, t)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="sample",
                              clip_sample=False)
    noise = torch.randn(2048, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    stopped = ddim_sample(net, noise, scheduler=scheduler, num_steps=50, t_stop=t_n)
    last = min(seen)
    assert last >= t_n and last - t_n < 1000 // 50  # the last grid step at or above t_n
    sigma_last = float(vp_sigmas(alphas)[last])
    expected = S ** 4 / (S ** 2 + sigma_last ** 2)
    assert abs(stopped.var().item() - expected) < 0.1 * expected
    seen.clear()
    full = ddim_sample(net, noise, scheduler=scheduler, num_steps=50)
    # 50 DDIM steps of the exact ODE land within ~10% of s² (discretization); far above the stopped variance
    assert min(seen) < t_n and abs(full.var().item() - S ** 2) < 0.15 * S ** 2 and full.var() > 1.3 * stopped.var()


def test_the_ddpm_objective_follows_loss_noisy():
    from ambient.training import build_objective

    unet_overrides = ["loss=ddpm", "corruption=noise", "corruption.sigma=0.3"]
    cfg = compose("train", unet_overrides)
    validate(cfg)
    from ambient.models import build_model

    unet = build_model(cfg.model, 1, 16, False, 0)
    _, loss, scheduler = build_objective(cfg, unet, False)
    assert isinstance(loss, AmbientNoisyDDPMLoss) and loss.t_n == first_timestep_at_or_above(scheduler.alphas_cumprod, 0.3)
    cfg = compose("train", [*unet_overrides, "loss.noisy=naive"])
    assert type(build_objective(cfg, unet, False)[1]) is AmbientDDPMLoss


def test_a_ddpm_noisy_model_samples_down_to_t_n_only(tmp_path, smoke_cfg):
    from ambient.trained import load_run
    from ambient.training import train

    cfg = smoke_cfg("loss=ddpm", "corruption=noise", "corruption.sigma=0.4", "train.steps=3",
                    "train.checkpoint_every=0", "sample.count=0", "sampler.num_steps=20")
    train(cfg, tmp_path)
    model = load_run(tmp_path)
    t_n = first_timestep_at_or_above(model.scheduler.alphas_cumprod, 0.4)
    assert model.lowest_trained_sigma == 0.4 and model.settings["noisy"]["objective"] == "ambient"
    seen = []
    model.unet.register_forward_pre_hook(lambda _m, args: seen.append(int(args[1].reshape(-1)[0])))
    images = model.generate_range(0, 2, seed=0)
    assert torch.isfinite(images).all() and min(seen) >= t_n and min(seen) - t_n < 1000 // 20



# --- the consistency loss (below σ_n)


def _two_level_net(sigma_n, slope_below):
    """The clean denoiser at σ_n (what the Tweedie loss trains) and D = μ + slope·(x − μ) below it."""
    def net(x, sigma, mask=None, cond=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        at_boundary = torch.isclose(sigma, torch.tensor(sigma_n))
        a = torch.where(at_boundary, clean_slope(sigma), slope_below + 0 * sigma)
        return MU + a * (x - MU)
    return net


@pytest.mark.parametrize("sigma_s", [0.25, 0.3])
def test_consistency_loss_minimizer_below_sigma_n_is_the_clean_denoiser(sigma_s, monkeypatch):
    """At a fixed σ_s < σ_n the consistency loss of D = μ + a·(x − μ) is a parabola in a; with the clean
    denoiser at σ_n its vertex is s²/(s² + σ_s²) — what the data's own denoiser at σ_s would be — and not the
    naive (s² + σ_n²)/(s² + σ_n² + σ_s²)."""
    sigma_n = 0.4
    y = toy_observations(16384, sigma_n, seed=7)
    loss = AmbientNoisyEDMLoss(sigma_n, fused="off", consistency_weight=1.0)
    monkeypatch.setattr("ambient.losses.log_normal_below", lambda count, *args, **kw: torch.full((count,), sigma_s))

    def at(a):
        torch.manual_seed(8)
        return loss.consistency(_two_level_net(sigma_n, a), y, ones(y), ones(y)).double().mean().item()
    l0, l1, l2 = at(0.0), at(0.5), at(1.0)
    best = 0.5 * (l0 - l2) / (2 * (l0 - 2 * l1 + l2)) + 0.5
    assert abs(best - clean_slope(sigma_s)) < 0.015, (best, clean_slope(sigma_s))
    assert abs(naive_slope(sigma_s, sigma_n) - clean_slope(sigma_s)) > 0.06


def test_consistency_costs_three_more_network_calls_and_trains_only_below_sigma_n_there():
    sigma_n = 0.4
    spy = LevelSpy()
    y = toy_observations(512, sigma_n)
    AmbientNoisyEDMLoss(sigma_n, fused="off")(spy, y, ones(y), ones(y))
    assert len(spy.sigmas) == 1
    spy = LevelSpy()
    AmbientNoisyEDMLoss(sigma_n, fused="off", consistency_weight=0.5)(spy, y, ones(y), ones(y))
    tweedie, boundary, first, second = spy.sigmas
    assert len(spy.sigmas) == 4 and (tweedie >= sigma_n).all() and torch.allclose(boundary, torch.tensor(sigma_n))
    assert torch.equal(first, second) and (first < sigma_n).all() and first.min() < 0.05  # down to small levels


def test_a_consistency_run_records_every_level_as_trained_and_samples_below_sigma_n(tmp_path, smoke_cfg):
    from ambient.trained import load_run
    from ambient.training import train

    cfg = smoke_cfg("corruption=noise", "corruption.sigma=0.4", "loss.consistency_weight=0.5", "train.steps=3",
                    "train.checkpoint_every=0", "sample.count=0", "sampler.num_steps=4")
    summary = train(cfg, tmp_path)
    assert math.isfinite(summary["final_loss"])
    model = load_run(tmp_path)
    assert model.settings["noisy"]["consistency_weight"] == 0.5 and model.lowest_trained_sigma is None
    seen = []
    model.unet.register_forward_pre_hook(lambda _m, args: seen.append(math.exp(4 * float(args[1].reshape(-1)[0]))))
    model.generate_range(0, 1, seed=0)
    assert min(seen) < 0.01  # the sampler goes on to sampler.sigma_min


def test_runs_saved_before_the_noisy_keys_still_resume_unless_their_objective_would_change():
    from omegaconf import OmegaConf

    from ambient.config import config_differences

    def saved_and_now(*overrides):
        now = OmegaConf.to_container(compose("train", list(overrides)), resolve=True)
        saved = OmegaConf.to_container(compose("train", list(overrides)), resolve=True)
        del saved["loss"]["noisy"], saved["loss"]["consistency_weight"], saved["sampler"]["below_sigma_n"]
        return saved, now

    assert config_differences(*saved_and_now()) == []  # no noise: the new keys change nothing
    assert config_differences(*saved_and_now("loss=ddpm")) == []
    saved, now = saved_and_now("corruption=noise")  # trained naive; the default is now ambient
    assert config_differences(saved, now) == ["loss.noisy: '(absent)' -> 'ambient'"]
    assert config_differences(*saved_and_now("corruption=noise", "loss.noisy=naive")) == []
    saved, now = saved_and_now("loss.consistency_weight=0.5", "corruption=noise")
    assert config_differences(saved, now) != []
