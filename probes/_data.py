"""Training data: features and labels read once, from arrays, tensors or featstore groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featstore.errors import InvalidFeaturesError, InvalidParameterError

from ._inputs import RowFile, as_features

__all__ = ["TrainingData", "load_training_data", "DEFAULT_MAX_MEMORY_MB"]


# Features larger than this (every pass, as float32) stay on disk by default (RowFile)
DEFAULT_MAX_MEMORY_MB = 4096


@dataclass
class TrainingData:
    X: "np.ndarray | RowFile"  # (n, d) float32, clean pass (a RowFile when it is kept on disk)
    y: np.ndarray  # (n,) int64
    views: list[np.ndarray]  # augmented passes, each (n, d)
    n_classes: int
    source: str


def load_training_data(X, y=None, n_classes: int | None = None, where: str = "train",
                       max_memory_mb: int = DEFAULT_MAX_MEMORY_MB) -> TrainingData:
    """Features and labels from an array, a torch tensor or a featstore group.

    A group is verified by the read that loads it (each chunk and the labels checked as
    they stream), so it is read once; its augmented views are loaded too. A group (or zarr
    array) whose passes, as float32, exceed ``max_memory_mb`` stays on disk: each pass is
    written once to a scratch file in its stored dtype (:class:`RowFile`) and read by rows.
    """
    if isinstance(X, TrainingData):
        return X
    features = as_features(X, where=where)
    group = features.group
    passes = [features] + ([as_features(group, v, where) for v in range(1, group.n_views + 1)] if group else [])
    on_disk = (group is not None or hasattr(X, "oindex")) and \
        len(passes) * features.n_samples * features.n_neurons * 4 > (max_memory_mb << 20)
    stored = np.dtype(group.spec.dtype) if group is not None else np.dtype(getattr(X, "dtype", np.float32))
    if group is not None:
        if y is None:
            y = group.labels
        if n_classes is None:
            n_classes = len(group.classes)
    if on_disk:
        X, views = RowFile([features], stored), [RowFile([p], stored) for p in passes[1:]]
    else:
        views = [p.numpy() for p in passes[1:]]
        X = features.numpy()
    if y is None:
        raise InvalidParameterError(key=f"{where} labels y", value=None,
                                    expected="an integer array of shape (n_samples,) for array features")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise InvalidFeaturesError(where=features.where, problem=f"{len(y)} labels for {len(X)} samples")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidFeaturesError(where=features.where, problem=f"labels must be integers, got dtype {y.dtype}")
    if n_classes is None:
        n_classes = int(y.max()) + 1
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise InvalidFeaturesError(
            where=features.where, problem=f"label {int(y[bad][0])} is outside the class range 0..{n_classes - 1} "
                                          f"({int(bad.sum())} such labels)")
    return TrainingData(X, y.astype(np.int64), views, int(n_classes), group.path if group is not None else "array")


def _with_validation(data: TrainingData, validation) -> tuple[TrainingData, np.ndarray, np.ndarray]:
    """(train rows followed by the validation rows, train indices, validation indices). The
    augmented passes get the validation rows' clean features (validation reads the clean pass)."""
    X_val, y_val = validation if isinstance(validation, tuple) else (validation, None)
    val = load_training_data(X_val, y_val, data.n_classes, where="validation")
    if val.X.shape[1] != data.X.shape[1]:
        raise InvalidFeaturesError(where=f"validation ({val.source})",
                                   problem=f"{val.X.shape[1]} neurons, but the train features have {data.X.shape[1]}")
    n, n_val = len(data.X), len(val.X)

    def stack(a, b):
        if isinstance(a, RowFile) or isinstance(b, RowFile):
            return RowFile([a, b], a.dtype if isinstance(a, RowFile) else b.dtype)
        return np.vstack([a, b])

    joined = TrainingData(stack(data.X, val.X), np.concatenate([data.y, val.y]),
                          [stack(v, val.X) for v in data.views], data.n_classes, data.source)
    return joined, np.arange(n), np.arange(n, n + n_val)
