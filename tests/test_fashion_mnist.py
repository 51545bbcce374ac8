"""Fashion-MNIST from its IDX files: a tiny copy the test writes, and the real files when installed."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ambient.data import FASHION_MNIST_DEBIAN_ROOT, DataError, load_dataset, split_holdout
from ambient.training import train
from tests.helpers import compose

REAL = Path(FASHION_MNIST_DEBIAN_ROOT)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], ">i4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """40 train / 20 test images with the real file names; image i is filled with its label·20."""
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = np.repeat(labels[:, None, None] * 20, 28, 1).repeat(28, 2) + np.arange(n)[:, None, None] % 7
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return root


def _load(root, **extra):
    return load_dataset(OmegaConf.create({"kind": "fashion_mnist", "root": str(root), "resolution": 28,
                                          "channels": 1, "verify": False, **extra}))


def test_the_loader_reads_idx_files(tiny_root):
    data = _load(tiny_root)
    assert data.images.shape == (40, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert int(data.images[3, 0, 5, 5]) == 3 * 20 + 3
    assert data.class_names[9] == "Ankle boot" and data.prompts[9] == "a photo of an ankle boot"
    assert _load(tiny_root, split="test").images.shape[0] == 20
    padded = _load(tiny_root, resolution=32)
    assert padded.images.shape[-1] == 32 and padded.images[:, :, :2].eq(0).all()
    assert torch.equal(padded.images[:, :, 2:30, 2:30], data.images)
    a, b = split_holdout(data, 10, seed=3), split_holdout(data, 10, seed=3)
    assert torch.equal(a[1].indices, b[1].indices) and len(a[0]) == 30


def test_missing_or_corrupt_files_name_the_root(tiny_root, tmp_path):
    with pytest.raises(DataError, match="dataset.root=.*apt-get install dataset-fashion-mnist"):
        _load(tmp_path / "nowhere")
    with pytest.raises(DataError, match="corrupt.*sha256"):
        _load(tiny_root, verify=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_root.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    raw = gzip.decompress((broken / "train-images-idx3-ubyte.gz").read_bytes())
    (broken / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated"):
        _load(broken)


@pytest.mark.skipif(not REAL.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_the_real_files_verify_and_load():
    train_set = load_dataset(OmegaConf.create({"kind": "fashion_mnist", "resolution": 28, "channels": 1}))
    test_set = load_dataset(OmegaConf.create({"kind": "fashion_mnist", "resolution": 28, "channels": 1,
                                              "split": "test"}))
    assert len(train_set) == 60000 and len(test_set) == 10000
    assert train_set.labels[:5].tolist() == [9, 0, 0, 3, 0]  # the published first labels
    assert torch.bincount(train_set.labels).tolist() == [6000] * 10


def test_the_study_experiment_runs_end_to_end_in_20_steps(tiny_root, tmp_path):
    from ambient.evaluation import evaluate_run

    root = REAL if REAL.is_dir() else tiny_root
    summary = train(compose("train", ["experiment=fmnist_memorization", f"dataset.root={root}", "dataset.verify=false",
                                      "dataset.limit=40", "dataset.holdout=10", "train.steps=20", "train.batch_size=8",
                                      "train.checkpoint_every=0", "sample.count=0"]), tmp_path)
    assert summary["steps"] == 20
    cfg = compose("evaluate", [f"run_dir={tmp_path}", f"out_dir={tmp_path / 'eval'}", "attack.samples_per_prompt=3",
                               "attack.num_steps=3", "mia.draws=1", "attack.prompts=[0,1]"])
    report = __import__("json").loads(evaluate_run(tmp_path, cfg, tmp_path / "eval").read_text())
    assert report["counts"]["train_images"] == 30 and report["null"] is not None and "verdict" in report


@pytest.mark.parametrize("profile", ["fmnist_memorization_cpu", "fmnist_memorization", "fmnist_memorization_gpu"])
def test_study_profiles_hold_out_enough_real_images_for_their_null(profile):
    # The null reference takes as many held-out real images per class as there are generations per class
    # prompt; a profile that holds out fewer undercounts the null (and overstates memorization).
    cfg = compose("train", [f"experiment={profile}"])
    per_prompt = [int(o.split("=")[1]) for o in cfg.evaluate.overrides if o.startswith("attack.samples_per_prompt=")]
    assert cfg.evaluate.after_train and per_prompt
    assert cfg.dataset.holdout / 10 >= per_prompt[0]  # 10 classes, held out at random: per class on average
    assert cfg.dataset.limit - cfg.dataset.holdout > 0 and cfg.model.conditional is True
