"""Hugging Face ``datasets`` as a dataset source (``hf:PATH_OR_NAME``).

``PATH_OR_NAME`` is a folder written by ``save_to_disk`` (a ``DatasetDict``: its splits; a
single ``Dataset``: the seeded 80/20 split, or ``all``), a folder or file of parquet / arrow
files (``datasets.load_dataset``: splits from the file names), or a hub name (from the local
cache, else the hub). The image column is the one ``Image`` feature and the label column the
one ``ClassLabel`` feature unless named (``--hf-image-column``, ``--hf-label-column``);
class names come from the ``ClassLabel`` (a string column: its sorted values over every
split; an integer column: ``0 .. max``). Images are read as their encoded bytes (the column
cast to ``Image(decode=False)``) and decoded by featstore's one rule (``open_image``), so the
bad-image check and odd modes are handled as for files. The split's ``_fingerprint`` and the
columns read are part of the group's key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._images import SEEDED_SPLITS, ImageRef, ImageSource, open_image, split_positions
from .errors import InvalidDatasetError, InvalidParameterError

__all__ = ["HFCell", "hf_splits", "hf_load", "hf_canonical", "hf_identity"]

_WHOLE = "__whole__"  # a single Dataset (no splits of its own)
_OPENED: dict[str, dict] = {}


def _datasets():
    from ._extras import require

    return require("datasets", "--dataset hf:...")


class _Column:
    """One split's image column, as encoded bytes; shared by its cells (pickled once)."""

    def __init__(self, table, column: str, where: str):
        self.table, self.column, self.where = table, column, where

    def read(self, row: int) -> bytes:
        cell = self.table[int(row)][self.column]
        if cell is None:
            raise ValueError("no image in this row")
        if cell.get("bytes") is not None:
            return cell["bytes"]
        path = cell.get("path")
        if not path:
            raise ValueError("an image cell with neither bytes nor a path")
        with open(path, "rb") as f:
            return f.read()


class HFCell(ImageRef):
    """The encoded image of one row of a Hugging Face dataset."""

    __slots__ = ("col", "row", "name")

    def __init__(self, col: _Column, row: int, name: str):
        self.col, self.row, self.name = col, int(row), name

    def read(self) -> bytes:
        return self.col.read(self.row)

    def __str__(self) -> str:
        return f"hf:{self.col.where} {self.name}"


def hf_canonical(where: str) -> str:
    path = Path(where).expanduser()
    if path.exists():
        return str(path.resolve())
    if where.startswith((".", "/", "~")):
        raise InvalidParameterError(key="dataset", value=f"hf:{where}", expected=(
            "hf:PATH of a dataset saved with save_to_disk or of parquet/arrow files, or hf:NAME of the hub "
            f"({str(path)!r} does not exist)"))
    if ".." in where.split("/"):
        raise InvalidParameterError(key="dataset", value=f"hf:{where}", expected="a hub name without '..'")
    return where


def _open(where: str) -> dict:
    """{split: Dataset} (one ``_WHOLE`` entry for a single Dataset), opened once per process."""
    if where in _OPENED:
        return _OPENED[where]
    ds_lib = _datasets()
    path = Path(where)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            opened = ds_lib.load_from_disk(str(path))
        elif path.is_file():
            kind = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(
                path.suffix.lower())
            if kind is None:
                raise InvalidDatasetError(dataset=f"hf:{where}", problem="a file that is not parquet, arrow, csv or "
                                                                         "json")
            opened = ds_lib.load_dataset(kind, data_files=str(path))
        elif path.is_dir():
            opened = _load_files(ds_lib, path, where)
        else:
            opened = ds_lib.load_dataset(where)
    except InvalidDatasetError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise InvalidDatasetError(dataset=f"hf:{where}", problem=f"cannot be opened with datasets: "
                                                                 f"{str(e).splitlines()[0][:300]}") from None
    splits = dict(opened) if isinstance(opened, ds_lib.DatasetDict) else {_WHOLE: opened}
    _OPENED[where] = splits
    return splits


_SPLIT_NAMES = ("train", "validation", "valid", "val", "test")


def _load_files(ds_lib, path: Path, where: str):
    """A folder of parquet / arrow files, as the hub lays them out (at its top, or one folder
    down: ``data/``), found here (``load_dataset`` on a folder would walk the whole tree it was
    given). Files named by a split (``train-00000.parquet``, ``test.arrow``) are that split;
    otherwise the files are one dataset (split by the seeded rule)."""
    import re

    for pattern in ("*", "*/*"):
        for kind in ("parquet", "arrow"):
            files = sorted(str(p) for p in path.glob(f"{pattern}.{kind}"))
            if not files:
                continue
            by_split: dict[str, list[str]] = {}
            for f in files:
                m = re.match(r"(?i)(" + "|".join(_SPLIT_NAMES) + r")(?=[-_.]|$)", Path(f).name)
                by_split.setdefault(m.group(1).lower() if m else "", []).append(f)
            if "" in by_split or len(by_split) == 0:
                return ds_lib.load_dataset(kind, data_files=files, split="train")  # one dataset
            return ds_lib.load_dataset(kind, data_files=by_split)
    raise InvalidDatasetError(dataset=f"hf:{where}", problem=(
        "neither a dataset saved with save_to_disk (no dataset_dict.json or state.json) nor a folder of parquet / "
        "arrow files (at its top or one folder down)"))


def hf_splits(where: str, options) -> tuple[str, ...]:
    splits = _open(where)
    return SEEDED_SPLITS if _WHOLE in splits else tuple(splits)


def _columns(table, where: str, options) -> tuple[str, str, str | None]:
    """(image column, label column, id column or None), named or detected from the features."""
    ds_lib = _datasets()
    features = table.features
    names = list(features)

    def pick(key: str, kind, what: str) -> str:
        given = options.get(key)
        if given is not None:
            if given not in features:
                raise InvalidParameterError(key=key, value=given, expected=f"a column of hf:{where} "
                                                                           f"({', '.join(names)})")
            return given
        found = [n for n, f in features.items() if isinstance(f, kind)]
        if len(found) != 1:
            raise InvalidDatasetError(dataset=f"hf:{where}", problem=(
                f"{'no' if not found else len(found)} {kind.__name__} column{'s' if len(found) != 1 else ''} "
                f"({', '.join(found) or 'columns: ' + ', '.join(names)}): name the {what} column with "
                f"--{key.replace('_', '-')}"))
        return found[0]

    image = pick("hf_image_column", ds_lib.Image, "image")
    label = pick("hf_label_column", ds_lib.ClassLabel, "label")
    if not isinstance(features[image], ds_lib.Image):
        raise InvalidParameterError(key="hf_image_column", value=image, expected=(
            f"an Image column of hf:{where} ({image!r} is {_kind_of(features[image])}; Image columns: "
            f"{', '.join(n for n, f in features.items() if isinstance(f, ds_lib.Image)) or 'none'})"))
    feature = features[label]
    if not (isinstance(feature, ds_lib.ClassLabel) or (isinstance(feature, ds_lib.Value) and (
            feature.dtype == "string" or "int" in feature.dtype))):
        raise InvalidParameterError(key="hf_label_column", value=label, expected=(
            f"a ClassLabel, integer or string column of hf:{where} ({label!r} is {_kind_of(feature)})"))
    ident = options.get("hf_id_column")
    if ident is not None and ident not in features:
        raise InvalidParameterError(key="hf_id_column", value=ident, expected=f"a column of hf:{where} "
                                                                              f"({', '.join(names)})")
    return image, label, ident


def _kind_of(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"a {type(feature).__name__}" + (f" of {dtype}" if isinstance(dtype, str) else "")


def _classes(splits: dict, label: str) -> tuple[list[str], dict | None]:
    """Class names and, for string labels, the value -> index table (over every split)."""
    ds_lib = _datasets()
    first = next(iter(splits.values()))
    feature = first.features[label]
    if isinstance(feature, ds_lib.ClassLabel):
        return list(feature.names), None
    values = set()
    for table in splits.values():
        values.update(table[label])
    if all(isinstance(v, (int, np.integer)) for v in values):
        return [str(i) for i in range(int(max(values)) + 1)], None
    names = sorted(str(v) for v in values)
    return names, {n: i for i, n in enumerate(names)}


def hf_load(where: str, split: str, options, bad_images: str) -> ImageSource:
    ds_lib = _datasets()
    splits = _open(where)
    table = splits[_WHOLE] if _WHOLE in splits else splits[split]
    image, label, ident = _columns(table, where, options)
    classes, table_of = _classes(splits, label)
    raw = table[label]
    targets = np.asarray([table_of[str(v)] for v in raw] if table_of else raw, dtype=np.int64)
    if _WHOLE in splits:
        positions = split_positions(targets, split)
        prefix = "row"
    else:
        positions = np.arange(len(targets))
        prefix = split
    ids = [str(v) for v in table[ident]] if ident else [f"{prefix}/{i}" for i in range(len(targets))]
    ids = [ids[i] for i in positions]
    if len(set(ids)) != len(ids):
        raise InvalidDatasetError(dataset=f"hf:{where}", problem=f"the id column {ident!r} repeats values in split "
                                                                 f"{split!r}")
    col = _Column(table.cast_column(image, ds_lib.Image(decode=False)).select_columns([image]), image, where)
    files = [HFCell(col, int(i), ids[j]) for j, i in enumerate(positions)]
    return ImageSource(lambda i: open_image(files[i]), targets[positions], classes, ids,
                       description=f"datasets {where} [{split}], fingerprint {table._fingerprint}", files=files)


def hf_identity(where: str, split: str, options) -> tuple[tuple[str, str], ...]:
    splits = _open(where)
    table = splits[_WHOLE] if _WHOLE in splits else splits[split]
    image, label, ident = _columns(table, where, options)
    used = f"image={image}, label={label}" + (f", id={ident}" if ident else "")
    return (("hf_fingerprint", str(table._fingerprint)), ("columns", used))
