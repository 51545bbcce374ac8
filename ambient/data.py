"""Training images: loading, subsetting, the member/holdout split.

Every dataset becomes an in-memory `ImageSet`: uint8 pixels, a stable integer index per image
(the attack maps generations back to these), and optional labels / prompts. The sets studied
for memorization are small (100 to 50k images), so holding them as uint8 is cheap and makes
every later step (corruption seeded by index, dedup, nearest neighbours) simple and exact.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ambient.config import DATASET_KINDS
from ambient.config import IMAGE_SUFFIXES as _SUFFIXES
from ambient.seeding import Stream, plain_generator, seeded_generator

IMAGE_SUFFIXES = set(_SUFFIXES)
MIN_SIDE, MAX_ASPECT = 8, 4.0  # smaller or more elongated images are loaded with a warning
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class DataError(ValueError):
    """A dataset that cannot be used as configured (the message names the key or file)."""


@dataclass
class ImageSet:
    """Images (N, C, H, W) uint8 with their stable indices and optional labels/prompts/paths."""

    images: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    paths: list[str] | None = None
    class_names: list[str] | None = field(default=None)
    # Planted copies (dataset.duplicate): the stable index each image was copied from, else None.
    source_index: torch.Tensor | None = None
    # Planted canaries (dataset.duplicate kind=canary): each row's canary id, −1 for a real image; None: none.
    canary: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def planted_copy(self) -> torch.Tensor:
        """Per row: a copy planted by dataset.duplicate (not the original it was copied from)."""
        if self.source_index is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.source_index != self.indices

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            return 0
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def select(self, rows) -> ImageSet:
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda xs: None if xs is None else [xs[i] for i in rows.tolist()]
        return ImageSet(
            images=self.images[rows],
            indices=self.indices[rows],
            labels=None if self.labels is None else self.labels[rows],
            prompts=pick(self.prompts),
            paths=pick(self.paths),
            class_names=self.class_names,
            source_index=None if self.source_index is None else self.source_index[rows],
            canary=None if self.canary is None else self.canary[rows],
        )

    def identities(self) -> dict[str, list]:
        """Stable index -> [relative path or None, hash of its pixels]: what each index meant when a
        run was trained, so a changed image folder is noticed instead of silently re-indexed."""
        import hashlib

        paths = self.paths or [None] * len(self)
        return {str(int(i)): [p, hashlib.blake2b(img.numpy().tobytes(), digest_size=8).hexdigest()]
                for i, p, img in zip(self.indices.tolist(), paths, self.images.contiguous())}

    def as_float(self) -> torch.Tensor:
        """Pixels in [-1, 1], the range the diffusion models train in."""
        return self.images.float() / 127.5 - 1.0


def resize_square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Center-crop to a square, then resize (antialiased) to `resolution`; uint8 in and out."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top:top + side, left:left + side]
    if side != resolution:
        x = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear",
                          antialias=side > resolution, align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


# scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline).
def load_digits(resolution: int = 16) -> ImageSet:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    pixels = torch.from_numpy(digits.images).float()[:, None] * (255.0 / 16.0)
    images = resize_square(pixels.round().to(torch.uint8), resolution)
    labels = torch.from_numpy(digits.target).long()
    return ImageSet(
        images=images,
        indices=torch.arange(len(labels)),
        labels=labels,
        prompts=[f"a handwritten digit {DIGIT_NAMES[y]}" for y in labels.tolist()],
        class_names=[str(i) for i in range(10)],
    )


def _read_metadata(root: Path) -> dict[str, dict]:
    """Hugging Face imagefolder convention: metadata.jsonl rows with a `file_name` key."""
    rows = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        for line_no, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[str((meta.parent / row["file_name"]).relative_to(root))] = row
            except (json.JSONDecodeError, KeyError) as err:
                raise DataError(f"{meta}:{line_no}: bad metadata row ({err})") from err
    return rows


def _open_image(path: Path, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        array = np.asarray(img, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


# Any folder of images, recursively; captions/labels from metadata.jsonl when present.
def load_imagefolder(path: str, resolution: int, channels: int = 3, skip_bad: bool = False,
                     caption_column: str = "text", label_column: str = "label",
                     skip_key: str | None = "dataset.skip_bad") -> ImageSet:
    """skip_key: the setting that skips unreadable files, named in the error (None: there is none)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.path={path!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"dataset.path={path!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    metadata = _read_metadata(root)
    images, kept, odd = [], [], []
    for file in files:
        try:
            pixels = _open_image(file, channels)
            images.append(resize_square(pixels[None], resolution)[0])
            kept.append(file)
        except Exception as err:  # PIL raises many types for a bad file
            if not skip_bad:
                fix = f"set {skip_key}=true to skip it" if skip_key else "remove or replace the file"
                raise DataError(f"cannot read image {file}: {err} ({fix})") from err
            warnings.warn(f"skipping unreadable image {file}: {err}")
            continue
        h, w = pixels.shape[-2:]
        if min(h, w) < MIN_SIDE or max(h, w) / min(h, w) > MAX_ASPECT:
            odd.append(f"{file.name} ({w}x{h})")
    if odd:  # center-crop + resize would silently turn these into something else
        warnings.warn(f"{len(odd)} image(s) under {path} are smaller than {MIN_SIDE} px or more elongated than "
                      f"{MAX_ASPECT:g}:1 and were upsampled / center-cropped to {resolution}x{resolution}, "
                      f"e.g. {', '.join(odd[:3])}")
    if not kept:
        raise DataError(f"dataset.path={path!r}: no readable images")
    rel = [str(f.relative_to(root)) for f in kept]
    rows = [metadata.get(r, {}) for r in rel]
    prompts = [row.get(caption_column) for row in rows]
    raw_labels = [row.get(label_column) for row in rows]
    labels = class_names = None
    if all(lab is not None for lab in raw_labels):
        class_names = sorted({str(lab) for lab in raw_labels})
        labels = torch.tensor([class_names.index(str(lab)) for lab in raw_labels])
    return ImageSet(
        images=torch.stack(images),
        indices=torch.arange(len(kept)),
        labels=labels,
        prompts=prompts if all(p is not None for p in prompts) else None,
        paths=rel,
        class_names=class_names,
    )


# torchvision datasets by class name (CIFAR10, MNIST, ...); downloads only if asked to.
def load_torchvision(name: str, root: str, resolution: int, channels: int = 3,
                     download: bool = False, train: bool = True) -> ImageSet:
    import torchvision

    if not hasattr(torchvision.datasets, name):
        raise DataError(f"dataset.name={name!r} is not a torchvision dataset")
    try:
        ds = getattr(torchvision.datasets, name)(root=root, train=train, download=download)
    except RuntimeError as err:
        raise DataError(f"dataset {name} not found under dataset.root={root!r} ({err}); "
                        "set dataset.download=true on a machine with network") from err
    data = torch.as_tensor(np.asarray(ds.data))
    data = data[:, None] if data.ndim == 3 else data.permute(0, 3, 1, 2)
    if data.shape[1] != channels:
        data = data.float().mean(1, keepdim=True).round().to(torch.uint8) if channels == 1 \
            else data.expand(-1, channels, -1, -1)
    labels = torch.as_tensor(np.asarray(ds.targets)).long()
    names = list(getattr(ds, "classes", [])) or None
    return ImageSet(images=resize_square(data, resolution), indices=torch.arange(len(labels)),
                    labels=labels, class_names=names,
                    prompts=[f"a photo of a {names[y]}" for y in labels.tolist()] if names else None)


# Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 28×28 grayscale images of 10 clothing classes,
# read from its original IDX .gz files. Debian's dataset-fashion-mnist package installs them under
# /usr/share/datasets/fashion-mnist (the default root when it exists); the checksums are of the
# decompressed files, so a re-compressed copy of the same data passes.
FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_FILES = {  # split -> (images, labels): (file, count, sha256 of the decompressed bytes)
    "train": (("train-images-idx3-ubyte.gz", 60000, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
              ("train-labels-idx1-ubyte.gz", 60000, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9")),
    "test": (("t10k-images-idx3-ubyte.gz", 10000, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
             ("t10k-labels-idx1-ubyte.gz", 10000, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34")),
}


def fashion_mnist_root(root) -> Path:
    """dataset.root, or Debian's folder when it is not set and exists, else torchvision's layout."""
    if root:
        return Path(str(root)).expanduser()
    if Path(FASHION_MNIST_DEBIAN_ROOT).is_dir():
        return Path(FASHION_MNIST_DEBIAN_ROOT)
    return Path("data") / "FashionMNIST" / "raw"


def _read_idx(path: Path, magic: int, verify_sha256: str | None, root: Path) -> np.ndarray:
    """An IDX file (gzipped or not) read straight into one writable uint8 array (no second copy)."""
    import gzip
    import hashlib

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            header = int(np.frombuffer(head, ">i4")[0]) if len(head) == 4 else -1
            if header != magic:
                raise DataError(f"dataset.root={str(root)!r}: {path.name} is not an IDX file (magic {header}, "
                                f"expected {magic})")
            dims_bytes = f.read(4 * (magic & 0xFF))
            dims = np.frombuffer(dims_bytes, ">i4").astype(int)
            body = np.empty(int(np.prod(dims)), np.uint8)
            filled = f.readinto(memoryview(body))
            extra = f.read(1)
    except (OSError, EOFError) as err:
        raise DataError(f"dataset.root={str(root)!r}: cannot read {path.name} ({err}); reinstall Fashion-MNIST "
                        "(apt-get install dataset-fashion-mnist, or dataset.download=true with network)") from err
    if filled != body.size or extra:
        raise DataError(f"dataset.root={str(root)!r}: {path.name} is truncated or has trailing bytes "
                        f"({filled} bytes for shape {tuple(dims)})")
    if verify_sha256 is not None:
        digest = hashlib.sha256(head + dims_bytes)
        digest.update(memoryview(body))
        if digest.hexdigest() != verify_sha256:
            raise DataError(f"dataset.root={str(root)!r}: {path.name} is corrupt (sha256 differs from the published "
                            "Fashion-MNIST file); reinstall it, or set dataset.verify=false for a modified copy")
    return body.reshape(dims)


def load_fashion_mnist(root, split: str = "train", resolution: int = 28, channels: int = 1,
                       download: bool = False, verify: bool = True) -> ImageSet:
    """Fashion-MNIST's `split` (train | test) as uint8 images: 28 px native, 32 px zero-padded (its
    background is 0), other sizes resized. Labels, class names and prompts "a photo of a sneaker"."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"dataset.split={split!r} is invalid; allowed: train | test")
    folder = fashion_mnist_root(root)
    (image_file, count, image_sha), (label_file, _, label_sha) = FASHION_MNIST_FILES[split]
    if not (folder / image_file).is_file() or not (folder / label_file).is_file():
        if download:
            import torchvision

            torchvision.datasets.FashionMNIST(root=str(folder.parent.parent), train=split == "train", download=True)
        else:
            raise DataError(f"Fashion-MNIST not found under dataset.root={str(folder)!r} (needs {image_file} and "
                            f"{label_file}): apt-get install dataset-fashion-mnist (Debian, offline), or "
                            "dataset.download=true on a machine with network")
    images = _read_idx(folder / image_file, 2051, image_sha if verify else None, folder)
    labels = _read_idx(folder / label_file, 2049, label_sha if verify else None, folder)
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max(initial=0) > 9:
        raise DataError(f"dataset.root={str(folder)!r}: {image_file} / {label_file} do not hold matching 28×28 "
                        f"images and labels 0-9 ({images.shape}, {labels.shape})")
    if verify and len(images) != count:
        raise DataError(f"dataset.root={str(folder)!r}: {image_file} holds {len(images)} images, expected {count}")
    x = torch.from_numpy(images)[:, None]
    if resolution == 32:
        x = F.pad(x, (2, 2, 2, 2))
    elif resolution != 28:
        x = resize_square(x, resolution)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    names = list(FASHION_MNIST_CLASSES)
    return ImageSet(images=x, indices=torch.arange(len(y)), labels=y, class_names=names,
                    prompts=[_photo_of(names[c]) for c in y.tolist()])


def _photo_of(name: str) -> str:
    name = name.lower()
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


# Hugging Face `datasets` by hub id or local path (needs the optional `datasets` package).
def load_hf(name: str, split: str, resolution: int, channels: int = 3, image_column: str = "image",
            label_column: str | None = "label", caption_column: str | None = None) -> ImageSet:
    try:
        import datasets
    except ImportError as err:
        raise DataError("dataset=hf needs the `datasets` package: pip install 'ambient[hf]'") from err
    ds = datasets.load_dataset(name, split=split)
    mode = "L" if channels == 1 else "RGB"
    images = [resize_square(torch.from_numpy(np.asarray(r[image_column].convert(mode))).reshape(
        r[image_column].size[1], r[image_column].size[0], channels).permute(2, 0, 1)[None], resolution)[0]
        for r in ds]
    labels = torch.tensor(ds[label_column]) if label_column and label_column in ds.column_names else None
    prompts = list(ds[caption_column]) if caption_column and caption_column in ds.column_names else None
    return ImageSet(images=torch.stack(images), indices=torch.arange(len(images)), labels=labels, prompts=prompts)


def load_dataset(cfg) -> ImageSet:
    """Build the full (pre-split) image set from a `dataset` config node."""
    kind = cfg.kind
    if kind == "digits":
        data = load_digits(cfg.resolution)
    elif kind == "imagefolder":
        data = load_imagefolder(cfg.path, cfg.resolution, cfg.channels, cfg.get("skip_bad", False))
    elif kind == "fashion_mnist":
        data = load_fashion_mnist(cfg.get("root"), cfg.get("split", "train"), cfg.resolution, cfg.channels,
                                  cfg.get("download", False), cfg.get("verify", True))
    elif kind == "torchvision":
        data = load_torchvision(cfg.name, cfg.root, cfg.resolution, cfg.channels, cfg.get("download", False))
    elif kind == "hf":
        data = load_hf(cfg.name, cfg.get("split", "train"), cfg.resolution, cfg.channels,
                       cfg.get("image_column", "image"), cfg.get("label_column", "label"), cfg.get("caption_column"))
    else:
        raise DataError(f"dataset.kind={kind!r}; allowed: {' | '.join(DATASET_KINDS)}")
    if cfg.get("limit"):
        data = data.select(torch.arange(min(int(cfg.limit), len(data))))
    if cfg.get("duplicate"):  # here, so whoever rebuilds a run's data from its settings gets the copies too
        canary = cfg.duplicate.get("kind", "copy") == "canary"
        data = plant_canaries(data, cfg.duplicate) if canary else plant_duplicates(data, cfg.duplicate)
    return data


def plant_canaries(data: ImageSet, cfg) -> ImageSet:
    """`count` seeded out-of-distribution canaries for each m of `times`, each planted m times (ambient/canaries.py),
    after every real image: new stable indices above the real ones (never overlapping), copies remembering
    their canary's first index (source_index) and every row its canary id (canary; −1: a real image)."""
    from ambient.canaries import canary_caption, canary_label, canary_patterns, canary_plan

    plan = canary_plan(cfg)
    patterns = canary_patterns([c for c, _ in plan], int(cfg.get("seed") or 0), data.channels, data.resolution)
    which = torch.tensor([p for p, (_, m) in enumerate(plan) for _ in range(m)])
    ids = torch.tensor([c for c, _ in plan])[which]
    fresh = int(data.indices.max()) + 1 + torch.arange(len(which))
    first = {}
    for index, c in zip(fresh.tolist(), ids.tolist()):
        first.setdefault(c, index)
    sources = data.source_index if data.source_index is not None else data.indices
    real_canary = data.canary if data.canary is not None else torch.full((len(data),), -1)
    labels = None if data.labels is None else torch.cat(
        [data.labels, torch.tensor([canary_label(c, data.num_classes) for c in ids.tolist()], dtype=data.labels.dtype)])
    return ImageSet(
        images=torch.cat([data.images, patterns[which]]), indices=torch.cat([data.indices, fresh]), labels=labels,
        prompts=None if data.prompts is None else data.prompts + [canary_caption(c) for c in ids.tolist()],
        paths=None if data.paths is None else data.paths + [f"canary/{c:04d}/{i}.png" for i, c in
                                                               zip(fresh.tolist(), ids.tolist())],
        class_names=data.class_names, source_index=torch.cat([sources, torch.tensor([first[c] for c in ids.tolist()])]),
        canary=torch.cat([real_canary, ids]))


def plant_duplicates(data: ImageSet, cfg) -> ImageSet:
    """K seeded images made to appear `times` times (Carlini et al.'s duplicated-image setting)."""
    if not cfg:
        return data
    count, times, seed = int(cfg["count"]), int(cfg["times"]), int(cfg.get("seed") or 0)
    if not 1 <= count <= len(data):
        raise DataError(f"dataset.duplicate.count={count} is invalid; allowed: 1 .. {len(data)} (the dataset size)")
    # Not plain_generator(seed): the holdout split draws randperm(n, plain_generator(seed)) over the same
    # n real images, so with dataset.duplicate.seed == seed every picked image was held out (none copied
    # among the members). Its own stream makes the picks independent of the split.
    chosen = torch.randperm(len(data), generator=seeded_generator(seed, Stream.DUPLICATE))[:count].sort().values
    rows = torch.cat([torch.arange(len(data)), chosen.repeat(times - 1)])
    planted = data.select(rows)
    sources = data.source_index if data.source_index is not None else data.indices
    # Copies get new stable indices after every existing one, and remember their original.
    fresh = int(data.indices.max()) + 1 + torch.arange(len(rows) - len(data))
    planted.indices = torch.cat([data.indices, fresh])
    planted.source_index = sources[rows]
    return planted


def dataset_change(recorded: dict[str, list] | None, current: dict[str, list], run_dir, fix: str) -> str | None:
    """The refusal for a run whose recorded images (images.json; None for older runs) are not the
    current ones, naming what changed; None when they are the same."""
    changes = [] if recorded is None else identity_changes(recorded, current)
    if not changes:
        return None
    return f"the dataset of run_dir={run_dir} changed since it was trained: {'; '.join(changes)}; {fix}"


def identity_changes(recorded: dict[str, list], current: dict[str, list], limit: int = 5) -> list[str]:
    """What differs between two `ImageSet.identities()`: removed, added and changed images (a few
    of each, with counts), by file path where images have one, else by index; [] when the dataset
    is the one recorded (same images under the same indices)."""
    by_path = all(v[0] is not None for v in [*recorded.values(), *current.values()])
    if by_path:
        old, new = ({path: digest for path, digest in ids.values()} for ids in (recorded, current))
    else:
        old, new = ({k: digest for k, (_, digest) in ids.items()} for ids in (recorded, current))
    removed = [k for k in old if k not in new]
    added = [k for k in new if k not in old]
    changed = [k for k in old if k in new and old[k] != new[k]]
    out = []
    for label, keys in (("removed", removed), ("added", added), ("changed", changed)):
        if keys:
            shown = ", ".join(str(k) if by_path else f"index {k}" for k in keys[:limit])
            out.append(f"{len(keys)} {label} ({shown}{', ...' if len(keys) > limit else ''})")
    if not out and recorded != current:
        out.append("the same images under other indices")
    return out


def split_holdout(data: ImageSet, holdout, seed: int) -> tuple[ImageSet, ImageSet]:
    """Seeded member / non-member split; `holdout` is a fraction in [0, 1) or a count of the real images.
    Planted canaries are always members; planted copies (dataset.duplicate) go where their original goes,
    so no held-out image is a copy of a member (it would be "extracted" by the null reference and score as
    a member in every membership attack). The real images split exactly as they would without either."""
    canary = data.canary if data.canary is not None else torch.full((len(data),), -1)
    copy = data.planted_copy
    real = ((canary < 0) & ~copy).nonzero().flatten()
    n = len(real)
    count = int(round(holdout * n)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    if not 0 <= count < n:
        raise DataError(f"dataset.holdout={holdout} leaves no training images (dataset has {n})")
    order = torch.randperm(n, generator=plain_generator(seed))
    held, kept = real[order[:count].sort().values], real[order[count:].sort().values]
    copies = ((canary < 0) & copy).nonzero().flatten()
    if len(copies):
        held_copy = torch.isin(data.source_index[copies], data.indices[held])
        held = torch.cat([held, copies[held_copy]]).sort().values
        kept = torch.cat([kept, copies[~held_copy]])
    kept = torch.cat([kept, (canary >= 0).nonzero().flatten()]).sort().values
    return data.select(kept), data.select(held)
