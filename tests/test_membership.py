"""The loss attack probes a model with the model's own noise process (schedule and mask draw)."""
import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ambient.attack.membership import loss_scores
from ambient.pipeline import AmbientPipeline, linear_vp_alpha_bar
from ambient.precond import EDMPrecond


def _unet(in_channels=1):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def _ddpm_model(beta_schedule: str, corruption=None):
    """A DDPM-objective TrainedModel as load_run builds it, with the given training schedule."""
    mask_channel = corruption is not None
    settings = {"objective": "ddpm", "mask_channel": mask_channel, "channels": 1, "resolution": 8, "num_classes": 0,
                "corruption": corruption or {"kind": "none"}, "delta": (corruption or {}).get("delta", 0.0),
                "prediction_type": "epsilon", "sampler": {"kind": "ddim", "num_steps": 5}}
    return AmbientPipeline(_unet(1 + mask_channel), DDPMScheduler(beta_schedule=beta_schedule), ambient=settings)


def _unet_inputs(model, timestep=100, n=64):
    seen = []
    model.net.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    loss_scores(model, torch.zeros(n, 1, 8, 8), range(n), timestep=timestep, draws=1)
    return seen[0]


@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear"])
def test_loss_attack_noises_with_the_models_own_schedule(beta_schedule):
    # A pipeline (IF-style) model trains on a cosine schedule: at t = 100, ᾱ = 0.972 there but 0.895 on
    # the linear one the attack used to hard-code. With x = 0 the UNet sees √(1 − ᾱ_t)·ε exactly.
    model = _ddpm_model(beta_schedule)
    abar = float(model.scheduler.alphas_cumprod[100])
    x_t = _unet_inputs(model)
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - abar), rel=0.05)
    if beta_schedule != "linear":
        assert abs(x_t.std().item() - math.sqrt(1 - linear_vp_alpha_bar(100))) > 0.1


def test_loss_attack_sees_images_through_the_models_own_sampling_mask():
    model = _ddpm_model("linear", {"kind": "mask", "p": 0.8, "delta": 0.1})
    inputs = _unet_inputs(model, n=32)
    image, mask = inputs[:, :1], inputs[:, 1:]
    assert mask.mean().item() == pytest.approx(0.2 * 0.9, abs=0.03)  # keep probability (1 − p)(1 − δ)
    assert (image[mask == 0] == 0).all()  # hidden pixels never reach the UNet


def test_edm_level_matches_the_ddpm_step_on_the_linear_schedule():
    seen = []

    class Spy(EDMPrecond):
        def forward(self, x, sigma, mask=None, cond=None):
            seen.append((x.detach().clone(), torch.as_tensor(sigma).flatten()[0].item()))
            return super().forward(x, sigma, mask, cond)

    settings = {"objective": "edm", "mask_channel": False, "channels": 1, "resolution": 8, "num_classes": 0,
                "corruption": {"kind": "none"}, "delta": 0.0, "sigma_data": 0.5}
    class SpyPipeline(AmbientPipeline):
        def _denoiser(self, hidden_readout):
            return Spy(self.unet, 0.5, mask_channel=False)

    model = SpyPipeline(_unet(), ambient=settings)
    loss_scores(model, torch.zeros(16, 1, 8, 8), range(16), timestep=100, draws=1)
    abar = linear_vp_alpha_bar(100)
    assert seen[0][1] == pytest.approx(math.sqrt((1 - abar) / abar), rel=1e-6)


def test_scores_are_reproducible_per_image_not_per_batch():
    model = _ddpm_model("linear", {"kind": "mask", "p": 0.5, "delta": 0.1})
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    all_at_once = loss_scores(model, x, [10, 11, 12, 13, 14, 15], timestep=100, draws=2)
    split = torch.cat([loss_scores(model, x[:2], [10, 11], 100, 2), loss_scores(model, x[2:], [12, 13, 14, 15], 100, 2)])
    assert torch.allclose(all_at_once, split, atol=1e-6)
