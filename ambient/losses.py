"""Ambient losses: squared error on the pixels of A only, per sample normalised by |A|.

Each loss returns the per-sample loss (B,); the training loop reduces. `last_level` holds each
sample's noise level of the last call as a number in [0, 1), uniform under the loss's own noise
distribution (loss-drop compares a sample's loss with others at the same level). The network is fed
Ã·x_t and Ã; the target is the observation A·x, so pixels in A but not in Ã are what teach the
model to fill in what it cannot see (Daras et al. 2023). With A = Ã = 1 the EDM loss is the
ordinary EDM denoising loss divided by the number of pixels.
"""
from __future__ import annotations

import torch

from ambient.kernels.masked_loss import masked_mse


# Daras et al. 2023 (EDM variant, from Karras et al. 2022 Eq. 8): ln σ ~ N(P_mean, P_std²).
class AmbientEDMLoss:
    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, fused: str = "auto"):
        self.P_mean, self.P_std, self.sigma_data, self.fused = P_mean, P_std, sigma_data, fused

    def __call__(self, net, obs, mask, mask_tilde, cond=None):
        rnd_normal = torch.randn(obs.shape[0], device=obs.device)
        self.last_level = torch.special.ndtr(rnd_normal)  # Φ: the quantile of σ in its log-normal law
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
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
