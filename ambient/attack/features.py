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
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

FeatureExtractor = Callable[[Tensor], Tensor]


def extract_features(images: Tensor, extractor: FeatureExtractor, batch_size: int = 256) -> Tensor:
    """Run any extractor in batches so a large image set does not exhaust memory."""
    with torch.no_grad():
        return torch.cat([extractor(chunk) for chunk in images.split(batch_size)], dim=0)


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
