"""Samplers: pure functions from noise (and fixed masks) to images. Tensors in, tensors out.

Every sampler has one call shape, `sample(net, noise, masks=None, cond=None, **settings)`:
- net(x, noise level, mask, cond) -> x0 estimate (ambient.precond's wrappers, or any callable);
- masks (K, B, 1, H, W) or None: ambient models keep the masks fixed along the whole trajectory
  (Daras et al. 2023); the first conditions the denoiser, the others only feed reconstruction guidance.
The trained-model artifact (ambient/pipeline.py) draws the noise and masks. Nothing here is random,
except the ancestral DDPM sampler's fresh noise at each step, drawn from the per-image generators it
is handed (so an image still depends only on its own generator, never on the batch).
"""
from __future__ import annotations

import torch

from ambient.config import SAMPLER_KINDS


def edm_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: the σ schedule, with a final 0."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def _guided_denoise(net, x, sigma, masks, cond, guidance: float, clip: bool = False):
    """D with the first mask (clipped to [-1, 1] when clip, as the official sampler does at every
    call); with several masks, the reconstruction-guidance push w∇ₓ½Σ_k‖D₀ − D_k‖² (of the clipped D)."""
    denoise = (lambda m: net(x, sigma, m, cond).clamp(-1, 1)) if clip else (lambda m: net(x, sigma, m, cond))
    if masks is None:
        return denoise(None), None
    if guidance == 0 or masks.shape[0] == 1:
        return denoise(masks[0]), None
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        D = [denoise(m) for m in masks]
        disagreement = 0.5 * sum(((D[0] - d) ** 2).sum() for d in D[1:])
        grad, = torch.autograd.grad(disagreement, x)
    return D[0].detach(), guidance * grad


# Karras et al. 2022, Algorithm 1 (deterministic Heun), with fixed ambient masks; clipping and
# reconstruction guidance as the official `ambient_sampler` (Daras et al. 2023, eval.py).
@torch.no_grad()
def edm_sample(net, noise, masks=None, cond=None, num_steps=18, sigma_min=0.002, sigma_max=80.0,
               rho=7.0, guidance=0.0, clip_denoised=False, known=None, **_ignored):
    t_steps = edm_sigmas(num_steps, sigma_min, sigma_max, rho, noise.device)
    x_next = noise.double() * t_steps[0]
    x_next = _replace_known(x_next, known, t_steps[0], lambda x0, eps, t: x0 + t * eps)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        denoised, push = _guided_denoise(net, x_cur.float(), t_cur.float(), masks, cond, guidance, clip_denoised)
        step = (t_next - t_cur) * (x_cur - denoised.double()) / t_cur
        grad_1 = step if push is None else step - push.double()
        if i < num_steps - 1:  # Heun's 2nd-order correction; the guidance pushes are averaged too
            x_euler = x_cur + grad_1
            denoised, push = _guided_denoise(net, x_euler.float(), t_next.float(), masks, cond, guidance,
                                             clip_denoised)
            step = (t_next - t_cur) * (x_euler - denoised.double()) / t_next
            grad_2 = step if push is None else step - push.double()
            x_next = x_cur + 0.5 * (grad_1 + grad_2)
        else:
            x_next = x_cur + grad_1
        x_next = _replace_known(x_next, known, t_next, lambda x0, eps, t: x0 + t * eps)
    return x_next.float()


def _replace_known(x, known, level, noised):
    """Inpainting by replacement (RePaint, Lugmayr et al. 2022, without resampling): known pixels are
    set to the true image noised to the current level with a fixed draw. known = (x0, keep, eps):
    x0 (B, C, H, W), keep (B, 1, H, W) 1 where the pixel is given, eps fixed noise like x0."""
    if known is None:
        return x
    x0, keep, eps = known
    return keep * noised(x0.to(x.dtype), eps.to(x.dtype), level) + (1 - keep) * x


# DDIM (Song et al. 2021) over x0 estimates, with the mask fixed along the trajectory.
# scheduler: a diffusers DDIMScheduler with prediction_type="sample" (net returns x0).
@torch.no_grad()
def ddim_sample(net, noise, masks=None, cond=None, scheduler=None, num_steps=50, guidance=0.0, clip_denoised=False,
                known=None, t_stop=None, **_ignored):
    """t_stop: return the x0 estimate at the last step ≥ t_stop instead of stepping below it (a model
    trained only at t ≥ t_stop: the official early stop of Daras et al. 2024)."""
    if scheduler is None:
        raise ValueError("ddim_sample needs the model's DDIMScheduler (scheduler=...)")
    if guidance:
        raise ValueError("reconstruction guidance (attack.guidance) is implemented for the EDM sampler only")
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    x = _replace_known(x, known, int(scheduler.timesteps[0]), _vp_noised(scheduler))
    for t in scheduler.timesteps:
        x0 = net(x, t, None if masks is None else masks[0], cond)
        x0 = x0.clamp(-1, 1) if clip_denoised else x0
        if t_stop is not None and _previous_timestep(scheduler, t) < t_stop:
            return x0
        x = scheduler.step(x0, t, x, eta=0.0).prev_sample
        if known is not None:
            x = _replace_known(x, known, _previous_timestep(scheduler, t), _vp_noised(scheduler))
    return x


def _previous_timestep(scheduler, t) -> int:
    """The step a scheduler moves to from t (-1 after the last); DDIM's rule when it has no method."""
    if hasattr(type(scheduler), "previous_timestep"):
        return int(scheduler.previous_timestep(t))
    return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _vp_noised(scheduler):
    """x0 at DDPM step t: √ᾱ_t·x0 + √(1 − ᾱ_t)·ε (t < 0: the clean image)."""
    def noised(x0, eps, t):
        if t < 0:
            return x0
        abar = scheduler.alphas_cumprod[t].to(x0.device, x0.dtype)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return noised


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022), per image: s = the `ratio` quantile of |x0|,
    clamped to [1, max_value]; x0 is clipped to [−s, s] and divided by s."""
    flat = x0.reshape(len(x0), -1).abs().float()
    s = torch.quantile(flat, ratio, dim=1).clamp(1.0, max_value).reshape(-1, *[1] * (x0.dim() - 1))
    return (x0.clamp(-s, s) / s).to(x0.dtype)


# DDPM ancestral sampling (Ho et al. 2020) as the official Ambient IF pipeline does it: one mask per
# trajectory, x0 thresholded (dynamic, with the scheduler's ratio) at every step, the posterior
# q(x_{t'} | x_t, x0) with its fixed_small variance. generators: one per image, for the step noise.
@torch.no_grad()
def ddpm_ancestral_sample(net, noise, masks=None, cond=None, scheduler=None, num_steps=100, guidance=0.0,
                          clip_denoised=False, threshold="dynamic", generators=None, known=None, t_stop=None,
                          **_ignored):
    if scheduler is None or generators is None:
        raise ValueError("ddpm_ancestral_sample needs the model's scheduler and one generator per image")
    if guidance:
        raise ValueError("reconstruction guidance (attack.guidance) is implemented for the EDM sampler only")
    if threshold not in ("dynamic", "clip", "none"):
        raise ValueError(f"sampler.threshold={threshold!r}; allowed: dynamic | clip | none")
    scheduler.set_timesteps(num_steps, device=noise.device)
    alphas_cumprod = scheduler.alphas_cumprod.to(noise.device, torch.float64)
    ratio = float(scheduler.config.get("dynamic_thresholding_ratio", 0.995))
    max_value = float(scheduler.config.get("sample_max_value", 1.0))
    x = noise.double()
    x = _replace_known(x, known, int(scheduler.timesteps[0]), _vp_noised(scheduler))
    for t in scheduler.timesteps:
        x0 = net(x.float(), t, None if masks is None else masks[0], cond)
        if threshold == "dynamic":
            x0 = dynamic_threshold(x0, ratio, max_value)
        elif threshold == "clip" or clip_denoised:
            x0 = x0.clamp(-1, 1)
        prev = _previous_timestep(scheduler, t)
        if t_stop is not None and prev < t_stop:  # as ddim_sample: end with the x0 estimate at t ≥ t_stop
            return x0.float()
        abar_t = alphas_cumprod[t]
        abar_prev = alphas_cumprod[prev] if prev >= 0 else torch.ones((), dtype=torch.float64, device=x.device)
        beta = 1 - abar_t / abar_prev
        mean = (abar_prev.sqrt() * beta * x0.double() + (1 - beta).sqrt() * (1 - abar_prev) * x) / (1 - abar_t)
        if prev < 0:
            x = _replace_known(mean, known, prev, _vp_noised(scheduler))
            continue
        variance = ((1 - abar_prev) / (1 - abar_t) * beta).clamp(min=1e-20)
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).double()
        x = _replace_known(mean + variance.sqrt() * z.to(x.device), known, prev, _vp_noised(scheduler))
    return x.float()


SAMPLERS = {"edm_heun": edm_sample, "ddim": ddim_sample, "ddpm_ancestral": ddpm_ancestral_sample}
assert set(SAMPLERS) == set(SAMPLER_KINDS)


class ClassifierFreeGuidance:
    """A denoiser with its caption fixed: D_u + w·(D_c − D_u) (Ho & Salimans 2022), u = the empty caption.

    Callable like the wrapped net, so every sampler (and reconstruction guidance) uses it unchanged.
    """

    def __init__(self, net, cond: torch.Tensor, uncond: torch.Tensor, scale: float):
        self.net, self.cond, self.uncond, self.scale = net, cond, uncond, float(scale)

    def __call__(self, x, sigma, mask=None, _cond=None):
        if self.scale == 1.0:
            return self.net(x, sigma, mask, self.cond)
        both = self.net(torch.cat([x, x]), _repeat(sigma, 2), None if mask is None else torch.cat([mask, mask]),
                        torch.cat([self.uncond, self.cond]))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _repeat(t, times: int):
    t = torch.as_tensor(t)
    return t if t.ndim == 0 else torch.cat([t] * times)
