import torch

from ambient.pipeline import AmbientPipeline
from ambient.samplers import edm_sample, edm_sigmas


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser for data ~ N(0, s²): D(x; σ) = s²/(s²+σ²)·x; records the masks it gets."""

    def __init__(self, s=0.5):
        super().__init__()
        self.s, self.masks, self.inputs = s, [], []
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, mask=None, class_labels=None):
        self.masks.append(None if mask is None else mask.clone())
        x = x if mask is None else x * mask
        self.inputs.append(x.clone())
        sigma = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)
        return self.s ** 2 / (self.s ** 2 + sigma ** 2) * x


def test_edm_schedule_endpoints():
    t = edm_sigmas(18, 0.002, 80, 7)
    assert len(t) == 19 and abs(t[0] - 80) < 1e-9 and abs(t[17] - 0.002) < 1e-9 and t[18] == 0
    assert (t[:-1] > t[1:]).all()


def test_heun_sampler_reaches_the_data_distribution():
    # With the exact denoiser the ODE maps N(0, 80²) to N(0, 0.5²); Heun's error shrinks with steps.
    torch.manual_seed(0)
    z = torch.randn(4000, 1, 2, 2)
    error = {n: abs(edm_sample(GaussianDenoiser(0.5), z, num_steps=n).std().item() / z.std().item() - 0.5)
             for n in (10, 18, 100)}
    assert error[100] < 0.002 < error[18] < error[10]
    assert error[18] < 0.05


class AnalyticPipeline(AmbientPipeline):
    """An AmbientPipeline whose denoiser is the exact one above (registered in place of a UNet)."""

    def _denoiser(self, hidden_readout):
        return self.unet


def _model(p=0.8, delta=0.1, net=None):
    settings = {"objective": "edm", "mask_channel": True, "channels": 1, "resolution": 8, "delta": delta,
                "corruption": {"kind": "mask", "p": p, "delta": delta}, "num_classes": 0,
                "sampler": {"num_steps": 4, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}}
    return AnalyticPipeline(net or GaussianDenoiser(), ambient=settings)


def test_mask_is_fixed_along_each_trajectory_and_has_the_trained_density():
    net = GaussianDenoiser()
    _model(net=net).generate(64, seed=0, batch_size=64)
    first = net.masks[0]
    assert all(torch.equal(m, first) for m in net.masks)  # one mask per trajectory, every step
    assert abs(first.mean().item() - 0.2 * 0.9) < 0.03
    assert all((x[m.expand_as(x) == 0] == 0).all() for x, m in zip(net.inputs, net.masks))


def test_samples_depend_on_seed_and_position_not_batch_size():
    model = _model()
    a = model.generate(6, seed=3, batch_size=6)
    b = model.generate(6, seed=3, batch_size=4)
    c = model.generate(6, seed=4, batch_size=6)
    assert torch.allclose(a, b) and not torch.allclose(a, c)


def test_reconstruction_guidance_changes_the_trajectory():
    model = _model(p=0.5)
    plain = model.generate(4, seed=0, num_masks=3, guidance=0.0)
    guided = model.generate(4, seed=0, num_masks=3, guidance=0.5)
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)
