"""DP-SGD (ambient/defenses/privacy.py): the accountant, per-sample clipping on a real diffusers UNet,
Poisson batches and their resume, and the config errors."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from ambient.config import ConfigError, validate
from ambient.defenses.privacy import DPSGD, PrivacyState, check_processes, epsilon_spent, poisson_rows
from ambient.models import build_model
from ambient.precond import EDMPrecond
from ambient.rundir import ModelDir
from tests.helpers import compose


def _privacy(**kw):
    base = dict(kind="dpsgd", epsilon=None, delta=1e-5, max_grad_norm=1.0, noise_multiplier=0.0, accountant="rdp",
                noise_multiplicity=1)
    return OmegaConf.create({**base, **kw})


# --- the accountant

@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_stepping_its_own_accountant(accountant):
    from opacus.accountants import create_accountant

    q, sigma, steps, delta = 0.01, 1.1, 1000, 1e-5
    acc = create_accountant(accountant)
    for _ in range(steps):  # what Opacus' own PrivacyEngine does once per optimizer step
        acc.step(noise_multiplier=sigma, sample_rate=q)
    state = PrivacyState()
    for _ in range(steps):
        state.record(sigma, q)
    ours = epsilon_spent(state.history, delta, accountant)
    assert ours == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)
    if accountant == "rdp":  # Abadi et al.'s MNIST setting: well known to be about 1.7 under RDP
        assert 1.5 < ours < 1.9
    # a checkpointed state gives the same ε
    restored = PrivacyState()
    restored.load_state_dict(state.state_dict())
    assert restored.history == state.history and epsilon_spent(restored.history, delta, accountant) == ours


def test_noise_multiplier_is_solved_from_the_target_epsilon():
    dp = DPSGD(_privacy(epsilon=10.0, noise_multiplier=None), n=200, batch_size=16, steps=100, seed=0)
    assert dp.rate == pytest.approx(0.08) and dp.sigma > 0
    for _ in range(100):
        dp.stepped()
    eps = dp.epsilon()
    assert 9.9 <= eps <= 10.0  # at most the target, within Opacus' search tolerance
    # less noise would overspend: σ is the smallest that meets the target
    assert epsilon_spent([(dp.sigma * 0.97, 0.08, 100)], 1e-5) > 10.0
    record = dp.record()
    assert record["epsilon"] == pytest.approx(eps, abs=1e-4) and record["steps"] == 100 and record["target_epsilon"] == 10


def test_a_resume_that_would_change_the_noise_is_refused():
    from ambient.errors import RunRefused

    planned = DPSGD(_privacy(epsilon=10.0, noise_multiplier=None), n=200, batch_size=16, steps=100, seed=0)
    for _ in range(3):
        planned.stepped()
    longer = DPSGD(_privacy(epsilon=10.0, noise_multiplier=None), n=200, batch_size=16, steps=200, seed=0)
    longer.state.load_state_dict(planned.state.state_dict())
    assert longer.sigma > planned.sigma
    with pytest.raises(RunRefused, match=f"privacy.noise_multiplier={planned.sigma:.6g}"):
        longer.check_resume()
    same = DPSGD(_privacy(epsilon=None, noise_multiplier=planned.sigma), n=200, batch_size=16, steps=200, seed=0)
    same.state.load_state_dict(planned.state.state_dict())
    same.check_resume()  # σ given: training longer is allowed, ε keeps counting
    same.stepped()
    assert same.state.history == [[planned.sigma, 0.08, 4]] and same.epsilon() > planned.epsilon()


# --- per-sample gradients and clipping on the tiny UNet (attention, GroupNorm, class embeddings)

def _net(num_classes=10, text=False):
    cfg = compose("train", ["experiment=smoke"] + (["model=unet_text_tiny"] if text else []))
    torch.manual_seed(0)
    unet = build_model(cfg.model, 1, 16, True, num_classes, 32 if text else None)
    return EDMPrecond(unet, 0.5, True, "official")


class FixedNoiseLoss:
    """The EDM denoising loss with each row's σ and noise fixed by the caller: a row's loss does not
    depend on which other rows share its batch (so singles and batches can be compared exactly)."""

    def __init__(self, sigma, noise):
        self.sigma, self.noise = sigma, noise

    def __call__(self, net, obs, mask, mask_tilde, cond):
        D = net(obs + self.noise * self.sigma.reshape(-1, 1, 1, 1), self.sigma, mask_tilde, cond)
        return ((D - obs) ** 2 * mask).mean((1, 2, 3)) * 100


def _batch(rows, k=1, text=False):
    g = torch.Generator().manual_seed(1)
    obs, mask = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1, (torch.rand(8, 1, 16, 16, generator=g) > 0.5).float()
    sigma, noise = torch.exp(torch.randn(8, k, generator=g)), torch.randn(8, k, 1, 16, 16, generator=g)
    labels = torch.randn(8, 5, 32, generator=g) if text else torch.arange(8) % 10  # caption embeddings or classes
    obs, mask = (obs * mask)[rows], mask[rows]
    rep = lambda t: t.repeat_interleave(k, 0)
    return (rep(obs), rep(mask), rep(mask), rep(labels[rows])), FixedNoiseLoss(sigma[rows].reshape(-1),
                                                                              noise[rows].reshape(-1, 1, 16, 16))


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_per_sample_gradients_of_every_unet_parameter_sum_to_the_batch_gradient(text):
    # Opacus' conv rule read channels-last activations (after diffusers' attention) as zeros: caught here.
    dp = DPSGD(_privacy(), n=8, batch_size=4, steps=1, seed=0)
    net = _net(0 if text else 10, text)
    gsm, _ = dp.make_private(net, torch.optim.SGD(net.parameters(), lr=1.0))
    inputs, loss = _batch(torch.arange(4), text=text)
    dp.backward(loss(gsm, *inputs), gsm.parameters())
    names = [n for n, p in gsm.named_parameters()]
    assert any("attentions" in n for n in names)
    assert any(("attn2.to_k" if text else "class_embedding") in n for n in names)  # cross-attention / classes
    scale = max(p.grad.abs().max().item() for p in gsm.parameters())  # biases before a GroupNorm get ~0
    for name, p in gsm.named_parameters():
        assert p.grad_sample.shape == (4, *p.shape), name
        assert p.grad.abs().max() < 1e-6 * scale or p.grad_sample.abs().max() > 0, name  # not silently zero
        assert torch.allclose(p.grad_sample.sum(0), p.grad, rtol=1e-3, atol=1e-5 * scale), name
    # and one row's per-sample gradient is that image's own gradient, alone in its batch
    net = _net(0 if text else 10, text)
    single, single_loss = _batch(torch.tensor([2]), text=text)
    single_loss(net, *single).sum().backward()
    for (name, p), q in zip(gsm.named_parameters(), net.parameters()):
        assert torch.allclose(p.grad_sample[2], q.grad, rtol=1e-3, atol=1e-5 * scale), name


def _contribution(rows, clip, k=1):
    """Σ of the clipped per-image gradients of `rows`, with DP noise off (the DPOptimizer's own clipping)."""
    dp = DPSGD(_privacy(max_grad_norm=clip, noise_multiplicity=k), n=8, batch_size=4, steps=1, seed=0)
    net = _net()
    gsm, opt = dp.make_private(net, torch.optim.SGD(net.parameters(), lr=1.0))
    inputs, loss = _batch(rows, k)
    dp.backward(loss(gsm, *inputs), gsm.parameters())
    raw = torch.stack([torch.cat([p.grad_sample[i].flatten() for p in gsm.parameters()])
                       for i in range(len(rows))]).norm(dim=1)
    opt.pre_step()  # clip, add noise (σ = 0 here), scale by the expected batch size
    summed = torch.cat([p.grad.flatten() for p in gsm.parameters()]) * dp.expected_batch
    return summed, raw


@pytest.mark.parametrize("k", [1, 2])
def test_no_image_contributes_more_than_the_clip_norm(k):
    clip = 1e-3
    singles = []
    for i in range(4):
        summed, raw = _contribution(torch.tensor([i]), clip, k)
        assert raw.item() > clip  # clipping is active
        assert summed.norm().item() == pytest.approx(clip, rel=1e-3)  # exactly C after clipping, never more
        singles.append(summed)
    batch, raw = _contribution(torch.arange(4), clip, k)
    assert (raw > clip).all()
    # the batch's update is the sum of the four clipped contributions: each is bounded by C on its own
    assert torch.allclose(batch, torch.stack(singles).sum(0), atol=1e-4 * clip)
    assert batch.norm().item() <= 4 * clip * (1 + 1e-4)


def test_an_empty_poisson_batch_is_a_noise_only_step():
    dp = DPSGD(_privacy(noise_multiplier=1.0), n=8, batch_size=4, steps=1, seed=0)
    net = _net()
    gsm, opt = dp.make_private(net, torch.optim.SGD(net.parameters(), lr=1.0))
    dp.backward(None, gsm.parameters())
    opt.pre_step()
    g = torch.cat([p.grad.flatten() for p in gsm.parameters()]) * dp.expected_batch
    assert g.std().item() == pytest.approx(1.0, rel=0.05)  # σ·C noise alone


# --- Poisson batches

def test_poisson_batches_vary_with_the_expected_rate_and_are_a_function_of_seed_and_step():
    n, q = 200, 0.08
    sizes = torch.tensor([len(poisson_rows(s, n, q, 0)) for s in range(400)]).float()
    assert len(sizes.unique()) > 5 and sizes.min() < 16 < sizes.max()
    assert abs(sizes.mean().item() - n * q) < 1.0  # 4σ of the mean of 400 binomial(200, 0.08) draws
    assert torch.equal(poisson_rows(37, n, q, 0), poisson_rows(37, n, q, 0))  # what a resume reads again
    assert not torch.equal(poisson_rows(37, n, q, 0), poisson_rows(37, n, q, 1))
    rows = poisson_rows(37, n, q, 0)
    assert len(rows.unique()) == len(rows) and rows.max() < n  # no row twice in one batch


@pytest.mark.slow
def test_dp_run_resumes_to_the_same_weights_and_records_epsilon(tmp_path, smoke_cfg, monkeypatch):
    from safetensors.torch import load_file

    import ambient.training as training
    from ambient.training import train

    args = ["privacy=dpsgd", "corruption=mask90", "model.conditional=true", "privacy.noise_multiplicity=2",
            "dataset.limit=40", "train.batch_size=4", "train.steps=6", "train.checkpoint_every=3", "sample.count=0"]
    straight = train(smoke_cfg(*args, f"run_dir={tmp_path / 'a'}"), tmp_path / "a")

    step = training._step

    def crash_after_3(*a, **kw):
        out = step(*a, **kw)
        if a[7].step == 3:  # state: after its checkpoint was written
            raise RuntimeError("killed")
        return out

    monkeypatch.setattr(training, "_step", crash_after_3)
    with pytest.raises(RuntimeError, match="killed"):
        train(smoke_cfg(*args, f"run_dir={tmp_path / 'b'}"), tmp_path / "b")
    monkeypatch.setattr(training, "_step", step)
    resumed = train(smoke_cfg(*args, f"run_dir={tmp_path / 'b'}", "resume=auto"), tmp_path / "b")

    weights = [load_file(tmp_path / r / "model/unet/diffusion_pytorch_model.safetensors") for r in "ab"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert resumed["privacy"] == straight["privacy"] and straight["privacy"]["steps"] == 6
    eps = straight["privacy"]["epsilon"]
    assert 9.9 <= eps <= 10.0
    settings = ModelDir(tmp_path / "a" / "model").read_settings()
    assert settings["privacy"]["epsilon"] == eps and settings["privacy"]["delta"] == 1e-5
    assert "ε = " in (tmp_path / "a" / "model" / "README.md").read_text()
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["privacy"]["epsilon"] == eps


# --- errors at the start

@pytest.mark.parametrize("override, key", [
    ("privacy.epsilon=0", "privacy.epsilon"),
    ("privacy.epsilon=-1", "privacy.epsilon"),
    ("privacy.delta=1", "privacy.delta"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
    ("privacy.max_grad_norm=-0.5", "privacy.max_grad_norm"),
    ("privacy.noise_multiplier=1.0", "privacy.epsilon"),  # both a target and a σ
    ("privacy.accountant=gdp", "privacy.accountant"),
    ("privacy.noise_multiplicity=0", "privacy.noise_multiplicity"),
    ("train.grad_accum=2", "train.grad_accum"),
    ("train.mixed_precision=fp16", "train.mixed_precision"),
])
def test_bad_privacy_settings_name_the_key(smoke_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(smoke_cfg("privacy=dpsgd", override))


def test_dp_refuses_several_processes_and_unsupported_layers():
    with pytest.raises(ConfigError, match="privacy=dpsgd runs in one process"):
        check_processes(_privacy(), 2)
    check_processes(_privacy(), 1)
    check_processes(OmegaConf.create({"kind": "none"}), 4)

    class WithBatchNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)

    dp = DPSGD(_privacy(), n=8, batch_size=4, steps=1, seed=0)
    net = WithBatchNorm()
    with pytest.raises(ConfigError, match="privacy=dpsgd: the model has layers.*BatchNorm"):
        dp.make_private(net, torch.optim.SGD(net.parameters(), lr=1.0))


def test_runs_saved_before_these_defenses_existed_still_resume(smoke_cfg):
    from ambient.config import ADDED_KEYS, config_differences

    now = OmegaConf.to_container(smoke_cfg(), resolve=True)
    saved = OmegaConf.to_container(smoke_cfg(), resolve=True)
    del saved["privacy"], saved["train"]["loss_drop"]
    for key in ("brightness", "contrast", "noise", "crop"):
        del saved["train"]["augment"][key]
    assert config_differences(saved, now) == []
    # the defaults recorded for old runs are the shipped defaults
    flat = {f"{k}.{kk}": vv for k, v in (("privacy", now["privacy"]), ("train.augment", now["train"]["augment"]),
                                         ("train.loss_drop", now["train"]["loss_drop"])) for kk, vv in v.items()}
    assert all(flat[k] == v for k, v in ADDED_KEYS.items())
    # turning one on is still a difference
    assert config_differences(saved, OmegaConf.to_container(smoke_cfg("privacy=dpsgd"), resolve=True))
