"""A group's chunks as featstore reads them: nothing read is other than what its build wrote.

zarr serves a chunk whose file is missing as its fill value (zeros). featstore never does:
every read of features (``Group.numpy``, ``dask``, ``iter_blocks``, ``read_columns``,
``features[...]``, the probes, CKA) goes through :class:`PassReader`, which for each chunk

1. checks its file exists (a local path, or one listing per array of a URL store),
2. decodes it (a damaged file is named, not raised from deep inside a codec),
3. checks its values are finite,
4. compares its checksum with the one its build recorded: ``checksums`` holds the CRC-32 of
   each chunk's decoded bytes per (pass, row chunk, column chunk), so a flipped bit, a chunk
   swapped within the group or one copied in from another group is caught (CRC-32 runs at
   ~1.8 GB/s, far faster than the decoding it follows; these are accidents to catch, not an
   adversary, for which a cryptographic hash would be needed).

Groups built before checksums were recorded are read with checks 1-3. A group removed while
a handle to it is open (``featstore rm``) is named as removed, never read as zeros.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .errors import CorruptGroupError, GroupNotFoundError

__all__ = ["PassReader", "CheckedArray", "chunk_digests", "DIGEST_BYTES", "CHECKSUMS"]

DIGEST_BYTES = 4  # CRC-32, little-endian
CHECKSUMS = "checksums"  # the array of digests, (1 + views, row chunks, column chunks, DIGEST_BYTES) uint8


def _is_url(path: str) -> bool:
    return "://" in str(path)


def chunk_digests(block: np.ndarray, column_chunk: int) -> np.ndarray:
    """(column chunks, DIGEST_BYTES) uint8: the CRC-32 of each column chunk of a row chunk's
    values (C order, as stored)."""
    n_cols = block.shape[-1]
    out = np.empty((-(-n_cols // column_chunk), DIGEST_BYTES), dtype=np.uint8)
    for j in range(out.shape[0]):
        part = np.ascontiguousarray(block[:, j * column_chunk:(j + 1) * column_chunk])
        out[j] = np.frombuffer(zlib.crc32(memoryview(part).cast("B")).to_bytes(4, "little"), dtype=np.uint8)
    return out


# exponent bits of IEEE floats: all ones is inf or NaN
_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def all_finite(block: np.ndarray) -> bool:
    """No NaN or inf in ``block``: its exponent bits checked as integers (3-4x numpy's float16
    isfinite)."""
    if block.dtype in _EXPONENT and block.flags.c_contiguous:
        kind, mask = _EXPONENT[block.dtype]
        return not np.any((block.view(kind) & mask) == mask)
    return bool(np.isfinite(block).all())


class _Listing:
    """Which chunk files of one array exist: a local path is asked directly; a URL store is
    listed once (one request per thousand files) when first asked."""

    def __init__(self, group, array: str):
        self.local = not _is_url(group.store.path)
        self.base = f"{group.store.path}/{group.name}/{array}"
        self._keys: set[str] | None = None
        self._group = group

    def exists(self, key: str) -> bool:
        if self.local:
            return (Path(self.base) / key).exists()
        if self._keys is None:
            from .remote import remote_fs

            fs, root = remote_fs(self.base, self._group.store.storage_options)
            fs.invalidate_cache(root)  # a listing cached by this process (a push) may predate a deletion
            self._keys = {p[len(root) + 1:] for p in fs.find(f"{root}/c")}
        return key in self._keys


class PassReader:
    """Checked reads of one pass (0: the clean features, 1..K: augmented views) of a group.

    Parameters
    ----------
    group : featstore.Group
    view : int
    """

    def __init__(self, group, view: int = 0):
        self.group = group
        self.view = view
        z = group._z
        if view == 0:
            self.label, self.array, self.v = "features", z["features"], None
        else:
            self.label, self.array, self.v = f"views[{view - 1}]", z["views"], view - 1
        self.rows = int(self.array.chunks[-2])
        self.cols = int(self.array.chunks[-1])
        self.n_rows, self.n_cols = int(self.array.shape[-2]), int(self.array.shape[-1])
        self.n_row_chunks = -(-self.n_rows // self.rows)
        self.n_col_chunks = -(-self.n_cols // self.cols)
        self.dtype = self.array.dtype
        self._listing = _Listing(group, "features" if view == 0 else "views")
        self._digests = group._checksums()  # None: a group built before checksums were recorded

    # ------------------------------------------------------------------ problems
    def _key(self, c: int, j: int) -> str:
        return f"c/{self.v}/{c}/{j}" if self.v is not None else f"c/{c}/{j}"

    def _where(self, c: int, j: int | None = None) -> str:
        cols = "" if j is None or self.n_col_chunks == 1 else \
            f", columns {j * self.cols}..{min((j + 1) * self.cols, self.n_cols)}"
        return f"{self.label}: chunk {c} (rows {c * self.rows}..{min((c + 1) * self.rows, self.n_rows)}{cols})"

    def _removed(self) -> bool:
        """Whether the group left the store (``featstore rm``) after this handle was opened."""
        store = self.group.store
        if _is_url(store.path):
            return False
        return not (Path(store.path) / self.group.name / "zarr.json").exists()

    def _fail(self, problem: str):
        if self._removed():
            raise GroupNotFoundError(name=self.group.name, store=self.group.store.path, known=[],
                                     hint="it was removed after it was opened; nothing of it was read")
        raise CorruptGroupError(path=self.group.path, name=self.group.name, problems=[problem])

    # ------------------------------------------------------------------ reads
    def problem(self, c: int, columns=None) -> str | None:
        """What is wrong with row chunk c (its column chunks ``columns``, default all), or None."""
        try:
            self.chunk(c, columns)
        except CorruptGroupError as e:
            return e.fields["problems"][0]
        return None

    def chunk(self, c: int, columns=None) -> np.ndarray:
        """Row chunk c's values, shape (rows, the columns of column chunks ``columns``), every
        column chunk checked (present, decodable, finite, its recorded checksum)."""
        return self.rows_of(c * self.rows, min((c + 1) * self.rows, self.n_rows), columns)

    def rows_of(self, start: int, stop: int, columns=None) -> np.ndarray:
        """Rows start..stop (every column, or those of column chunks ``columns``), every chunk
        they touch checked. One zarr read for the whole range (zarr decodes its chunks
        concurrently), then each chunk's values checked in place."""
        columns = list(range(self.n_col_chunks)) if columns is None else [int(j) for j in columns]
        widths = [min(self.cols, self.n_cols - j * self.cols) for j in columns]
        if stop <= start:
            return np.empty((0, sum(widths)), dtype=self.dtype)
        first, last = start // self.rows, (stop - 1) // self.rows
        for c in range(first, last + 1):
            for j in columns:
                if not self._listing.exists(self._key(c, j)):
                    self._fail(f"{self._where(c, j)} is missing: {self._listing.base}/{self._key(c, j)}")
        r0, r1 = first * self.rows, min((last + 1) * self.rows, self.n_rows)
        parts = []
        for j0, j1 in _runs(columns):
            c0, c1 = j0 * self.cols, min(j1 * self.cols, self.n_cols)
            try:
                parts.append(self.array[self.v, r0:r1, c0:c1] if self.v is not None else self.array[r0:r1, c0:c1])
            except Exception:  # a damaged file somewhere in the range: read chunk by chunk to name it
                for c in range(first, last + 1):
                    self._decode(c, j0, j1)
                raise
        block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        for c in range(first, last + 1):
            self._check(c, columns, widths, block[c * self.rows - r0: min((c + 1) * self.rows, self.n_rows) - r0])
        return block[start - r0: stop - r0]

    def _decode(self, c: int, j0: int, j1: int) -> None:
        r0, r1 = c * self.rows, min((c + 1) * self.rows, self.n_rows)
        c0, c1 = j0 * self.cols, min(j1 * self.cols, self.n_cols)
        for j in range(j0, j1):
            try:
                _ = self.array[self.v, r0:r1, c0:c1] if self.v is not None else self.array[r0:r1, c0:c1]
            except Exception as e:  # a codec or decode error
                self._fail(f"{self._where(c, j)} is unreadable ({type(e).__name__}: {e}): "
                           f"{self._listing.base}/{self._key(c, j)}")

    def _check(self, c: int, columns, widths, block: np.ndarray) -> None:
        """Row chunk c's values (the column chunks ``columns``): finite, and the recorded checksums."""
        if not all_finite(block):
            bad = ~np.isfinite(block)
            r, col = (int(x) for x in np.argwhere(bad)[0])
            why = ""
            if block.dtype == np.float16 and np.isinf(block[bad]).all():  # written before builds checked overflow
                why = ("; float16 overflow (values beyond 65,504): rebuild with --dtype float32, which is another "
                       "group (rebuilding this one gives the same inf)")
            actual = np.concatenate([np.arange(j * self.cols, j * self.cols + w) for j, w in zip(columns, widths)])
            self._fail(f"{self.label}: chunk {c} holds {int(bad.sum())} NaN/Inf values (first at row "
                       f"{c * self.rows + r}, neuron {int(actual[col])}){why}")
        if self._digests is None:
            return
        want = self._digests[self.view, c]
        at = 0
        for j, width in zip(columns, widths):
            got = chunk_digests(block[:, at:at + width], self.cols)[0]
            at += width
            if not np.array_equal(got, want[j]):
                self._fail(f"{self._where(c, j)} does not hold what the build wrote (its checksum differs from the "
                           f"recorded one: a damaged, swapped or foreign chunk): {self._listing.base}/{self._key(c, j)}")


def _runs(indices):
    """Consecutive runs of sorted integers, as half-open (first, last + 1) pairs."""
    runs = []
    for j in indices:
        if runs and j == runs[-1][1]:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1])
    return [tuple(r) for r in runs]


class CheckedArray:
    """A pass of a group as an array that indexes like a numpy array (``a[rows]``,
    ``a[rows, cols]``, ``a[:]``), every chunk it touches read through :class:`PassReader`.
    Picklable: it reopens its store where it is unpickled (dask workers)."""

    def __init__(self, group, view: int = 0):
        self._group, self._view = group, view
        self._reader = PassReader(group, view)
        self.shape = (self._reader.n_rows, self._reader.n_cols)
        self.dtype = self._reader.dtype
        self.chunks = (self._reader.rows, self._reader.cols)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (2 - len(key) + 1) + key[i + 1:]
        key = key + (slice(None),) * (2 - len(key))
        rows = np.arange(self.shape[0])[key[0]]
        cols = np.arange(self.shape[1])[key[1]]
        r, c = np.atleast_1d(rows), np.atleast_1d(cols)
        if not r.size or not c.size:
            return np.empty((r.size, c.size), dtype=self.dtype)[
                (0 if np.ndim(rows) == 0 else slice(None), 0 if np.ndim(cols) == 0 else slice(None))]
        col_chunks = sorted(set((c // self.chunks[1]).tolist()))
        region = self._reader.rows_of(int(r.min()), int(r.max()) + 1, col_chunks)
        # the region's columns are those of col_chunks, in order: position of each wanted column in it
        offsets = {j: sum(min(self.chunks[1], self.shape[1] - q * self.chunks[1]) for q in col_chunks[:i])
                   for i, j in enumerate(col_chunks)}
        at = np.array([offsets[int(x // self.chunks[1])] + int(x % self.chunks[1]) for x in c]) \
            if len(col_chunks) > 1 else c - col_chunks[0] * self.chunks[1]
        out = region[np.ix_(r - int(r.min()), at)]
        if np.ndim(rows) == 0:
            out = out[0]
        if np.ndim(cols) == 0:
            out = out[..., 0]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def __reduce__(self):
        return _reopen, (self._group.store.path, self._group.store.storage_options, self._group.name, self._view)

    def __repr__(self) -> str:
        return f"<featstore checked array {self._group.name} pass {self._view} {self.shape} {self.dtype}>"


def _reopen(path, storage_options, name, view):
    from ._store import FeatureStore

    return CheckedArray(FeatureStore(path, mode="r", storage_options=storage_options).group(name), view)
