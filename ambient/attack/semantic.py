"""Semantic quality without pretrained networks: do the generations look like the dataset's classes?

A logistic-regression classifier is trained on real images of the dataset that the model never
trained on (the labels a labelled dataset ships with), then labels the generations. Reported:
the fraction classified with confidence > 0.9 and the balance of the predicted classes, each next
to the same figure for held-out real images (the level a perfect generator reaches). Logistic
regression on pixels is used on purpose: it is confident on real digits and garments but not on
grey blobs or noise (a small MLP is confidently wrong on both), so the figure tracks recognizability.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ambient.attack.streaming import ImageSource, per_block

CONFIDENCE = 0.9
MIN_TRAIN = 100  # fewer real images than this give a classifier too weak to judge by
MAX_REAL = 8000  # a seeded sample of this many is plenty for pixel logistic regression (60k: ~1 min per report)


def _flat(images: Tensor) -> np.ndarray:
    return images.float().flatten(1).cpu().numpy()


def _balance(predicted: np.ndarray, num_classes: int) -> float:
    """Normalized entropy of the predicted-class histogram: 1 = every class equally often, 0 = one class."""
    counts = np.bincount(predicted, minlength=num_classes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(num_classes)) if num_classes > 1 else 1.0


def _figures(clf, images: Tensor | ImageSource, num_classes: int, labels: Tensor | None = None) -> dict:
    if isinstance(images, Tensor):
        proba = clf.predict_proba(_flat(images))
    else:  # a block at a time: only the class probabilities are kept
        proba = per_block(images, lambda x: torch.from_numpy(clf.predict_proba(_flat(x)))).numpy()
    predicted = clf.classes_[proba.argmax(1)]
    out = {"confident_fraction": float((proba.max(1) > CONFIDENCE).mean()),
           "class_balance": _balance(predicted, num_classes)}
    if labels is not None:
        out["label_accuracy"] = float((predicted == labels.cpu().numpy()).mean())
    return out


def semantic_quality(generations: Tensor | ImageSource, real: Tensor, real_labels: Tensor, num_classes: int,
                     generation_labels: Tensor | None = None, seed: int = 0) -> dict | None:
    """Classifier figures for generations (N, C, H, W) in [0, 1] against real labelled images of the
    same size. Three quarters of the real images (a seeded sample of at most MAX_REAL) train the classifier; the last quarter is the
    reference. generation_labels: the class each generation was prompted with (class-conditional
    models), for label_accuracy. None when there are too few real images."""
    from sklearn.linear_model import LogisticRegression

    if real_labels is None or len(real) < MIN_TRAIN:
        return None
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:MAX_REAL]
    cut = (3 * len(order)) // 4
    fit, reference = order[:cut], order[cut:]
    clf = LogisticRegression(max_iter=3000, C=0.5)
    clf.fit(_flat(real[fit]), real_labels[fit].cpu().numpy())
    gen = _figures(clf, generations, num_classes, generation_labels)
    ref = _figures(clf, real[reference], num_classes, real_labels[reference])
    result = {f"{k}": v for k, v in gen.items()}
    result.update({f"real_{k}": v for k, v in ref.items()})
    result.update(classifier_train_images=int(cut), reference_images=int(len(reference)), confidence=CONFIDENCE)
    return result
