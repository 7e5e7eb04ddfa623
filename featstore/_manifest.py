"""Manifest datasets (``csv:FILE``, ``parquet:FILE``): one row per image.

Columns: ``path`` (relative to the manifest's folder, absolute, or a URL any fsspec
filesystem reads), ``label`` (a class name) and optionally ``split``. Without a split
column the seeded 80/20 train/test split (or ``all``) applies, as for a folder without
split subfolders. Classes are the sorted label values of the whole manifest, so every split
has the same class list. The manifest's sha256 is part of the group's key: an edited
manifest is another group.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ._images import SEEDED_SPLITS, ImageRef, ImageSource, open_image, split_positions
from .errors import InvalidDatasetError, InvalidParameterError

__all__ = ["URLRef", "manifest_splits", "manifest_load", "manifest_canonical", "manifest_identity"]

REQUIRED = ("path", "label")


class URLRef(ImageRef):
    """An image at a URL (``s3://``, ``https://``, ...), read whole through fsspec."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        self.url = url

    def read(self) -> bytes:
        import fsspec

        with fsspec.open(self.url, "rb") as f:
            return f.read()

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):
        return URLRef, (self.url,)


def _kind(path: Path) -> str:
    return "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"


def manifest_canonical(where: str) -> str:
    path = Path(where).expanduser()
    if not path.is_file():
        raise InvalidParameterError(key="dataset", value=where, expected=f"a manifest file ({str(path)!r} is not a "
                                                                         f"file)")
    return str(path.resolve())


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int):
    """(table as a dict of string columns, sha256 of the file); cached per file version."""
    import pandas as pd

    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        if _kind(Path(path)) == "parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as e:
        raise InvalidDatasetError(dataset=path, problem=f"cannot be read as a {_kind(Path(path))} manifest: "
                                                        f"{str(e).splitlines()[0]}") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise InvalidDatasetError(dataset=path, problem=f"needs the columns {', '.join(REQUIRED)} (and optionally "
                                                        f"split); it has {', '.join(map(str, frame.columns))}")
    columns = {c: [("" if v is None else str(v)) for v in frame[c].tolist()] for c in frame.columns
               if c in (*REQUIRED, "split")}
    for c in columns:
        empty = [i + 2 for i, v in enumerate(columns[c]) if v == ""][:10]  # as a spreadsheet numbers the rows
        if empty:
            raise InvalidDatasetError(dataset=path, problem=f"empty {c!r} in row(s) {', '.join(map(str, empty))}")
    return columns, digest


def _table(where: str):
    st = os.stat(where)
    return _read(where, st.st_mtime_ns, st.st_size)


def manifest_splits(where: str, options) -> tuple[str, ...]:
    columns, _ = _table(where)
    if "split" not in columns:
        return SEEDED_SPLITS
    return tuple(dict.fromkeys(columns["split"]))  # in the order they first appear


def manifest_load(where: str, split: str, options, bad_images: str) -> ImageSource:
    columns, digest = _table(where)
    labels = np.asarray(columns["label"])
    classes = sorted(set(columns["label"]))
    targets = np.searchsorted(np.asarray(classes), labels).astype(np.int64)
    if "split" in columns:
        positions = np.flatnonzero(np.asarray(columns["split"]) == split)
        how = f"split column = {split!r}"
    else:
        positions = split_positions(targets, split)
        how = "every row" if split == SEEDED_SPLITS[-1] else "seeded 80/20 split"
    paths = [columns["path"][i] for i in positions]
    seen: dict[str, int] = {}
    for i, p in zip(positions, paths):
        if p in seen:
            raise InvalidDatasetError(dataset=where, problem=f"{p!r} is listed twice in split {split!r} (rows "
                                                             f"{seen[p] + 2} and {i + 2})")
        seen[p] = int(i)
    base = Path(where).parent
    files = [URLRef(p) if "://" in p else str(Path(p) if os.path.isabs(p) else base / p) for p in paths]
    return ImageSource(lambda i: open_image(files[i]), targets[positions], classes, paths,
                       description=f"{_kind(Path(where))} manifest {where} ({how}), sha256 {digest[:16]}", files=files)


def manifest_identity(where: str, split: str, options) -> tuple[tuple[str, str], ...]:
    _, digest = _table(where)
    return (("manifest", f"sha256 {digest}"),)
