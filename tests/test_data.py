import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ambient.data import (
    DataError,
    load_digits,
    load_imagefolder,
    load_torchvision,
    split_holdout,
)


def test_digits_are_labelled_prompted_and_in_range():
    data = load_digits(resolution=16)
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == torch.uint8
    x = data.as_float()
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() > 0.9
    assert data.indices.tolist() == list(range(1797))
    assert set(data.labels.tolist()) == set(range(10))
    assert data.prompts[0] == "a handwritten digit zero" and data.labels[0] == 0
    assert load_digits(resolution=32).images.shape[-1] == 32


def _write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_imagefolder_recursive_with_metadata_and_center_crop(tmp_path):
    rng = np.random.default_rng(0)
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the centre square is white, the sides black: a centre crop keeps only white
    _write(tmp_path / "a.png", wide)
    _write(tmp_path / "sub" / "b.jpg", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    _write(tmp_path / "sub" / "deeper" / "c.webp", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file_name": "a.png", "text": "a white square", "label": "x"},
        {"file_name": "sub/b.jpg", "text": "noise", "label": "y"},
        {"file_name": "sub/deeper/c.webp", "text": "more noise", "label": "x"}]))
    data = load_imagefolder(str(tmp_path), resolution=8)
    assert data.paths == ["a.png", "sub/b.jpg", "sub/deeper/c.webp"]
    assert data.images.shape == (3, 3, 8, 8)
    assert (data.images[0] == 255).all()
    assert data.prompts == ["a white square", "noise", "more noise"]
    assert data.labels.tolist() == [0, 1, 0] and data.class_names == ["x", "y"]
    assert load_imagefolder(str(tmp_path), resolution=8, channels=1).images.shape == (3, 1, 8, 8)


def test_imagefolder_bad_image_names_path_or_is_skipped(tmp_path):
    _write(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_imagefolder(str(tmp_path), resolution=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_imagefolder(str(tmp_path), resolution=8, skip_bad=True)
    assert len(data) == 1 and any("broken.png" in str(w.message) for w in caught)


def test_imagefolder_empty_or_missing_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_imagefolder(str(tmp_path), resolution=8)
    with pytest.raises(DataError, match="dataset.path"):
        load_imagefolder(str(tmp_path / "nope"), resolution=8)


def test_torchvision_without_data_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match="dataset.download=true"):
        load_torchvision("CIFAR10", str(tmp_path), 32)


def test_holdout_is_seeded_disjoint_and_sized():
    data = load_digits(8)
    members, held = split_holdout(data, 0.1, seed=3)
    assert len(held) == 180 and len(members) == 1797 - 180
    assert not set(members.indices.tolist()) & set(held.indices.tolist())
    again, _ = split_holdout(data, 0.1, seed=3)
    other, _ = split_holdout(data, 0.1, seed=4)
    assert torch.equal(members.indices, again.indices) and not torch.equal(members.indices, other.indices)
    members, held = split_holdout(data, 25, seed=0)
    assert len(held) == 25
    # rows keep their pixels and stable indices through the split
    assert torch.equal(held.images, data.images[held.indices])
