import torch

from ambient.data import load_digits
from ambient.defenses.corruption import CorruptedImages, RandomMask
from ambient.losses import AmbientDDPMLoss, AmbientEDMLoss
from ambient.precond import DDPMPrecond, EDMPrecond


class Spy(torch.nn.Module):
    """A UNet stand-in that records what it is fed and returns a differentiable function of it."""

    def __init__(self, channels=1, mask_channel=True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.channels, self.inputs = channels, []

    def forward(self, x, t, class_labels=None):
        self.inputs.append(x.detach().clone())
        out = self.w * x[:, :self.channels] + 0.1 * x[:, :self.channels] ** 2
        return type("Out", (), {"sample": out})()


def _batch(p=0.8, delta=0.1, n=8):
    ds = CorruptedImages(load_digits(16).select(torch.arange(n)), RandomMask(p), seed=0, delta=delta)
    return ds.batch(range(n)), load_digits(16).select(torch.arange(n)).as_float()


def test_edm_loss_equals_brute_force_per_pixel_reference():
    b, _ = _batch()
    net = EDMPrecond(Spy(), sigma_data=0.5, mask_channel=True)
    loss_fn = AmbientEDMLoss(fused="off")
    torch.manual_seed(7)
    loss = loss_fn(net, b["obs"], b["mask"], b["mask_tilde"])
    # replay the same draws by hand, one pixel at a time
    torch.manual_seed(7)
    sigma = (torch.randn(8) * 1.2 - 1.2).exp()
    n = torch.randn_like(b["obs"]) * sigma.reshape(-1, 1, 1, 1)
    D = net(b["obs"] + n, sigma, b["mask_tilde"]).detach()
    for i in range(8):
        lam = (sigma[i] ** 2 + 0.25) / (sigma[i] * 0.5) ** 2
        total, count = 0.0, 0
        for y in range(16):
            for x in range(16):
                if b["mask"][i, 0, y, x] > 0:
                    total += float(lam * (D[i, 0, y, x] - b["obs"][i, 0, y, x]) ** 2)
                    count += 1
        assert abs(loss[i].item() - total / count) < 1e-4 * max(1.0, total / count)


def test_gradient_is_exactly_zero_outside_A():
    b, _ = _batch()
    pred = torch.randn_like(b["obs"], requires_grad=True)
    from ambient.kernels.masked_loss import masked_mse

    masked_mse(pred, b["obs"], b["mask"], torch.rand(8), fused="off").sum().backward()
    outside = (b["mask"] == 0).expand_as(pred)
    assert (pred.grad[outside] == 0).all() and (pred.grad[~outside] != 0).any()


def test_network_never_receives_a_pixel_outside_A_tilde():
    b, clean = _batch(p=0.7)
    spy = Spy()
    AmbientEDMLoss(fused="off")(EDMPrecond(spy, 0.5, True), b["obs"], b["mask"], b["mask_tilde"])
    fed = spy.inputs[0]
    image, mask = fed[:, :1], fed[:, 1:]
    assert torch.equal(mask, b["mask_tilde"])
    assert (image[mask.expand_as(image) == 0] == 0).all()  # not even the noise leaks where Ã is 0
    # changing the clean pixels that A erased changes nothing the network sees
    tampered = clean + 5 * (1 - b["mask"])
    assert torch.equal(tampered * b["mask"], b["obs"])


def test_no_corruption_is_ordinary_edm_denoising():
    b, clean = _batch(p=0.0, delta=0.0)
    assert (b["mask"] == 1).all() and torch.equal(b["obs"], clean)
    net = EDMPrecond(Spy(mask_channel=False), 0.5, mask_channel=False)
    torch.manual_seed(1)
    loss = AmbientEDMLoss(fused="off")(net, b["obs"], b["mask"], b["mask_tilde"])
    torch.manual_seed(1)
    sigma = (torch.randn(8) * 1.2 - 1.2).exp()
    n = torch.randn_like(clean) * sigma.reshape(-1, 1, 1, 1)
    lam = ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2).reshape(-1, 1, 1, 1)
    edm = (lam * (net(clean + n, sigma) - clean) ** 2).mean(dim=(1, 2, 3))  # Karras et al. EDMLoss, mean
    assert torch.allclose(loss, edm, rtol=1e-5)
    assert spy_channels(net) == 1


def spy_channels(net):
    return net.unet.inputs[-1].shape[1]


def test_ddpm_loss_with_snr_weight_is_the_epsilon_loss_when_nothing_is_masked():
    b, clean = _batch(p=0.0, delta=0.0)
    abar = torch.linspace(0.999, 0.01, 1000)
    net = DDPMPrecond(Spy(mask_channel=False), abar, "epsilon", mask_channel=False)
    torch.manual_seed(2)
    loss = AmbientDDPMLoss(1000, abar, snr_weight=True, fused="off")(net, b["obs"], b["mask"], b["mask_tilde"])
    torch.manual_seed(2)
    t = torch.randint(0, 1000, (8,))
    eps = torch.randn_like(clean)
    a = abar[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * clean + (1 - a).sqrt() * eps
    eps_hat = net.unet(x_t, t).sample
    assert torch.allclose(loss, ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4)


def test_ddpm_precond_reads_hidden_pixels_as_x0():
    abar = torch.linspace(0.999, 0.01, 1000)
    spy = Spy()
    net = DDPMPrecond(spy, abar, "epsilon", mask_channel=True)
    x_t = torch.randn(2, 1, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    x0 = net(x_t, torch.tensor([10, 500]), mask)
    out = spy.inputs[0][:, :1] * spy.w + 0.1 * spy.inputs[0][:, :1] ** 2
    hidden = mask == 0
    assert torch.allclose(x0[hidden], out[hidden])
    assert (spy.inputs[0][:, :1][hidden] == 0).all()
