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
from ._chunks import CHECKSUMS, CheckedArray, PassReader
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
        self.built_now = False  # featstore.build sets it on the groups it wrote (vs already complete)
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
        problems = self._array_problems()
        if problems:
            raise StaleGroupError(name=name, store=store.path,
                                  reason=f"its arrays disagree with its recorded spec ({'; '.join(problems)}): they "
                                         f"were changed after the build; remove it (`featstore rm {name}`) and build "
                                         f"again")

    def _array_problems(self) -> list[str]:
        """How the arrays' own metadata disagree with the recorded spec and sizes (dtype, shape,
        chunking): checked when the group is opened, so an edited array is never read, and an
        absurd size never allocated."""
        meta, spec = self.meta, self.spec
        n, d = meta.get("n_samples"), meta.get("n_neurons")
        if not (isinstance(n, int) and isinstance(d, int) and n >= 1 and d >= 1):
            return [f"n_samples = {n!r}, n_neurons = {d!r}: not positive integers"]
        want = {"features": ((n, d), spec.dtype), "labels": ((n,), "int64"), "sample_index": ((n,), "int64"),
                "progress": ((1 + spec.views, -(-n // spec.chunk_rows)), "uint8")}
        if spec.views:
            want["views"] = ((spec.views, n, d), spec.dtype)
        problems = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            present = set(self._z.array_keys())
        for name, (shape, dtype) in want.items():
            if name not in present:
                problems.append(f"{name}: missing")
                continue
            arr = self._z[name]
            if tuple(arr.shape) != shape:
                problems.append(f"{name}: shape {tuple(arr.shape)}, the spec says {shape}")
            if str(arr.dtype) != dtype:
                problems.append(f"{name}: dtype {arr.dtype}, the spec says {dtype}")
        if "features" in present and not problems:
            chunks = tuple(self._z["features"].chunks)
            if chunks[0] != spec.chunk_rows:
                problems.append(f"features: chunks of {chunks[0]} rows, the spec says {spec.chunk_rows}")
        return problems

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

    def _require_present(self) -> None:
        """Raise when the group left the store after this handle was opened (``featstore rm``)."""
        if not _is_url(self.store.path) and not (Path(self.store.path) / self.name / "zarr.json").exists():
            raise GroupNotFoundError(name=self.name, store=self.store.path, known=[],
                                     hint="it was removed after it was opened; nothing of it was read")

    def _small(self, name: str) -> np.ndarray:
        """One of the per-sample arrays (labels, sample ids, sample index), read whole."""
        self._require_present()
        try:
            return self._z[name][:]
        except Exception as e:  # noqa: BLE001 - a missing or damaged file, whichever zarr raises
            self._require_present()
            raise CorruptGroupError(path=self.path, name=self.name,
                                    problems=[f"{name}: unreadable ({type(e).__name__}: {e})"]) from None

    def _require_complete(self) -> None:
        self._require_present()
        if not self.is_complete:
            raise IncompleteGroupError(name=self.name, store=self.store.path, state=self.state)

    # ------------------------------------------------------------------ arrays
    @property
    def features(self):
        """The clean pass as an array of shape (n_samples, n_neurons) that indexes like numpy
        (``g.features[:100]``), every chunk it reads checked (``_chunks``: present, decodable,
        finite, its recorded hash). ``g.raw("features")`` is the zarr array itself, unchecked."""
        return self.view(0)

    def view(self, index: int = 0):
        """Pass ``index`` as a checked array (see :attr:`features`): 0 = clean, 1..n_views = augmented views."""
        self._require_complete()
        if not 0 <= index <= self.n_views:
            raise InvalidParameterError(
                key="view", value=index,
                expected="0 (clean)" + (f" or 1..{self.n_views} (augmented)" if self.n_views else "")
                         + f": the passes of group {self.name!r}")
        return CheckedArray(self, index)

    def raw(self, name: str = "features"):
        """One of the group's zarr arrays itself (``features``, ``views``, ``labels``, ...): no
        checks, a missing chunk reads as zeros. For tools that need zarr's own API."""
        return self._z[name]

    @property
    def labels(self) -> np.ndarray:
        """Integer class labels, array of shape (n_samples,)."""
        return self._small("labels")

    @property
    def sample_ids(self) -> np.ndarray:
        return self._small("sample_ids").astype(object).astype(str)

    @property
    def sample_index(self) -> np.ndarray:
        return self._small("sample_index")

    # reads give float32 unless asked: float16 storage halves the disk, but arithmetic in float16 loses
    # digits (a column sum over 1,000 rows: 376.0 against 378.6), so a read is never float16 by surprise
    READ_DTYPE = np.float32

    def numpy(self, view: int = 0, dtype=READ_DTYPE) -> np.ndarray:
        """All features of one pass as a numpy array of shape (n_samples, n_neurons), every chunk
        checked; float32 by default (``dtype=None``: as stored, e.g. float16)."""
        arr = self.view(view)  # complete, a valid pass
        block = arr._reader.rows_of(0, self.n_samples)  # one zarr read (its chunks decoded concurrently)
        return block.astype(dtype, copy=False) if dtype is not None else block

    @property
    def shape(self) -> tuple[int, int]:
        """(n_samples, n_neurons) of the clean pass."""
        return self.n_samples, self.n_neurons

    @property
    def dtype(self) -> np.dtype:
        """What reads return by default (float32); ``spec.dtype`` is what is stored."""
        return np.dtype(self.READ_DTYPE)

    def __len__(self) -> int:
        return self.n_samples

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """``np.asarray(g)``: the clean pass (float32, checked), so numpy, scikit-learn and torch take a group."""
        return self.numpy(dtype=dtype or self.READ_DTYPE)

    def dask(self, view: int = 0):
        """Features of one pass as a lazy dask array chunked like the store; each chunk is
        checked when it is computed."""
        from ._extras import require

        da = require("dask.array", "Group.dask()")
        arr = self.view(view)
        return da.from_array(arr, chunks=arr.chunks, name=f"featstore-{self.name}-{view}", lock=False,
                             meta=np.empty((0, 0), dtype=arr.dtype))

    def iter_blocks(self, block_rows: int | None = None, view: int = 0,
                    dtype=READ_DTYPE) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start, X_block, y_block)`` over the rows, one chunk-aligned block at a time,
        every chunk checked; blocks are float32 by default (``dtype=None``: as stored). Memory
        stays at one block however large the group is."""
        reader = self.view(view)._reader  # complete, a valid pass
        labels = self.labels
        block_rows = block_rows or self.spec.chunk_rows
        for start in range(0, self.n_samples, block_rows):
            stop = min(start + block_rows, self.n_samples)
            block = reader.rows_of(start, stop)
            yield start, (block.astype(dtype, copy=False) if dtype is not None else block), labels[start:stop]

    # ------------------------------------------------------------------ checks
    def nbytes_on_disk(self) -> int | None:
        if _is_url(self.store.path):
            return None
        return _dir_size(Path(self.store.path) / self.name)

    def _checksums(self) -> np.ndarray | None:
        """The recorded content hash of every chunk, or None for a group built before they were."""
        if not hasattr(self, "_digests"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                has = CHECKSUMS in self._z.array_keys()
            self._digests = self._z[CHECKSUMS][:] if has else None
        return self._digests

    def _readers(self) -> list[PassReader]:
        return [PassReader(self, v) for v in range(1 + self.n_views)]

    def read_columns(self, columns, view: int = 0, dtype=None) -> np.ndarray:
        """Every row of the given columns (an index array, in its order), reading only the
        chunks that hold them, each once: a wide layer's chunks split its columns. Each chunk is
        checked as it is used (present, decodable, finite, its hash); raises :class:`CorruptGroupError`.
        """
        self._require_complete()
        if not 0 <= view <= self.n_views:
            self.view(view)  # the range error
        cols = np.asarray(columns, dtype=np.int64)
        block = self.view(view)[:, cols]
        return block.astype(dtype, copy=False) if dtype is not None else block

    def _label_problems(self) -> list[str]:
        try:
            labels = self._small("labels")
        except CorruptGroupError as e:
            return list(e.fields["problems"])
        problems = []
        n_classes = len(self.classes)
        out = (labels < 0) | (labels >= n_classes)
        if out.any():
            problems.append(f"labels: {int(out.sum())} outside 0..{n_classes - 1} (first {int(labels[out][0])})")
        return problems

    def verify(self) -> list[str]:
        """Check every chunk of every pass: present, readable, finite, and (groups built with
        checksums) holding what the build wrote; labels in range.

        Returns
        -------
        list of str
            Problems found, each naming the chunk or array; empty when the group is sound.
        """
        problems: list[str] = []
        if not self.is_complete:
            problems.append(f"state is {self.state!r}, not complete")
        for reader in self._readers():
            for c in range(reader.n_row_chunks):
                problem = reader.problem(c)
                if problem:
                    problems.append(problem)
        return problems + self._label_problems()

    def check_readable(self) -> None:
        """Raise :class:`CorruptGroupError` naming the path when :meth:`verify` finds problems."""
        problems = self.verify()
        if problems:
            raise CorruptGroupError(path=self.path, name=self.name, problems=problems)

    def read_verified(self, view: int = 0, dtype=None, block_rows: int | None = None) -> Iterator[np.ndarray]:
        """Yield one pass's rows in chunk-aligned blocks, each chunk checked as it is read
        (present, decodable, finite, its hash) and the labels checked first: a group is
        verified by the same read that uses it, never read twice. Raises
        :class:`CorruptGroupError` naming the chunk.

        Parameters
        ----------
        view : int
            0 = the clean pass, 1..n_views = augmented views.
        dtype : numpy dtype, optional
            Convert each block (e.g. ``np.float64`` for CKA sums).
        block_rows : int, optional
            Rows per block, rounded down to whole chunks (default: about 64 MB of chunks).
        """
        self._require_complete()
        problems = self._label_problems()
        if problems:
            raise CorruptGroupError(path=self.path, name=self.name, problems=problems)
        if not 0 <= view <= self.n_views:
            self.view(view)  # the range error
        reader = PassReader(self, view)
        # default: blocks of ~64 MB, so that zarr decodes several chunks at once
        row_bytes = max(1, self.n_neurons * np.dtype(self.spec.dtype).itemsize)
        per_block = max(1, (block_rows or max(reader.rows, (64 << 20) // row_bytes)) // reader.rows)
        for c0 in range(0, reader.n_row_chunks, per_block):
            c1 = min(c0 + per_block, reader.n_row_chunks)
            out = reader.rows_of(c0 * reader.rows, min(c1 * reader.rows, reader.n_rows))
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
            "per_class": int(dict(s.extra)["per_class"]) if "per_class" in dict(s.extra) else None,
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

    def describe(self, keys_only: bool = False) -> str:
        """The group as its query keys tell it apart: model/layer/dataset/split (limit, views,
        weights, dtype) — what a query would add to pick it."""
        s = self.spec
        keys = f"limit={s.limit or 'all'}, views={s.views}, weights={s.weights}, dtype={s.dtype}"
        return keys if keys_only else f"{s.model}/{s.layer}/{s.dataset}/{s.split} ({keys})"

    def __repr__(self) -> str:
        return (
            f"<featstore.Group {self.name} {self.spec.model}/{self.spec.layer} on "
            f"{self.spec.dataset}:{self.spec.split} ({self.meta.get('n_samples')} x "
            f"{self.meta.get('n_neurons')}, {self.spec.dtype}, {self.state})>"
        )


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
                _create_remote_root(self.path, self.storage_options)
            else:
                _create_local_root(self.path)
        try:
            self._root = zarr.open_group(store, mode="r" if mode == "r" else "a")
        except Exception as e:
            raise NotAFeatureStoreError(path=self.path, reason=f"it cannot be opened as Zarr v3 ({e})") from None
        self.unreadable: dict[str, str] = {}  # groups() fills it: name -> why it cannot be opened
        mark = self._root.attrs.asdict().get(ROOT_MARK)
        if not isinstance(mark, dict):
            raise NotAFeatureStoreError(path=self.path, reason=f"a Zarr hierarchy that featstore did not write "
                                                               f"(no '{ROOT_MARK}' attribute); choose another path")
        if mark.get("format_version") != FORMAT_VERSION:
            raise NotAFeatureStoreError(path=self.path, reason=f"it has featstore format "
                                                               f"{mark.get('format_version')!r}; this featstore "
                                                               f"reads format {FORMAT_VERSION}")

    def _has_root(self) -> bool:
        if not _is_url(self.path):
            return (Path(self.path) / "zarr.json").exists()
        from .remote import remote_fs

        fs, root = remote_fs(self.path, self.storage_options)
        fs.invalidate_cache(root)
        return fs.exists(f"{root}/zarr.json")

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
        """Every group's name (one folder with a zarr.json each), readable or not."""
        if not _is_url(self.path):  # listed from the folder: one damaged group's metadata cannot hide the others
            return sorted(e.name for e in os.scandir(self.path)
                          if e.is_dir() and not e.name.startswith(".") and (Path(e.path) / "zarr.json").exists())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # our .featstore/ folder is not a zarr node
            return sorted(k for k in self._root.group_keys() if not k.startswith("."))

    def _open_group(self, name: str) -> Group:
        """Group ``name``; its metadata unreadable (a truncated zarr.json) is one error naming it."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zgroup = self._root[name]
        except Exception as e:  # noqa: BLE001 - zarr raises many kinds for a damaged document
            raise CorruptGroupError(path=f"{self.path}/{name}", name=name,
                                    problems=[f"its metadata cannot be read ({type(e).__name__}: {e})"]) from None
        return Group(self, name, zgroup)

    def groups(self, include_incomplete: bool = False) -> list[Group]:
        """Every group, complete ones only unless ``include_incomplete``. A group that cannot be
        opened (damaged metadata, edited arrays, a copy under another name) is left out and
        recorded in :attr:`unreadable` with why: it never hides the others."""
        out, self.unreadable = [], {}
        for name in self.group_names():
            try:
                g = self._open_group(name)
            except (StaleGroupError, CorruptGroupError, NotAFeatureStoreError) as e:
                self.unreadable[name] = str(e)
                continue
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
            g = self._open_group(name)
            g._require_complete()
            return g
        hits = self.find(**query)
        if not hits:
            partial = self.find(include_incomplete=True, **query)
            if partial:
                partial[0]._require_complete()
            raise GroupNotFoundError(name=query, store=self.path, known=[g.describe() for g in self.groups()])
        if len(hits) > 1:
            raise AmbiguousGroupError(query=query, matches=[f"{g.name} ({g.describe(keys_only=True)})" for g in hits])
        return hits[0]

    def __repr__(self) -> str:
        return f"<featstore.FeatureStore {self.path} ({len(self.group_names())} groups)>"

    # ------------------------------------------------------------------ write side (used by build)
    @property
    def internal_dir(self) -> Path:
        return Path(self.path) / INTERNAL

    @contextlib.contextmanager
    def lock(self, names: list[str], wait: bool = True, on_wait=None):
        """Hold the build locks of ``names`` (sorted, so two builds cannot deadlock): ``flock``s
        in ``.featstore/locks/`` on a local store, lease objects (:mod:`featstore._lease`) at
        an ``s3://`` URL. Yields ``check()``, which raises once a lock is lost (a URL lease
        taken over after this process stalled past it): called before each chunk is written."""
        if _is_url(self.path):
            from ._lease import LeaseLock
            from .remote import remote_fs

            fs, root = remote_fs(self.path, self.storage_options)
            held: list = []
            with contextlib.ExitStack() as stack:
                for name in sorted(names):
                    lk = LeaseLock(fs, f"{root}/{INTERNAL}/locks/{name}.lock")
                    try:
                        lk.acquire(wait, on_wait=(lambda holder, n=name: on_wait(n, holder)) if on_wait else None)
                    except LockBusy as busy:
                        raise GroupLockedError(name=name, store=self.path, holder=busy.holder) from None
                    stack.callback(lk.release)
                    held.append(lk)

                def check():
                    for lk in held:
                        lk.check()

                yield check
            return
        lock_dir = self.internal_dir / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for name in sorted(names):
                try:
                    stack.enter_context(locked(lock_dir / f"{name}.lock", wait=wait,
                                               on_wait=(lambda holder, n=name: on_wait(n, holder)) if on_wait else None))
                except LockBusy as busy:
                    raise GroupLockedError(name=name, store=self.path, holder=busy.holder) from None
            yield lambda: None

    def raw_group(self, name: str):
        """The zarr group ``name`` or None (no metadata checks)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if _is_url(self.path):  # read its zarr.json itself: a listing may be cached
                try:
                    node = self._root[name]
                except (KeyError, FileNotFoundError):
                    return None
                import zarr

                return node if isinstance(node, zarr.Group) else None
            if name in self.group_names():
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

        store = _zarr_store(self.path, read_only=self.mode == "r", storage_options=self.storage_options)
        if _is_url(self.path) and hasattr(getattr(store, "fs", None), "invalidate_cache"):
            store.fs.invalidate_cache()  # fsspec caches listings per filesystem instance: see what is there now
        self._root = zarr.open_group(store, mode="r" if self.mode == "r" else "a")


def _root_document() -> bytes:
    import json

    return json.dumps({"zarr_format": 3, "node_type": "group",
                       "attributes": {ROOT_MARK: {"format_version": FORMAT_VERSION}}}, indent=2).encode()


def _create_remote_root(url: str, storage_options: dict | None) -> None:
    """The store root at a URL: one whole object (an S3 PUT is atomic), created only if absent
    where the store takes conditional writes; a concurrent creator's root is the same."""
    from .remote import remote_fs

    fs, root = remote_fs(url, storage_options)
    try:
        fs.pipe_file(f"{root}/zarr.json", _root_document(), mode="create")
    except TypeError:  # a filesystem without exclusive creation
        fs.pipe_file(f"{root}/zarr.json", _root_document())
    except FileExistsError:  # s3fs's word for a failed If-None-Match: the other creator's root is this one
        pass


def _create_local_root(path: str) -> None:
    """Create the store root's ``zarr.json`` (with featstore's mark) atomically.

    Two builds may start on a new store at once. The metadata (a Zarr v3 group
    document) is written whole and linked into place without replacing; if the other
    process got there first, its root is identical, so that is fine. Nothing ever sees
    a half-written or unmarked root.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    atomic_write(p / "zarr.json", _root_document(), replace=False, consequence="the store was not created")


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
