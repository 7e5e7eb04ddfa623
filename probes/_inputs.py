"""One converter for features-like inputs: numpy arrays, torch tensors, zarr arrays and
featstore groups become :class:`Features`, which the probe engine and CKA both read.

A featstore group is verified by the read that uses it (each chunk checked for presence,
decoding and NaN/Inf as it streams; the labels first), so it is read once, never once to
verify and again to use. Arrays are checked for shape and NaN/Inf the same way.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from featstore.errors import InvalidFeaturesError

__all__ = ["Features", "as_features", "RowFile"]

DEFAULT_BLOCK_BYTES = 16 << 20  # float64 rows per streamed block: ~16 MB, whatever the width


def _is_group(X) -> bool:
    return hasattr(X, "read_verified") and hasattr(X, "spec")


class Features:
    """Rows of one layer's features, whatever held them.

    Attributes
    ----------
    n_samples, n_neurons : int
    where : str
        Whose features, for messages (``"train (store/group)"``, ``"X (array)"``).
    group : featstore.Group or None
    """

    def __init__(self, X, view: int = 0, where: str = "X"):
        self.group = X if _is_group(X) else None
        self.view = view
        if self.group is not None:
            self.n_samples, self.n_neurons = self.group.n_samples, self.group.n_neurons
            self.where = f"{where} ({self.group.path}" + (f", view {view})" if view else ")")
            self._array = None
        else:
            if hasattr(X, "detach"):  # torch tensor
                X = X.detach().cpu().numpy()
            shape = tuple(getattr(X, "shape", np.shape(X)))
            self.where = f"{where} (array)"
            if len(shape) != 2:
                raise InvalidFeaturesError(where=self.where,
                                           problem=f"features must be 2-D (n_samples, n_neurons); got shape {shape}")
            self._array = X
            self.n_samples, self.n_neurons = int(shape[0]), int(shape[1])
        if self.n_samples == 0:
            raise InvalidFeaturesError(where=self.where, problem="0 samples (empty split)")
        if self.n_neurons == 0:
            raise InvalidFeaturesError(where=self.where, problem="0 neurons")

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_samples, self.n_neurons

    def blocks(self, block_rows: int | None = None, dtype=np.float64) -> Iterator[np.ndarray]:
        """Yield checked row blocks of ``dtype``, ~16 MB of float64 each by default (a group's
        blocks are whole chunks). The value of ``block_rows`` never changes a result."""
        if not block_rows:
            block_rows = max(1, DEFAULT_BLOCK_BYTES // (8 * self.n_neurons))
        if self.group is not None:
            yield from self.group.read_verified(self.view, dtype=dtype, block_rows=block_rows)
            return
        for start in range(0, self.n_samples, block_rows):
            block = np.asarray(self._array[start:start + block_rows], dtype=dtype)
            self._check_finite(block, start)
            yield block

    def columns(self, columns, dtype=np.float32) -> np.ndarray:
        """Every row of the given columns (an index array, in its order), of ``dtype``, checked.
        A group reads only the chunks holding them, each once (``Group.read_columns``)."""
        cols = np.asarray(columns, dtype=np.int64)
        if self.group is not None:
            return self.group.read_columns(cols, self.view, dtype=dtype)
        if hasattr(self._array, "oindex"):  # zarr: orthogonal selection reads each chunk once
            block = np.asarray(self._array.oindex[:, cols], dtype=dtype)
        else:
            block = np.asarray(self._array[:, cols], dtype=dtype)
        finite = np.isfinite(block)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            raise InvalidFeaturesError(where=self.where, problem=f"features hold NaN/Inf (first at row {int(r)}, "
                                                                 f"neuron {int(cols[c])})")
        return block

    def numpy(self, dtype=np.float32) -> np.ndarray:
        """The whole matrix, C-contiguous, of ``dtype``, checked; read once."""
        if self.group is None:
            X = np.ascontiguousarray(np.asarray(self._array, dtype=dtype))
            self._check_finite(X, 0)
            return X
        out = np.empty((self.n_samples, self.n_neurons), dtype=dtype)
        at = 0
        for block in self.group.read_verified(self.view, dtype=dtype):
            out[at:at + len(block)] = block
            at += len(block)
        return out

    def _check_finite(self, block: np.ndarray, start: int) -> None:
        finite = np.isfinite(block)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            raise InvalidFeaturesError(where=self.where,
                                       problem=f"features hold NaN/Inf (first at row {start + int(r)}, neuron {int(c)})")


class RowFile:
    """One pass's rows kept on disk: written once, in the stored dtype, to an anonymous scratch
    file (row-major), then read by row index. The probe engine trains from it when the
    features do not fit its memory setting: each minibatch reads its own rows (the page cache
    serves repeated reads), so memory holds minibatches, not the n x d matrix. Rows come back
    as float32, exactly the values ``Features.numpy()`` gives.

    Quacks like the parts of a CPU tensor the engine uses: ``shape``, ``device``,
    ``is_cuda``, ``index_select(0, rows)``, ``rows(start, stop)``.
    """

    def __init__(self, parts: list, dtype=np.float32):
        """``parts``: Features (or RowFiles, or arrays) whose rows are stacked, in order."""
        import tempfile

        self.dtype = np.dtype(dtype)
        self.n = sum(p.shape[0] for p in parts)
        self.d = parts[0].shape[1]
        self.row_bytes = self.d * self.dtype.itemsize
        folder = tempfile.gettempdir()
        try:
            self._file = tempfile.TemporaryFile(prefix="featstore-rows-")
            for part in parts:
                blocks = part.blocks(dtype=self.dtype) if hasattr(part, "blocks") else [np.asarray(part)]
                for block in blocks:
                    self._file.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
            self._file.flush()
        except OSError as e:  # the scratch disk is full or not writable: say which and how to move it
            from featstore.errors import WriteFailedError

            raise WriteFailedError(path=f"the probes' scratch file in {folder}",
                                   reason=f"{e.strerror or e} ({self.n * self.row_bytes / 2**30:.1f} GiB needed)",
                                   consequence="no probe was trained; point TMPDIR at a disk with room, or raise "
                                               "max_memory_mb to keep the features in memory") from None
        self.where = getattr(parts[0], "where", "X")
        self.n_samples, self.n_neurons = self.n, self.d

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.d

    def __len__(self) -> int:
        return self.n

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    is_cuda = False

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as float32."""
        import os

        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d), dtype=self.dtype)
        fd = self._file.fileno()
        for i in np.argsort(rows, kind="stable"):  # ascending offsets: sequential where rows are
            os.preadv(fd, [memoryview(out[i]).cast("B")], int(rows[i]) * self.row_bytes)
        return out.astype(np.float32, copy=False)

    def index_select(self, dim: int, index):
        import torch

        if dim != 0:  # pragma: no cover - the engine selects rows only
            raise ValueError("RowFile selects rows")
        return torch.from_numpy(self.read(index.cpu().numpy()))

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.read(np.arange(start, min(stop, self.n)))

    def blocks(self, block_rows: int | None = None, dtype=np.float32):
        block_rows = block_rows or max(1, DEFAULT_BLOCK_BYTES // (8 * self.d))
        for s in range(0, self.n, block_rows):
            yield self.rows(s, s + block_rows).astype(dtype, copy=False)


def as_features(X, view: int = 0, where: str = "X") -> Features:
    """``X`` as :class:`Features` (returned unchanged when it already is)."""
    return X if isinstance(X, Features) else Features(X, view, where)
