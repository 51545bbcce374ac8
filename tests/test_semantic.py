"""The semantic quality figure separates recognizable digits from blobs, with its real-image reference."""
import torch

from ambient.attack.semantic import semantic_quality
from ambient.data import load_digits
from ambient.images import to_unit


def _digits():
    data = load_digits(16)
    return to_unit(data.as_float()), data.labels


def test_real_digits_score_like_the_reference_and_blobs_do_not():
    images, labels = _digits()
    real, held = images[:1500], images[1500:]
    as_generations = semantic_quality(held, real, labels[:1500], 10, labels[1500:])
    assert as_generations["real_label_accuracy"] > 0.9  # the classifier itself works
    assert abs(as_generations["confident_fraction"] - as_generations["real_confident_fraction"]) < 0.15
    assert as_generations["label_accuracy"] > 0.9 and as_generations["class_balance"] > 0.95

    g = torch.Generator().manual_seed(0)
    blobs = (0.3 + 0.05 * torch.randn(300, 1, 16, 16, generator=g)).clamp(0, 1)
    grey = semantic_quality(blobs, real, labels[:1500], 10)
    assert grey["confident_fraction"] < 0.1 < grey["real_confident_fraction"]


def test_one_repeated_digit_has_no_class_balance():
    images, labels = _digits()
    same = images[:1].repeat(200, 1, 1, 1)
    figures = semantic_quality(same, images[100:], labels[100:], 10)
    assert figures["class_balance"] == 0.0 and figures["real_class_balance"] > 0.95


def test_too_few_real_images_give_no_figure():
    images, labels = _digits()
    assert semantic_quality(images[:10], images[:50], labels[:50], 10) is None
