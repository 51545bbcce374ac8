"""SecMI and PIA: membership inference by deterministic DDIM probes of the model's own denoiser.

Both were published for DDPM's VP process x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε and an ε-network ε_θ(x_t, t).
Here they run on any trained model through its x0 estimate in σ form, x̂0 = D(x; σ_t) with
x = x0 + σ_t·ε (`AmbientPipeline.denoise_at`): dividing the VP state by √ᾱ_t gives
x_t/√ᾱ_t = x0 + σ_t·ε, σ_t = √((1 − ᾱ_t)/ᾱ_t) (Song et al. 2021, DDIM, Sec. 4.3: x̄ = x/√ᾱ, σ; Karras
et al. 2022, Sec. 3 / Table 1: DDIM is the ODE in σ with the VP scaling factored out). So
    ε_θ(x_t, t) = ε̂(x; σ_t) = (x − D(x; σ_t)) / σ_t       (the VP and σ-form ε are the same noise)
and one deterministic DDIM step t → t' (Song et al. 2021, Eq. 12 with η = 0:
x_{t'} = √ᾱ_{t'}·x̂0 + √(1 − ᾱ_{t'})·ε_θ(x_t, t), x̂0 = (x_t − √(1 − ᾱ_t)·ε_θ)/√ᾱ_t) is, divided by √ᾱ_{t'},
    x_{σ'} = D(x; σ) + σ'·ε̂(x; σ),
the same update forwards (inversion, SecMI's φ_θ) and backwards (denoising, SecMI's ψ_θ). EDM models
have no discrete steps: step t is the σ_t of t on the linear DDPM schedule (as for the loss attack);
DDPM models use their own ᾱ_t. The clean image is the state at step 0, as in both official codes
(ε_θ(x0, 0): the VP x0 is x_{t=0}, so its σ form is x0/√ᾱ_0, σ_0 ≈ 0.01 on the linear schedule).

Masked (ambient) models see Ã·x: each image's sampling mask is drawn once per draw from its own
generator (seed, image index, MIA_PROBE, draw) and kept for every denoiser call of the probe (one
mask per trajectory, as in sampling); scores average over `mask_draws` masks. Unmasked models are
deterministic, probed once. Every score is lower = member and does not depend on the batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ambient.seeding import Stream, seeded_generator


def _eps(model, x: Tensor, t: int, masks, cond) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) at step t for x in σ form."""
    x0_hat = model.denoise_at(x, t, masks, cond)
    return x0_hat, (x.to(x0_hat.device) - x0_hat) / model.sigma_of(t)


def ddim_step(model, x: Tensor, t: int, t_next: int, masks=None, cond=None) -> Tensor:
    """One deterministic DDIM step in σ form, t → t_next (either direction): x' = x̂0 + σ_{t'}·ε̂."""
    x0_hat, eps = _eps(model, x, t, masks, cond)
    return x0_hat + model.sigma_of(t_next) * eps


# Duan et al. 2023 (SecMI), SecMI_stat: the t-error ℓ_{t,x0} = ‖ψ_θ(φ_θ(x̃_t, t), t) − x̃_t‖², x̃_t = Φ_θ(x0, t)
# the deterministic DDIM inversion of x0 to t. As in their code (mia_evals/secmia.py, t_sec = 100,
# interval k = 10): invert 0 → k → … → t_sec − k, step on to t_sec and back to t_sec − k, score the
# squared ℓ2 summed over pixels, in VP units (×ᾱ_{t_sec−k}: x_t = √ᾱ_t·x).
def _secmi_batch(model, x0: Tensor, t_sec: int, interval: int, masks, cond) -> Tensor:
    steps = list(range(0, t_sec, interval))  # 0, k, ..., t_sec − k
    x = x0 / model.alpha_bar(0) ** 0.5
    for t, t_next in zip(steps, steps[1:]):
        x = ddim_step(model, x, t, t_next, masks, cond)  # Φ_θ: x̃_{t_sec − k}
    t = steps[-1]
    x_up = ddim_step(model, x, t, t_sec, masks, cond)  # φ_θ
    x_back = ddim_step(model, x_up, t_sec, t, masks, cond)  # ψ_θ
    return model.alpha_bar(t) * ((x_back - x.to(x_back.device)) ** 2).flatten(1).sum(1)


# Kong et al. 2024 (PIA): the proximal initial noise ε0 = ε_θ(x0, 0), x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε0
# (σ form: x0 + σ_t·ε0), score ‖ε_θ(x_t, t) − ε0‖_p^p summed over pixels (their code: p = 4).
def _pia_batch(model, x0: Tensor, timestep: int, p: float, masks, cond) -> Tensor:
    _, eps0 = _eps(model, x0 / model.alpha_bar(0) ** 0.5, 0, masks, cond)
    _, eps_t = _eps(model, x0.to(eps0.device) + model.sigma_of(timestep) * eps0, timestep, masks, cond)
    return ((eps_t - eps0).abs() ** p).flatten(1).sum(1)


@torch.no_grad()
def _probe(model, batch_fn, images: Tensor, indices, seed: int, cond, mask_draws: int, batch_size: int) -> Tensor:
    indices = [int(i) for i in indices]
    scores = torch.zeros(len(images))
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        x0 = images[rows].float()
        part = None if cond is None else cond[rows]
        for d in range(mask_draws):
            masks = model.sampling_masks([seeded_generator(seed, i, Stream.MIA_PROBE, d) for i in indices[rows]])
            if masks is None:  # nothing masked: the probe is deterministic, one pass is the score
                scores[rows] = batch_fn(x0, None, part).cpu()
                break
            scores[rows] += batch_fn(x0, masks, part).cpu() / mask_draws
    return scores


def secmi_scores(model, images: Tensor, indices, t_sec: int = 100, interval: int = 10, seed: int = 0, cond=None,
                 mask_draws: int = 1, batch_size: int = 256) -> Tensor:
    """SecMI_stat t-error per image (images in [-1, 1]; lower = member); t_sec/interval + 1 denoiser calls
    per image and mask draw."""
    if interval < 1 or t_sec % interval or t_sec < 2 * interval:
        raise ValueError(f"mia.secmi.t_sec={t_sec} must be a multiple of mia.secmi.interval={interval}, at least 2×")
    return _probe(model, lambda x, m, c: _secmi_batch(model, x, t_sec, interval, m, c), images, indices, seed, cond,
                  mask_draws, batch_size)


def pia_scores(model, images: Tensor, indices, timestep: int = 200, p: float = 4.0, seed: int = 0, cond=None,
               mask_draws: int = 1, batch_size: int = 256) -> Tensor:
    """PIA score per image (images in [-1, 1]; lower = member); 2 denoiser calls per image and mask draw."""
    return _probe(model, lambda x, m, c: _pia_batch(model, x, timestep, p, m, c), images, indices, seed, cond,
                  mask_draws, batch_size)


def secmi_calls(t_sec: int, interval: int) -> int:
    """Denoiser calls per image and mask draw: the inversion's t_sec/k − 1 steps, then up and back."""
    return t_sec // interval + 1


PIA_CALLS = 2
