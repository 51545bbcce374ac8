"""Denoisers D(x; noise level, mask) around a diffusers UNet, each returning an x0 estimate.

Both wrappers apply the mask themselves, so no caller can hand the UNet a pixel outside Ã.
`cond` is what the model is conditioned on: None, class labels, or caption embeddings.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn


def noise_prediction(unet_output: torch.Tensor, channels: int) -> torch.Tensor:
    """The prediction part of a UNet output: DeepFloyd IF-style UNets append a learned-variance half
    (the pipeline splits at the input channel count) that the ambient objectives do not use."""
    return unet_output[:, :channels]


def _unet_output(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond, channels: int) -> torch.Tensor:
    """cond: class labels (B,) for a UNet2DModel, caption embeddings (B, L, D) for a UNet2DConditionModel."""
    x = x.to(getattr(unet, "dtype", x.dtype))  # a pipeline moved to float16 samples in float16; the caller's math stays float32
    if isinstance(unet, UNet2DConditionModel):
        if cond is None:
            raise ValueError("a text-conditional UNet needs caption embeddings (the empty caption for none)")
        out = unet(x, t, encoder_hidden_states=cond.to(x.dtype)).sample
    else:
        out = unet(x, t, class_labels=cond).sample
    return noise_prediction(out, channels)


def _unet_input(x: torch.Tensor, mask: torch.Tensor | None, mask_channel: bool, masked: bool = False) -> torch.Tensor:
    """Ã·x, with Ã as an extra channel when the UNet takes one; `masked`: x is Ã·x already."""
    if mask is None:
        if not mask_channel:
            return x
        mask = torch.ones_like(x[:, :1])
    elif not masked:
        x = x * mask
    return torch.cat([x, mask.to(x.dtype)], dim=1) if mask_channel else x


# Karras et al. 2022, Table 1 (EDM preconditioning); input Ã·x and Ã as in Daras et al. 2023.
# Where Ã hides a pixel there is nothing to skip-connect (x is 0 there). hidden_precond="official":
# D = c_out·F, exactly the official code. "sigma_data": D = σ_data·F (the σ → ∞ limit of the EDM
# scalings), which does not pin hidden pixels to 0 as σ → 0 when sampling, at the price of a
# ×√(1+σ_d²/σ²) larger gradient from hidden pixels in training.
class EDMPrecond(nn.Module):
    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, mask_channel: bool = True,
                 hidden_precond: str = "official"):
        super().__init__()
        if hidden_precond not in ("official", "sigma_data"):
            raise ValueError(f"loss.hidden_precond={hidden_precond!r}; allowed: official | sigma_data")
        self.unet, self.sigma_data, self.mask_channel = unet, sigma_data, mask_channel
        self.hidden_precond = hidden_precond

    def forward(self, x, sigma, mask=None, cond=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        x = x.float() if mask is None else x.float() * mask
        F_x = _unet_output(self.unet, _unet_input(c_in * x, mask, self.mask_channel, masked=True), c_noise, cond, x.shape[1])
        F_x = F_x.float()
        D_x = c_skip * x + c_out * F_x
        if mask is None or self.hidden_precond == "official":
            return D_x  # hidden pixels: x = 0 there, so D = c_out·F
        return mask * D_x + (1 - mask) * self.sigma_data * F_x


# DDPM / VP fine-tuning (official Ambient IF code): the UNet gets Ã·x_t; where Ã hides a pixel,
# its output is read as the x0 estimate itself (hidden_readout="x0", as trained), elsewhere as ε (or
# x0 for "sample" models). hidden_readout="epsilon" reads ε everywhere, as the official IF sampler does.
class DDPMPrecond(nn.Module):
    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 mask_channel: bool = True, hidden_readout: str = "x0"):
        super().__init__()
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"loss.prediction_type={prediction_type!r}; allowed: epsilon, sample, v_prediction")
        if hidden_readout not in ("x0", "epsilon"):
            raise ValueError(f"sampler.hidden_readout={hidden_readout!r}; allowed: x0 | epsilon")
        self.unet, self.prediction_type, self.mask_channel = unet, prediction_type, mask_channel
        self.hidden_readout = hidden_readout
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def forward(self, x_t, t, mask=None, cond=None):
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(x_t.shape[0])
        out = _unet_output(self.unet, _unet_input(x_t, mask, self.mask_channel), t, cond, x_t.shape[1]).float()
        if self.prediction_type == "sample":
            return out
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":  # Salimans & Ho 2022: v = √ᾱ·ε − √(1−ᾱ)·x0 (pipelines made elsewhere)
            return abar.sqrt() * x_t.float() - (1 - abar).sqrt() * out
        x0 = (x_t.float() - (1 - abar).sqrt() * out) / abar.sqrt()
        if mask is None or self.hidden_readout == "epsilon":
            return x0
        return mask * x0 + (1 - mask) * out
