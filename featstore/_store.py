"""The on-disk feature store: one Zarr v3 hierarchy, one group per extraction.

Layout::

    featstore.zarr/                    root group; attrs {"featstore": {"format_version": 1}}
      <model>__<layer>__<dataset>__<split>__<key12>/
        features      (n_samples, n_neurons)   float16|float32, whole-row chunks
        views         (n_views, n_samples, n_neurons)   augmented passes (train only)
        labels        (n_samples,)  int64
        sample_ids    (n_samples,)  str
        sample_index  (n_samples,)  int64, index into the dataset's split
        progress      (1 + n_views, n_chunks)  uint8, 1 = that chunk is written
      .featstore/locks/<group>.lock    build locks (fcntl)
      .featstore/tmp/                  groups being created (renamed into place)
      .featstore/trash/                groups being removed (``featstore rm``)

A group's attributes hold the :class:`~featstore.ExtractionSpec` (whose key names
the group), provenance (library versions, weights, device), class names, timings and
``state``: ``building`` until every chunk of every view is recorded in ``progress``,
then ``complete``. Readers refuse groups that are not complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydantic import ValidationError

from . import faults
from .datasets import parse_dataset_name
from .fileio import LockBusy, atomic_write, is_temporary, locked
from ._spec import FORMAT_VERSION, ExtractionSpec
from .errors import (
    AmbiguousGroupError,
    CorruptGroupError,
    GroupLockedError,
    GroupNotFoundError,
    IncompatibleParametersError,
    IncompleteGroupError,
    InvalidParameterError,
    MissingKeyError,
    NotAFeatureStoreError,
    StaleGroupError,
    StoreNotFoundError,
    StoreNotWritableError,
    UnknownKeyError,
)

__all__ = ["FeatureStore", "Group", "open", "DEFAULT_STORE", "QUERY_KEYS"]

DEFAULT_STORE = "data/featstore.zarr"
ROOT_MARK = "featstore"
META = "featstore"  # attribute key of a group's metadata
INTERNAL = ".featstore"
QUERY_KEYS = ("model", "layer", "dataset", "split", "weights", "weights_sha256", "pooling", "limit", "seed", "views",
              "dtype")


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _zarr_store(path: str | os.PathLike, read_only: bool, storage_options: dict | None = None):
    """A zarr store for a local path (atomic writes) or any fsspec URL."""
    import zarr.storage

    if _is_url(str(path)):
        return zarr.storage.FsspecStore.from_url(str(path), read_only=read_only,
                                                 storage_options=storage_options or None)
    return zarr.storage.LocalStore(str(path), read_only=read_only)


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


class Group:
    """One extraction's features, labels and spec (read side).

    Obtain groups from :class:`FeatureStore`; do not construct directly.

    Attributes
    ----------
    name : str
        Group name inside the store.
    spec : ExtractionSpec
        What produced the features.
    """

    def __init__(self, store: "FeatureStore", name: str, zgroup):
        self.store = store
        self.name = name
        self._z = zgroup
        meta = dict(zgroup.attrs.asdict().get(META) or {})
        if not meta or "spec" not in meta:
            raise NotAFeatureStoreError(path=f"{store.path}/{name}",
                                        reason="a Zarr group without featstore metadata; featstore did not write it")
        self.meta = meta
        try:
            self.spec = ExtractionSpec.from_dict(meta["spec"])
        except (ValidationError, KeyError, TypeError) as e:
            raise StaleGroupError(name=name, store=store.path,
                                  reason=f"its recorded extraction spec is not valid ({e}); its attributes were "
                                         f"changed after the build; remove it (`featstore rm {name}`) and build "
                                         f"again") from None
        if self.spec.group_name() != name:
            raise StaleGroupError(
                name=name, store=store.path,
                reason=f"it records a spec whose key names {self.spec.group_name()!r}: its attributes were changed "
                       f"after the build; remove it (`featstore rm {name}`) and build again")

    # ------------------------------------------------------------------ metadata
    @property
    def state(self) -> str:
        return self.meta.get("state", "unknown")

    @property
    def is_complete(self) -> bool:
        return self.state == "complete"

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    @property
    def n_samples(self) -> int:
        return int(self.meta["n_samples"])

    @property
    def n_neurons(self) -> int:
        return int(self.meta["n_neurons"])

    @property
    def n_views(self) -> int:
        return int(self.spec.views)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """The files a ``--bad-images skip`` build left out: [{"sample": id, "reason": ...}]."""
        return list(self.meta.get("skipped", []))

    @property
    def float16_coarse(self) -> dict[str, Any] | None:
        """The neurons a float16 build stores with fewer than ``min_levels`` distinct values within
        +-3 sd (a large mean, a small spread): their count and a few examples (mean, sd, the float16
        step at that magnitude); None when there are none."""
        return self.meta.get("float16_coarse")

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta.get("provenance", {}))

    @property
    def timings(self) -> dict[str, Any]:
        return dict(self.meta.get("timings", {}))

    @property
    def path(self) -> str:
        return f"{self.store.path}/{self.name}"

    def _require_complete(self) -> None:
        if not self.is_complete:
            raise IncompleteGroupError(name=self.name, store=self.store.path, state=self.state)

    # ------------------------------------------------------------------ arrays
    @property
    def features(self):
        """The clean pass, a zarr array of shape (n_samples, n_neurons)."""
        self._require_complete()
        return self._z["features"]

    def view(self, index: int = 0):
        """Pass ``index`` as a zarr array: 0 = clean, 1..n_views = augmented views."""
        self._require_complete()
        if index == 0:
            return self._z["features"]
        if not 1 <= index <= self.n_views:
            raise InvalidParameterError(
                key="view", value=index,
                expected="0 (clean)" + (f" or 1..{self.n_views} (augmented)" if self.n_views else "")
                         + f": the passes of group {self.name!r}")
        # a lazy 2-D selection would copy; callers index the 3-D array themselves
        return _ViewArray(self._z["views"], index - 1)

    @property
    def labels(self) -> np.ndarray:
        """Integer class labels, array of shape (n_samples,)."""
        return self._z["labels"][:]

    @property
    def sample_ids(self) -> np.ndarray:
        return self._z["sample_ids"][:].astype(object).astype(str)

    @property
    def sample_index(self) -> np.ndarray:
        return self._z["sample_index"][:]

    def numpy(self, view: int = 0, dtype=None) -> np.ndarray:
        """All features of one pass as a numpy array of shape (n_samples, n_neurons)."""
        arr = self.view(view)[:]
        return arr.astype(dtype) if dtype is not None else arr

    def dask(self, view: int = 0):
        """Features of one pass as a dask array chunked like the store."""
        import dask.array as da

        if view == 0:
            return da.from_zarr(self.features)
        z = self.view(view)
        full = da.from_zarr(z.array)
        return full[z.index]

    def iter_blocks(self, block_rows: int | None = None, view: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start, X_block, y_block)`` over the rows, one chunk-aligned block at a time.

        Memory stays at one block however large the group is.
        """
        arr = self.view(view)
        labels = self.labels
        block_rows = block_rows or self.spec.chunk_rows
        for start in range(0, self.n_samples, block_rows):
            stop = min(start + block_rows, self.n_samples)
            yield start, arr[start:stop], labels[start:stop]

    # ------------------------------------------------------------------ checks
    def nbytes_on_disk(self) -> int | None:
        if _is_url(self.store.path):
            return None
        return _dir_size(Path(self.store.path) / self.name)

    def _passes(self) -> list[tuple[str, Any, int | None]]:
        """(label, zarr array, view index or None) of every pass: the clean one, then the views."""
        arrays = [("features", self._z["features"], None)]
        if self.n_views:
            arrays += [(f"views[{v}]", self._z["views"], v) for v in range(self.n_views)]
        return arrays

    def _read_chunk(self, label: str, arr, v: int | None, c: int) -> tuple[np.ndarray | None, str | None]:
        """Chunk c of one pass, read and checked: (rows, None), or (None, the problem) when it
        is missing, unreadable or holds NaN/Inf (zarr would silently serve a missing chunk
        as its fill value)."""
        rows = arr.chunks[-2]
        start = c * rows
        problem = self._missing_chunk(label, arr, v, c, range(-(-arr.shape[-1] // arr.chunks[-1])))
        if problem:
            return None, problem
        store_path = Path(self.store.path) / self.name / label.split("[")[0]
        key = f"c/{v}/{c}/0" if v is not None else f"c/{c}/0"
        try:
            block = arr[v, start : start + rows] if v is not None else arr[start : start + rows]
        except Exception as e:  # decompression or decode failure
            return None, f"{label}: chunk {c} is unreadable ({type(e).__name__}: {e}): {store_path / key}"
        bad = ~np.isfinite(block)
        if bad.any():
            r = start + int(np.argwhere(bad)[0][0])
            col = int(np.argwhere(bad)[0][1])
            why = ""
            if block.dtype == np.float16 and np.isinf(block[bad]).all():  # written before builds checked overflow
                why = ("; float16 overflow (values beyond 65,504): rebuild with --dtype float32, which is another "
                       "group (rebuilding this one gives the same inf)")
            return None, (f"{label}: chunk {c} holds {int(bad.sum())} NaN/Inf values (first at row {r}, neuron {col})"
                          + why)
        return block, None

    def _missing_chunk(self, label: str, arr, v: int | None, c: int, column_chunks) -> str | None:
        """The first of row chunk c's column chunks ``column_chunks`` whose file is missing (a
        wide layer's chunks also split its columns), or None."""
        if _is_url(self.store.path):
            return None
        rows = arr.chunks[-2]
        store_path = Path(self.store.path) / self.name / label.split("[")[0]
        for j in column_chunks:
            key = f"c/{v}/{c}/{j}" if v is not None else f"c/{c}/{j}"
            if not (store_path / key).exists():
                cols = "" if arr.chunks[-1] >= arr.shape[-1] else \
                    f", columns {j * arr.chunks[-1]}..{min((j + 1) * arr.chunks[-1], arr.shape[-1])}"
                return f"{label}: chunk {c} (rows {c * rows}..{c * rows + rows}{cols}) is missing: {store_path / key}"
        return None

    def read_columns(self, columns, view: int = 0, dtype=None) -> np.ndarray:
        """Every row of the given columns (an index array, in its order), reading only the
        chunks that hold them, each once: a wide layer's chunks split its columns. Each chunk is
        checked as it is used (present, decodable, finite); raises :class:`CorruptGroupError`.
        """
        self._require_complete()
        if not 0 <= view <= self.n_views:
            self.view(view)  # the range error
        label, arr, v = self._passes()[view]
        cols = np.asarray(columns, dtype=np.int64)
        order = np.argsort(cols, kind="stable")
        wanted = cols[order]
        touched = np.unique(wanted // arr.chunks[-1])
        problems = [p for c in range(-(-self.n_samples // arr.chunks[-2]))
                    if (p := self._missing_chunk(label, arr, v, c, touched))]
        if problems:
            raise CorruptGroupError(path=self.path, name=self.name, problems=problems[:1])
        try:
            block = arr.oindex[v, :, wanted] if v is not None else arr.oindex[:, wanted]
        except Exception as e:  # decompression or decode failure
            raise CorruptGroupError(path=self.path, name=self.name,
                                    problems=[f"{label}: a chunk of columns {wanted[0]}..{wanted[-1]} is unreadable "
                                              f"({type(e).__name__}: {e})"]) from None
        bad = ~np.isfinite(block)
        if bad.any():
            r, j = (int(x) for x in np.argwhere(bad)[0])
            raise CorruptGroupError(path=self.path, name=self.name,
                                    problems=[f"{label}: chunk {r // arr.chunks[-2]} holds NaN/Inf (first at row {r}, "
                                              f"neuron {int(wanted[j])})"])
        out = np.empty((block.shape[0], len(cols)), dtype=dtype or block.dtype)
        out[:, order] = block
        return out

    def _label_problems(self) -> list[str]:
        try:
            labels = self._z["labels"][:]
        except Exception as e:
            return [f"labels: unreadable ({type(e).__name__}: {e})"]
        problems = []
        n_classes = len(self.classes)
        out = (labels < 0) | (labels >= n_classes)
        if out.any():
            problems.append(f"labels: {int(out.sum())} outside 0..{n_classes - 1} (first {int(labels[out][0])})")
        if len(labels) != self.n_samples:
            problems.append(f"labels: {len(labels)} rows, expected {self.n_samples}")
        return problems

    def verify(self) -> list[str]:
        """Check every chunk is present and readable, no NaN/Inf, labels in range.

        Returns
        -------
        list of str
            Problems found, each naming the chunk or array; empty when the group is sound.
        """
        problems: list[str] = []
        if not self.is_complete:
            problems.append(f"state is {self.state!r}, not complete")
        for label, arr, v in self._passes():
            for c in range(-(-self.n_samples // arr.chunks[-2])):
                problems += [p for p in self._read_chunk(label, arr, v, c)[1:] if p]
        return problems + self._label_problems()

    def check_readable(self) -> None:
        """Raise :class:`CorruptGroupError` naming the path when :meth:`verify` finds problems."""
        problems = self.verify()
        if problems:
            raise CorruptGroupError(path=self.path, name=self.name, problems=problems)

    def read_verified(self, view: int = 0, dtype=None, block_rows: int | None = None) -> Iterator[np.ndarray]:
        """Yield one pass's rows in chunk-aligned blocks, each chunk checked as it is read
        (present, decodable, finite) and the labels checked first: a group is verified by the
        same read that uses it, never read twice. Raises :class:`CorruptGroupError` naming
        the chunk.

        Parameters
        ----------
        view : int
            0 = the clean pass, 1..n_views = augmented views.
        dtype : numpy dtype, optional
            Convert each block (e.g. ``np.float64`` for CKA sums).
        block_rows : int, optional
            Rows per block, rounded down to whole chunks (default: one chunk).
        """
        self._require_complete()
        problems = self._label_problems()
        if problems:
            raise CorruptGroupError(path=self.path, name=self.name, problems=problems)
        if not 0 <= view <= self.n_views:
            self.view(view)  # the range error
        label, arr, v = self._passes()[view]
        rows = arr.chunks[-2]
        per_block = max(1, (block_rows or rows) // rows)
        n_chunks = -(-self.n_samples // rows)
        for c0 in range(0, n_chunks, per_block):
            blocks = []
            for c in range(c0, min(c0 + per_block, n_chunks)):
                block, problem = self._read_chunk(label, arr, v, c)
                if problem:
                    raise CorruptGroupError(path=self.path, name=self.name, problems=[problem])
                blocks.append(block)
            out = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
            yield out.astype(dtype, copy=False) if dtype is not None else out

    def summary(self) -> dict[str, Any]:
        s = self.spec
        return {
            "name": self.name,
            "model": s.model,
            "weights": s.weights,
            "weights_sha256": s.weights_sha256,
            "layer": s.layer,
            "dataset": s.dataset,
            "split": s.split,
            "limit": s.limit,
            "views": s.views,
            "n_samples": self.n_samples,
            "n_neurons": self.n_neurons,
            "dtype": s.dtype,
            "bytes_on_disk": self.nbytes_on_disk(),
            "state": self.state,
        }

    def matches(self, **query) -> bool:
        s = self.spec
        for k, v in query.items():
            if v is None:
                continue
            have = getattr(s, k)
            if k == "dataset":
                if not parse_dataset_name(v).matches(have):
                    return False
                continue
            if k == "weights_sha256":  # a prefix, as git takes one (two checkpoints of one model differ here)
                if not (isinstance(v, str) and len(v) >= 8 and have.startswith(v)):
                    return False
                continue
            if have != v:
                return False
        return True

    def __repr__(self) -> str:
        return (
            f"<featstore.Group {self.name} {self.spec.model}/{self.spec.layer} on "
            f"{self.spec.dataset}:{self.spec.split} ({self.meta.get('n_samples')} x "
            f"{self.meta.get('n_neurons')}, {self.spec.dtype}, {self.state})>"
        )


class _ViewArray:
    """Row-indexable window ``array[index, rows, :]`` on a 3-D views array."""

    def __init__(self, array, index: int):
        self.array = array
        self.index = index
        self.shape = tuple(array.shape[1:])
        self.dtype = array.dtype
        self.chunks = tuple(array.chunks[1:])

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        return self.array[(self.index,) + key]

    def __len__(self) -> int:
        return self.shape[0]


class FeatureStore:
    """A directory (or fsspec URL) of feature groups.

    Parameters
    ----------
    path : str or path-like
        The store root, e.g. ``data/featstore.zarr``.
    mode : {"r", "a"}
        ``r`` opens an existing store read-only; ``a`` creates it if needed.
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_STORE, mode: str = "r", storage_options: dict | None = None):
        import zarr

        if mode not in ("r", "a"):
            raise InvalidParameterError(key="mode", value=mode, expected="'r' (read) or 'a' (create/append)")
        self.path = str(path) if _is_url(str(path)) else str(Path(path).expanduser())
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        if mode == "a":
            _check_writable(self.path)
        else:
            if _is_url(self.path):
                from .remote import remote_fs

                fs, root = remote_fs(self.path, self.storage_options)  # bucket and credentials, one clear error
                if not fs.exists(f"{root}/zarr.json"):
                    raise StoreNotFoundError(path=self.path)
            elif not Path(self.path).exists():
                raise StoreNotFoundError(path=self.path)
        self._check_foreign()
        store = _zarr_store(self.path, read_only=(mode == "r"), storage_options=self.storage_options)
        if mode == "a" and not self._has_root():
            if _is_url(self.path):
                root = zarr.open_group(store, mode="a")
                root.attrs.update({ROOT_MARK: {"format_version": FORMAT_VERSION}})
            else:
                _create_local_root(self.path)
        try:
            self._root = zarr.open_group(store, mode="r" if mode == "r" else "a")
        except Exception as e:
            raise NotAFeatureStoreError(path=self.path, reason=f"it cannot be opened as Zarr v3 ({e})") from None
        mark = self._root.attrs.asdict().get(ROOT_MARK)
        if not isinstance(mark, dict):
            raise NotAFeatureStoreError(path=self.path, reason=f"a Zarr hierarchy that featstore did not write "
                                                               f"(no '{ROOT_MARK}' attribute); choose another path")
        if mark.get("format_version") != FORMAT_VERSION:
            raise NotAFeatureStoreError(path=self.path, reason=f"it has featstore format "
                                                               f"{mark.get('format_version')!r}; this featstore "
                                                               f"reads format {FORMAT_VERSION}")

    def _has_root(self) -> bool:
        return (Path(self.path) / "zarr.json").exists() if not _is_url(self.path) else True

    def _check_foreign(self) -> None:
        FeatureStore.check_foreign(self.path)

    @staticmethod
    def check_foreign(path: str) -> None:
        """Refuse a path that holds something featstore did not write."""
        if _is_url(path):
            return
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise NotAFeatureStoreError(path=path, reason="it is a file, not a featstore directory")
        # List first, look for the root after: featstore writes zarr.json before anything else
        # in a store, so an entry listed while another process creates the store implies it.
        listed = [e.name for e in p.iterdir()] if p.is_dir() else []
        if any(not is_temporary(n, of="zarr.json") for n in listed) and not (p / "zarr.json").exists():
            raise NotAFeatureStoreError(path=path, reason="a non-empty directory that featstore did not write "
                                                          "(no zarr.json); choose an empty or new path")

    # ------------------------------------------------------------------ listing
    def group_names(self) -> list[str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # our .featstore/ folder is not a zarr node
            return sorted(k for k in self._root.group_keys() if not k.startswith("."))

    def groups(self, include_incomplete: bool = False) -> list[Group]:
        """Every group, complete ones only unless ``include_incomplete``."""
        out = []
        for name in self.group_names():
            g = Group(self, name, self._root[name])
            if include_incomplete or g.is_complete:
                out.append(g)
        return out

    def __iter__(self):
        return iter(self.groups())

    def __len__(self) -> int:
        return len(self.groups())

    def find(self, include_incomplete: bool = False, **query) -> list[Group]:
        """Groups whose spec matches every keyword (``model``, ``layer``, ``dataset``, ...)."""
        unknown = set(query) - set(QUERY_KEYS)
        if unknown:
            name = sorted(unknown)[0]
            raise UnknownKeyError(key=f"query {name}", value=query[name], allowed=QUERY_KEYS)
        return [g for g in self.groups(include_incomplete) if g.matches(**query)]

    def group(self, name: str | None = None, **query) -> Group:
        """The one complete group named ``name`` or matching ``query``.

        Examples
        --------
        >>> s = featstore.open("data/featstore.zarr")
        >>> g = s.group(model="tf_efficientnet_lite0", dataset="fashion-mnist", split="train")
        >>> X, y = g.numpy(), g.labels
        """
        if name is not None:
            if name not in self.group_names():
                raise GroupNotFoundError(name=name, store=self.path, known=self.group_names())
            g = Group(self, name, self._root[name])
            g._require_complete()
            return g
        hits = self.find(**query)
        if not hits:
            partial = self.find(include_incomplete=True, **query)
            if partial:
                partial[0]._require_complete()
            raise GroupNotFoundError(
                name=query, store=self.path,
                known=[f"{g.spec.model}/{g.spec.layer}/{g.spec.dataset}/{g.spec.split}" for g in self.groups()])
        if len(hits) > 1:
            raise AmbiguousGroupError(
                query=query, matches=[f"{g.name} (weights={g.spec.weights}, limit={g.spec.limit}, "
                                      f"views={g.spec.views}, dtype={g.spec.dtype})" for g in hits])
        return hits[0]

    def __repr__(self) -> str:
        return f"<featstore.FeatureStore {self.path} ({len(self.group_names())} groups)>"

    # ------------------------------------------------------------------ write side (used by build)
    @property
    def internal_dir(self) -> Path:
        return Path(self.path) / INTERNAL

    @contextlib.contextmanager
    def lock(self, names: list[str], wait: bool = True, on_wait=None):
        """Hold the build locks of ``names`` (sorted, so two builds cannot deadlock)."""
        lock_dir = self.internal_dir / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for name in sorted(names):
                try:
                    stack.enter_context(locked(lock_dir / f"{name}.lock", wait=wait,
                                               on_wait=(lambda holder, n=name: on_wait(n, holder)) if on_wait else None))
                except LockBusy as busy:
                    raise GroupLockedError(name=name, store=self.path, holder=busy.holder) from None
            yield

    def raw_group(self, name: str):
        """The zarr group ``name`` or None (no metadata checks)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name in self._root.group_keys():
                return self._root[name]
        return None

    def remove(self, names: list[str] | None = None, incomplete: bool = False,
               dry_run: bool = False) -> list[tuple[str, int]]:
        """Delete groups: each named one, and with ``incomplete`` every group that is not complete.

        Every name is checked and every group's build lock taken (without waiting) before
        anything is deleted: an unknown name or a group being built changes nothing. Each
        group is first renamed into ``.featstore/trash/`` (it leaves the store at once and
        whole), then deleted; a removal killed midway leaves only trash, which the next
        ``remove`` clears. With ``incomplete``, the temporary folders of killed builds of new
        groups are cleared too.

        Returns
        -------
        list of (name, bytes on disk), what was (or, with ``dry_run``, would be) removed.
        """
        if self.mode != "a":
            raise IncompatibleParametersError(key="mode", value=self.mode, reason="this store is open read-only; use "
                                                                               "FeatureStore(path, mode='a') to remove groups")
        if _is_url(self.path):
            raise IncompatibleParametersError(key="path", value=self.path,
                                              reason="removing groups works on local stores only")
        names = list(dict.fromkeys(names or []))
        known = self.group_names()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise GroupNotFoundError(name=unknown[0], store=self.path, known=known, hint="nothing was removed")
        if not names and not incomplete:
            raise MissingKeyError(key="groups", expected="the names of the groups to remove (see `featstore ls "
                                                         "--all`), or incomplete=True (--incomplete)")
        if incomplete:
            names += [g.name for g in self.groups(include_incomplete=True) if not g.is_complete and g.name not in names]
        sizes = [(n, _dir_size(Path(self.path) / n)) for n in names]
        if dry_run:
            return sizes
        trash = self.internal_dir / "trash"
        try:
            with self.lock(names, wait=False):
                trash.mkdir(parents=True, exist_ok=True)
                for n in names:
                    os.replace(Path(self.path) / n, trash / f"{n}.{os.getpid()}.{time.time_ns()}")
                    faults.point("remove-renamed")
        except GroupLockedError as e:
            raise GroupLockedError(**{**e.fields, "hint": "nothing was removed"}) from None
        self._empty_trash(incomplete)
        self.reopen()
        return sizes

    def new_group_dir(self, name: str) -> Path:
        """A fresh folder in ``.featstore/tmp/`` where group ``name`` is created before it is
        renamed into place (the caller holds its build lock)."""
        tmp_root = self.internal_dir / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        return tmp_root / f"{name}.{uuid.uuid4().hex[:8]}"

    def _empty_trash(self, stale_builds: bool) -> None:
        """Delete the trash, and (``stale_builds``) new-group folders whose build is no longer running."""
        trash = self.internal_dir / "trash"
        if trash.is_dir():
            for entry in trash.iterdir():
                shutil.rmtree(entry, ignore_errors=True)
        tmp = self.internal_dir / "tmp"
        if stale_builds and tmp.is_dir():
            for entry in tmp.iterdir():
                name = entry.name.rsplit(".", 1)[0]  # as new_group_dir named it
                with contextlib.suppress(GroupLockedError):
                    with self.lock([name], wait=False):  # its builder is gone: nobody will rename it in
                        shutil.rmtree(entry, ignore_errors=True)

    def reopen(self) -> None:
        import zarr

        self._root = zarr.open_group(_zarr_store(self.path, read_only=self.mode == "r",
                                                 storage_options=self.storage_options), mode="r" if self.mode == "r" else "a")


def _create_local_root(path: str) -> None:
    """Create the store root's ``zarr.json`` (with featstore's mark) atomically.

    Two builds may start on a new store at once. The metadata (a Zarr v3 group
    document) is written whole and linked into place without replacing; if the other
    process got there first, its root is identical, so that is fine. Nothing ever sees
    a half-written or unmarked root.
    """
    import json

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    doc = {"zarr_format": 3, "node_type": "group",
           "attributes": {ROOT_MARK: {"format_version": FORMAT_VERSION}}}
    atomic_write(p / "zarr.json", json.dumps(doc, indent=2).encode(), replace=False,
                 consequence="the store was not created")


def _check_writable(path: str) -> None:
    """Fail before any work if ``path`` cannot be created or written."""
    if _is_url(path):
        return
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise StoreNotWritableError(path=path, reason=f"{str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreNotWritableError(path=path, reason=f"{str(probe)!r} denies write access")


def open(path: str | os.PathLike = DEFAULT_STORE, storage_options: dict | None = None) -> FeatureStore:  # noqa: A001
    """Open a feature store read-only (the notebook entry point): a local path or an fsspec
    URL (``s3://bucket/featstore.zarr``; ``storage_options`` go to fsspec).

    >>> import featstore
    >>> s = featstore.open("data/featstore.zarr")
    >>> s.groups()
    """
    return FeatureStore(path, mode="r", storage_options=storage_options)
