"""Ambient losses: squared error on the pixels of A only, per sample normalised by |A|.

Each loss returns the per-sample loss (B,); the training loop reduces. `last_level` holds each
sample's noise level of the last call as a number in [0, 1), uniform under the loss's own noise
distribution (loss-drop compares a sample's loss with others at the same level). The network is fed
Ã·x_t and Ã; the target is the observation A·x, so pixels in A but not in Ã are what teach the
model to fill in what it cannot see (Daras et al. 2023). With A = Ã = 1 the EDM loss is the
ordinary EDM denoising loss divided by the number of pixels.

`AmbientNoisyEDMLoss` is the noisy-data objective (Daras et al. 2024): the observation is
y = x + σ_n·z, fixed per image, and the network's x0 estimate is matched to y through Tweedie's
relation at levels σ_t ≥ σ_n only.
"""
from __future__ import annotations

import math

import torch

from ambient.errors import ConfigError
from ambient.kernels.masked_loss import masked_mse


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Karras et al. 2022, Eq. 8: λ(σ) = (σ² + σ_d²)/(σ·σ_d)²."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


# Daras et al. 2023 (EDM variant, from Karras et al. 2022 Eq. 8): ln σ ~ N(P_mean, P_std²).
class AmbientEDMLoss:
    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, fused: str = "auto"):
        self.P_mean, self.P_std, self.sigma_data, self.fused = P_mean, P_std, sigma_data, fused

    def __call__(self, net, obs, mask, mask_tilde, cond=None):
        rnd_normal = torch.randn(obs.shape[0], device=obs.device)
        self.last_level = torch.special.ndtr(rnd_normal)  # Φ: the quantile of σ in its log-normal law
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = edm_weight(sigma, self.sigma_data)
        n = torch.randn_like(obs) * sigma.reshape(-1, 1, 1, 1)
        D_yn = net(obs + n, sigma, mask_tilde, cond)
        return masked_mse(D_yn, obs, mask, weight, fused=self.fused)


# Daras et al. 2023, DeepFloyd IF fine-tuning: DDPM noise, x0-space loss on A.
class AmbientDDPMLoss:
    def __init__(self, num_train_timesteps: int, alphas_cumprod: torch.Tensor, snr_weight: bool = False,
                 fused: str = "auto"):
        self.T, self.alphas_cumprod = num_train_timesteps, alphas_cumprod.float()
        self.snr_weight, self.fused = snr_weight, fused

    def __call__(self, net, obs, mask, mask_tilde, cond=None):
        t = torch.randint(0, self.T, (obs.shape[0],), device=obs.device)
        self.last_level = t.float() / self.T
        abar = self.alphas_cumprod.to(obs.device)[t]
        eps = torch.randn_like(obs)
        x_t = abar.sqrt().reshape(-1, 1, 1, 1) * obs + (1 - abar).sqrt().reshape(-1, 1, 1, 1) * eps
        x0_hat = net(x_t, t, mask_tilde, cond)
        # ᾱ/(1-ᾱ) turns the x0 error into the usual ε error (exact when A = Ã = 1).
        weight = abar / (1 - abar) if self.snr_weight else torch.ones_like(abar)
        return masked_mse(x0_hat, obs, mask, weight, fused=self.fused)


def truncated_log_normal(count: int, P_mean: float, P_std: float, sigma_low: float, device=None) -> torch.Tensor:
    """σ with ln σ ~ N(P_mean, P_std²) conditioned on σ ≥ sigma_low (EDM's levels above sigma_low keep
    their relative frequencies). Inverse CDF of the upper tail in float64, so that a sigma_low far in
    the tail (Φ(−a) ~ 1e-20) still draws exactly from the conditional law, not a clamp."""
    a = (math.log(sigma_low) - P_mean) / P_std
    tail = 0.5 * math.erfc(a / math.sqrt(2))  # P(ln σ ≥ ln sigma_low) = Φ(−a)
    v = (1 - torch.rand(count, dtype=torch.float64, device=device)) * tail  # uniform on (0, Φ(−a)]
    z = -torch.special.ndtri(v)  # ≥ a: the standard-normal quantile of the upper tail
    return (P_mean + P_std * z).exp().clamp_min(sigma_low).float()  # the clamp only absorbs rounding


def log_normal_below(count: int, P_mean: float, P_std: float, sigma_high: float, device=None) -> torch.Tensor:
    """σ with ln σ ~ N(P_mean, P_std²) conditioned on σ < sigma_high (the levels the consistency loss trains)."""
    b = (math.log(sigma_high) - P_mean) / P_std
    head = 0.5 * math.erfc(-b / math.sqrt(2))  # Φ(b)
    v = (1 - torch.rand(count, dtype=torch.float64, device=device)) * head  # uniform on (0, Φ(b)]
    z = torch.special.ndtri(v)  # ≤ b
    return (P_mean + P_std * z).exp().clamp(max=sigma_high * (1 - 1e-6)).float()


# Daras et al. 2024 ("Consistent Diffusion Meets Tweedie"), Sec. 3: the ambient loss for noisy data.
# Training images are seen once as y = x0 + σ_n·z (fixed per image, ambient/defenses/corruption.py).
# For σ_t ≥ σ_n, x_t = y + √(σ_t² − σ_n²)·z′ = x0 + σ_t·ε is a sample of the ordinary forward process.
# Given x0, (y − x0, x_t − x0) is Gaussian with Cov = σ_n² and Var(x_t − x0) = σ_t², so
#     E[y | x0, x_t] = x0 + (σ_n²/σ_t²)(x_t − x0),   and by the tower rule
#     E[y | x_t]     = (σ_n²/σ_t²)·x_t + (1 − σ_n²/σ_t²)·E[x0 | x_t].
# The squared error ‖r·x_t + (1 − r)·D(x_t, σ_t) − y‖², r = σ_n²/σ_t² < 1, is minimized by
# r·x_t + (1 − r)·D = E[y | x_t], i.e. D = E[x0 | x_t]: the clean-data denoiser, from noisy data only.
# The same relation is ambient-utils' `from_x0_pred_to_xnature_pred_ve_to_ve` (giannisdaras/ambient-utils,
# ambient_utils/loss.py), which the official SDXL fine-tuning (giannisdaras/ambient-tweedie,
# train_text_to_image_lora_sdxl.py, --noisy_ambient) uses in its VP form, with timesteps drawn uniformly
# in [t_n, T). Here σ_t is EDM's log-normal conditioned on σ_t ≥ σ_n (`truncated_log_normal`).
# Weight: EDM's λ(σ_t) on the y-space error (so the x0 error is weighed λ(σ_t)·(1 − r)², vanishing as
# σ_t → σ_n, where x_t ≈ y says nothing new about x0). The official ε-target weighs the y-space error by
# 1/(σ_t² − σ_n²) instead; the minimizer at every σ_t is E[x0 | x_t] for any positive weight.
# Below σ_n the Tweedie loss trains nothing: `consistency_weight` > 0 adds the paper's consistency loss.
class AmbientNoisyEDMLoss:
    def __init__(self, sigma_n: float, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 fused: str = "auto", consistency_weight: float = 0.0):
        if not sigma_n > 0:
            raise ConfigError(f"corruption.sigma={sigma_n!r} is invalid; allowed: a number > 0 (the observations' noise σ_n)")
        self.sigma_n, self.P_mean, self.P_std = float(sigma_n), P_mean, P_std
        self.sigma_data, self.fused, self.consistency_weight = sigma_data, fused, float(consistency_weight)

    def sample_sigma(self, count: int, device=None) -> torch.Tensor:
        return truncated_log_normal(count, self.P_mean, self.P_std, self.sigma_n, device)

    def __call__(self, net, obs, mask, mask_tilde, cond=None):
        sigma = self.sample_sigma(obs.shape[0], obs.device)
        if (sigma < self.sigma_n).any():  # never train below the data's own noise (no consistency loss)
            raise RuntimeError(f"a training level σ_t = {sigma.min().item():g} is below σ_n = {self.sigma_n:g}")
        s = sigma.reshape(-1, 1, 1, 1)
        x_t = obs + (s ** 2 - self.sigma_n ** 2).sqrt() * torch.randn_like(obs)
        D_xt = net(x_t, sigma, mask_tilde, cond)
        r = self.sigma_n ** 2 / s ** 2
        y_hat = r * x_t + (1 - r) * D_xt  # the model's E[y | x_t]
        loss = masked_mse(y_hat, obs, mask, edm_weight(sigma, self.sigma_data), fused=self.fused)
        if self.consistency_weight > 0:
            loss = loss + self.consistency_weight * self.consistency(net, obs, mask, mask_tilde, cond)
        return loss

    # Daras et al. 2024, the consistency loss (official: train_text_to_image_lora_sdxl.py, --consistency_coeff,
    # at the boundary, one step): the posterior mean is a martingale, E[E[x0 | x_s] | x_t] = E[x0 | x_t] for
    # s < t. At the boundary x_{σ_n} = y itself, so x̂ = D(y; σ_n) is what the Tweedie loss trains. Two
    # independent draws x_s¹, x_s² from the one-step bridge N(x̂ + ρ(y − x̂), σ_s²(1 − ρ)), ρ = σ_s²/σ_n²
    # (the stochastic sampler's step, as the official `move_one_step`), give an unbiased estimate of
    # ‖E[D(x_s; σ_s) | y] − x̂‖² as mean((D(x_s¹) − x̂)·(D(x_s²) − x̂)). The bridge mean is affine in x̂, so for
    # Gaussian data the clean denoiser is its fixed point (tests/test_noisy.py). σ_s: EDM's log-normal
    # conditioned on σ_s < σ_n. x̂ and the draws are held fixed (no gradient): the boundary is taught by the
    # Tweedie loss, the levels below learn to agree with it. Cost: 3 more network calls per sample (4 in all).
    def consistency(self, net, obs, mask, mask_tilde, cond=None):
        count = obs.shape[0]
        sigma_s = log_normal_below(count, self.P_mean, self.P_std, self.sigma_n, obs.device)
        with torch.no_grad():
            x_hat = net(obs, torch.full((count,), self.sigma_n, device=obs.device), mask_tilde, cond)
        rho = (sigma_s ** 2 / self.sigma_n ** 2).reshape(-1, 1, 1, 1)
        mean = x_hat + rho * (obs - x_hat)
        spread = sigma_s.reshape(-1, 1, 1, 1) * (1 - rho).sqrt()
        d1 = net(mean + spread * torch.randn_like(obs), sigma_s, mask_tilde, cond) - x_hat
        d2 = net(mean + spread * torch.randn_like(obs), sigma_s, mask_tilde, cond) - x_hat
        m = torch.broadcast_to(mask, d1.shape)
        return (m * d1 * d2).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ(t) = √((1 − ᾱ_t)/ᾱ_t): DDPM step t as the VE level of x_t/√ᾱ_t = x0 + σ(t)·ε (increasing in t)."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def first_timestep_at_or_above(alphas_cumprod: torch.Tensor, sigma_n: float) -> int:
    """t_n: the first DDPM step whose level σ(t) is ≥ σ_n (the lowest step the noisy loss trains at)."""
    above = (vp_sigmas(alphas_cumprod) >= sigma_n).nonzero()
    if len(above) == 0:
        raise ConfigError(f"corruption.sigma={sigma_n:g} is invalid; allowed: a level below the schedule's largest, "
                          f"{float(vp_sigmas(alphas_cumprod)[-1]):.4g} (σ of its last step)")
    return int(above[0])


# The same objective in DDPM/VP form, as the official SDXL fine-tuning uses it (giannisdaras/ambient-tweedie,
# train_text_to_image_lora_sdxl.py --noisy_ambient: timesteps uniform in [t_n, T), VP→VP extra noise).
# With x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε read as x_t/√ᾱ_t = x0 + σ_t·ε (σ_t = σ(t), `vp_sigmas`), the
# observation y = x0 + σ_n·z is noised to step t ≥ t_n by x_t = √ᾱ_t·(y + √(σ_t² − σ_n²)·z′), and
# E[y | x_t] = r·x_t/√ᾱ_t + (1 − r)·E[x0 | x_t], r = σ_n²/σ_t² (derivation above). Weight 1 on the
# y-space error, or with snr_weight 1/(σ_t² − σ_n²): the official ε-target's, ᾱ/(1 − ᾱ) at σ_n = 0.
class AmbientNoisyDDPMLoss:
    def __init__(self, sigma_n: float, num_train_timesteps: int, alphas_cumprod: torch.Tensor,
                 snr_weight: bool = False, fused: str = "auto"):
        if not sigma_n > 0:
            raise ConfigError(f"corruption.sigma={sigma_n!r} is invalid; allowed: a number > 0 (the observations' noise σ_n)")
        self.sigma_n, self.T, self.snr_weight, self.fused = float(sigma_n), num_train_timesteps, snr_weight, fused
        self.alphas_cumprod = alphas_cumprod.float()
        self.t_n = first_timestep_at_or_above(alphas_cumprod, self.sigma_n)

    def sample_timesteps(self, count: int, device=None) -> torch.Tensor:
        return torch.randint(self.t_n, self.T, (count,), device=device)

    def __call__(self, net, obs, mask, mask_tilde, cond=None):
        t = self.sample_timesteps(obs.shape[0], obs.device)
        abar = self.alphas_cumprod.to(obs.device)[t].reshape(-1, 1, 1, 1)
        sigma = ((1 - abar) / abar).sqrt()
        if (t < self.t_n).any() or (sigma < self.sigma_n).any():  # never below the data's own noise
            raise RuntimeError(f"a training step t = {int(t.min())} (σ = {float(sigma.min()):g}) is below "
                               f"σ_n = {self.sigma_n:g} (t_n = {self.t_n})")
        x_t = abar.sqrt() * (obs + (sigma ** 2 - self.sigma_n ** 2).clamp_min(0).sqrt() * torch.randn_like(obs))
        x0_hat = net(x_t, t, mask_tilde, cond)
        r = self.sigma_n ** 2 / sigma ** 2
        y_hat = r * x_t / abar.sqrt() + (1 - r) * x0_hat  # the model's E[y | x_t]
        weight = 1 / (sigma.flatten() ** 2 - self.sigma_n ** 2).clamp_min(1e-8) if self.snr_weight \
            else torch.ones_like(sigma.flatten())
        return masked_mse(y_hat, obs, mask, weight, fused=self.fused)
