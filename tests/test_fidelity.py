"""Faithful to the official Ambient Diffusion code (giannisdaras/ambient-diffusion) on identical inputs.

The official formulas are re-typed here from the paper and the official files (training/loss.py's
EDM branch, eval.py's ambient_sampler), as independent references: same images, masks, σ, noise
and network, then our loss and sampler must agree with them.
"""
import torch

from ambient.losses import AmbientEDMLoss
from ambient.precond import EDMPrecond
from ambient.samplers import edm_sample, edm_sigmas

SIGMA_DATA = 0.5


class ImageOnlyNet(torch.nn.Module):
    """A UNet stand-in that reads only the image channels, so the official input (mask channels
    scaled by c_in) and ours (one unscaled mask channel) give it the same F."""

    def __init__(self, channels=1):
        super().__init__()
        self.channels = channels
        self.w = torch.nn.Parameter(torch.tensor([0.7, -0.2, 0.05]))

    def forward(self, x, t, class_labels=None):
        img = x[:, :self.channels]
        out = self.w[0] * img + self.w[1] * img.mean((1, 2, 3), keepdim=True) + self.w[2] * torch.tanh(3 * img)
        out = out + 0.01 * t.reshape(-1, 1, 1, 1)  # depends on c_noise too
        return type("Out", (), {"sample": out})()


def official_edm_loss(unet, y, A, A_tilde, sigma, noise):
    """training/loss.py (EDM variant), per sample: λ·Σ(A ⊙ (D − y))² with D from EDMPrecond on
    Ã·(y + n); on pixels Ã hides, x is 0, so D = c_out·F there."""
    sd2 = SIGMA_DATA ** 2
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out = sd2 / (s ** 2 + sd2), s * SIGMA_DATA / (s ** 2 + sd2).sqrt()
    c_in, c_noise = 1 / (sd2 + s ** 2).sqrt(), sigma.log() / 4
    x = A_tilde * (y + noise)
    F = unet(torch.cat([c_in * x, c_in * A_tilde.expand_as(x)], 1), c_noise).sample
    D = c_skip * x + c_out * F
    weight = (sigma ** 2 + sd2) / (sigma * SIGMA_DATA) ** 2
    return weight * (A * (D - y)).pow(2).flatten(1).sum(1)


def _inputs(batch=6, keep=40, seed=0):
    """Images and masks with the same |A| in every sample (so per-sample normalization is a constant)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(batch, 1, 8, 8, generator=g) * 2 - 1
    A = torch.zeros(batch, 64)
    for i in range(batch):
        A[i, torch.randperm(64, generator=g)[:keep]] = 1
    A = A.reshape(batch, 1, 8, 8)
    B = (torch.rand(batch, 1, 8, 8, generator=g) > 0.3).float()
    sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(batch, 1, 8, 8, generator=g) * sigma.reshape(-1, 1, 1, 1)
    return y * A, A, A * B, sigma, noise


def _ours(hidden_precond, unet, obs, A, A_tilde, sigma, noise, monkeypatch):
    loss = AmbientEDMLoss(sigma_data=SIGMA_DATA, fused="off")
    # Replay the official draws: the loss draws σ then n from torch's global generator.
    draws = iter([(torch.log(sigma) + 1.2) / 1.2, noise / sigma.reshape(-1, 1, 1, 1)])
    monkeypatch.setattr(torch, "randn", lambda *a, **k: next(draws))
    monkeypatch.setattr(torch, "randn_like", lambda *a, **k: next(draws))
    return loss(EDMPrecond(unet, SIGMA_DATA, True, hidden_precond), obs, A, A_tilde)


def _grad(unet, value):
    unet.zero_grad()
    value.sum().backward()
    return unet.w.grad.clone()


def test_official_switch_equals_the_official_loss_up_to_the_per_sample_normalization(monkeypatch):
    unet = ImageOnlyNet()
    obs, A, A_tilde, sigma, noise = _inputs()
    official = official_edm_loss(unet, obs, A, A_tilde, sigma, noise)
    ours = _ours("official", unet, obs, A, A_tilde, sigma, noise, monkeypatch)
    observed = A.flatten(1).sum(1)  # C·|A| with C = 1
    assert torch.allclose(ours, official / observed, rtol=1e-6, atol=1e-7)
    g_official, g_ours = _grad(unet, official), _grad(unet, ours)
    assert torch.nn.functional.cosine_similarity(g_official, g_ours, dim=0) > 0.9999


def test_sigma_data_switch_differs_only_on_hidden_pixels_by_the_documented_factor(monkeypatch):
    unet = ImageOnlyNet()
    obs, A, A_tilde, sigma, noise = _inputs()
    x = obs + noise
    official = EDMPrecond(unet, SIGMA_DATA, True, "official")(x, sigma, A_tilde).detach()
    ours = EDMPrecond(unet, SIGMA_DATA, True, "sigma_data")(x, sigma, A_tilde).detach()
    seen, hidden = A_tilde.bool(), ~A_tilde.bool()
    assert torch.equal(ours[seen], official[seen])
    s = sigma.reshape(-1, 1, 1, 1).expand_as(x)
    c_out = s * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    # hidden pixels: σ_d·F instead of c_out·F, i.e. ×√(1 + σ_d²/σ²)
    assert torch.allclose(ours[hidden], official[hidden] * (SIGMA_DATA / c_out)[hidden], rtol=1e-5, atol=1e-6)
    # and with nothing hidden the two switches are the same loss
    no_hidden = _ours("sigma_data", unet, obs, A, A, sigma, noise, monkeypatch)
    monkeypatch.undo()
    reference = official_edm_loss(unet, obs, A, A, sigma, noise) / A.flatten(1).sum(1)
    assert torch.allclose(no_hidden, reference, rtol=1e-6, atol=1e-7)


def _toy_denoiser(masked_x, mask, sigma):
    """Any D that depends on the visible pixels and fills hidden ones from them."""
    s2 = SIGMA_DATA ** 2
    visible = masked_x * s2 / (s2 + sigma ** 2)
    fill = 0.6 * torch.tanh(masked_x.sum((1, 2, 3), keepdim=True) / mask.sum((1, 2, 3), keepdim=True).clamp_min(1))
    return mask * visible + (1 - mask) * (fill + 0.3 * torch.sin(masked_x.mean(1, keepdim=True) * 3))


def official_ambient_sampler(latents, masks, num_steps, sigma_min, sigma_max, rho, guidance, clipping):
    """eval.py's ambient_sampler without churn: D of each mask (clipped to [-1, 1] when clipping),
    reconstruction gradient of ½Σ_k‖D₀ − D_k‖², Heun average of (Euler step − w·gradient)."""
    t_steps = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    x_next = latents.double() * t_steps[0]

    def denoise_all(x, t):
        outs = [_toy_denoiser(m * x.float(), m, t.float()).double() for m in masks]
        return [o.clamp(-1, 1) if clipping else o for o in outs]

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat = x_next.detach().requires_grad_(True)
        D = denoise_all(x_hat, t_cur)
        disagreement = 0.5 * sum(((D[0] - d) ** 2).sum() for d in D)
        rec = torch.autograd.grad(disagreement, x_hat)[0] if len(D) > 1 else torch.zeros_like(x_hat)
        grad_1 = (t_next - t_cur) * (x_hat - D[0]) / t_cur - guidance * rec
        x_next = (x_hat + grad_1).detach()
        if i < num_steps - 1:
            x_e = x_next.clone().requires_grad_(True)
            D = denoise_all(x_e, t_next)
            disagreement = 0.5 * sum(((D[0] - d) ** 2).sum() for d in D)
            rec = torch.autograd.grad(disagreement, x_e)[0] if len(D) > 1 else torch.zeros_like(x_e)
            grad_2 = (t_next - t_cur) * (x_e - D[0]) / t_next - guidance * rec
            x_next = (x_hat + 0.5 * (grad_1 + grad_2)).detach()
    return x_next.float()


def test_heun_sampler_equals_the_official_ambient_sampler():
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(4, 1, 8, 8, generator=g)
    masks = (torch.rand(3, 4, 1, 8, 8, generator=g) > 0.5).float()
    ours_net = lambda x, sigma, mask, cond: _toy_denoiser(mask * x, mask, torch.as_tensor(sigma))  # noqa: E731
    settings = dict(num_steps=6, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    for guidance, clipping, k in ((0.0, False, 1), (0.0, True, 1), (0.3, False, 3), (0.3, True, 3)):
        reference = official_ambient_sampler(latents, masks[:k], guidance=guidance, clipping=clipping, **settings)
        ours = edm_sample(ours_net, latents, masks[:k], guidance=guidance, clip_denoised=clipping, **settings)
        assert torch.allclose(ours, reference, atol=1e-5), (guidance, clipping, (ours - reference).abs().max())
    unguided = edm_sample(ours_net, latents, masks, guidance=0.0, **settings)
    assert not torch.allclose(unguided, edm_sample(ours_net, latents, masks, guidance=0.3, **settings))


# --- the official box corruption, re-typed from torch_utils/ambient_diffusion.py's get_box_mask

def _official_box_mask(h: int, w: int, survival: float, gen: torch.Generator) -> torch.Tensor:
    import math

    top = torch.randint(0, h, (1, 1, 1), generator=gen)
    left = torch.randint(0, w, (1, 1, 1), generator=gen)
    side_h, side_w = math.ceil((1 - survival) * h), math.ceil((1 - survival) * w)
    rows = torch.arange(h).view(1, -1, 1)
    cols = torch.arange(w).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
    return 1 - inside.float()


def test_box_official_draws_the_official_box_and_a_second_box_for_b():
    from ambient.defenses.corruption import OfficialBox

    box = OfficialBox(0.4)
    edges = 0
    for seed in range(200):
        ours = box.mask((16, 16), torch.Generator().manual_seed(seed))
        assert torch.equal(ours, _official_box_mask(16, 16, 1 - 0.4, torch.Generator().manual_seed(seed)))
        edges += int(ours.sum() > 256 - 7 * 7)  # clipped at the border: fewer than ceil(0.4·16)² hidden
        further = box.further((16, 16), 0.1, torch.Generator().manual_seed(seed))
        assert torch.equal(further, _official_box_mask(16, 16, 1 - 0.1, torch.Generator().manual_seed(seed)))
    assert edges > 40  # the corner is uniform over the whole image, so boxes often hang off the edge


# --- duplicates and their masks: corruption.mask_key

def test_content_keyed_masks_give_exact_duplicates_one_mask():
    from ambient.data import load_digits, plant_duplicates
    from ambient.defenses.corruption import CorruptedImages, RandomMask

    data = plant_duplicates(load_digits(16).select(range(30)), {"count": 1, "times": 10, "seed": 0})
    copies = [r for r in range(len(data)) if torch.equal(data.images[r], data.images[data.source_index[-1]])]
    assert len(copies) == 10
    seen = {}
    for key in ("index", "content"):
        images = CorruptedImages(data, RandomMask(0.9), seed=0, delta=0.1, mask_key=key)
        masks = torch.stack([images.item(r)["mask"] for r in copies])
        seen[key] = masks.amax(0).mean().item()  # pixels of the image that some copy reveals
        if key == "content":
            tilde = torch.stack([images.item(r)["mask_tilde"] for r in copies])
            assert all(torch.equal(m, masks[0]) for m in masks) and all(torch.equal(t, tilde[0]) for t in tilde)
            others = [images.item(r)["mask"] for r in range(5)]  # distinct images still differ
            assert not torch.equal(others[0], others[1])
    assert seen["content"] < 0.2 and 0.5 < seen["index"] < 0.8  # ~10% vs ~1 − 0.9¹⁰ = 65%


def test_mask_key_is_validated():
    import pytest

    from ambient.config import ConfigError, validate
    from tests.helpers import compose

    validate(compose("train", ["corruption=mask90", "corruption.mask_key=content"]))
    with pytest.raises(ConfigError, match="corruption.mask_key"):
        validate(compose("train", ["corruption=mask90", "corruption.mask_key=pixels"]))
    validate(compose("train", ["corruption=box_official", "corruption.p=0.3"]))
    with pytest.raises(ConfigError, match="corruption.p"):
        validate(compose("train", ["corruption=box_official", "corruption.p=1.5"]))
