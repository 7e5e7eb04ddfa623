"""Test metrics of a probe, from its logits: a registry, one entry per metric.

Every entry computes one number per draw from the logits (n, draws, classes) and the true
classes (n,); ``SubsetProbes.evaluate`` records each in its column. Conventions follow
scikit-learn, against which they are tested: ``balanced_accuracy_score`` (the mean recall of
the classes present in the test split: the Pets and Flowers "mean per-class accuracy"),
``f1_score(average="macro")`` (over the classes present in the truth or the predictions),
``top_k_accuracy_score(k=5)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Metric", "METRICS"]


@dataclass(frozen=True)
class Metric:
    """One registered test metric.

    Attributes
    ----------
    name : str
    column : str
        The evaluation rows' column.
    compute : callable
        ``compute(logits (n, D, C), pred (n, D), y (n,), n_classes) -> (D,)`` array.
    description : str
    """

    name: str
    column: str
    compute: Callable
    description: str


def _accuracy(logits, pred, y, C):
    return (pred == y[:, None]).mean(0)


def _top5(logits, pred, y, C):
    true = np.take_along_axis(logits, y[:, None, None].repeat(logits.shape[1], 1), axis=2)  # (n, D, 1)
    return ((logits > true).sum(2) < 5).mean(0)  # the true class among the five largest logits


def _confusions(pred, y, C):
    """(D, C, C) counts: [draw, true class, predicted class]."""
    D = pred.shape[1]
    flat = (np.arange(D)[None, :] * C * C + y[:, None] * C + pred).ravel()
    return np.bincount(flat, minlength=D * C * C).reshape(D, C, C)


def _balanced(logits, pred, y, C):
    conf = _confusions(pred, y, C)
    support = conf.sum(2)  # (D, C) test samples per true class
    present = support[0] > 0
    return (np.diagonal(conf, axis1=1, axis2=2)[:, present] / support[:, present]).mean(1)


def _macro_f1(logits, pred, y, C):
    conf = _confusions(pred, y, C)
    tp = np.diagonal(conf, axis1=1, axis2=2).astype(np.float64)
    fp, fn = conf.sum(1) - tp, conf.sum(2) - tp
    seen = (tp + fp + fn) > 0  # in the truth or the predictions
    f1 = np.where(seen, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return f1.sum(1) / seen.sum(1)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", "test_accuracy", _accuracy, "the share of test images classified right"),
    Metric("top5_accuracy", "test_top5_accuracy", _top5, "the share whose true class is among the five largest logits"),
    Metric("balanced_accuracy", "test_balanced_accuracy", _balanced,
           "the mean over classes of each class's accuracy (the Pets and Flowers convention)"),
    Metric("macro_f1", "test_macro_f1", _macro_f1, "the mean over classes of each class's F1"),
)}
