"""Dataset sources: where a dataset's images come from, as one registry of small entries.

A dataset name is either a registered dataset (``digits``, ``fashion-mnist``, ...: the
``DATASETS`` registry of :mod:`featstore.datasets`) or ``SOURCE:WHERE``, the prefix picking
an entry here (parsed once, by :func:`featstore.datasets.parse_dataset_name`):

``imagefolder:PATH``
    A class-per-folder tree (split subfolders, or a seeded 80/20 split, or ``all``).
``hf:PATH_OR_NAME``
    A Hugging Face ``datasets`` dataset: a folder written by ``save_to_disk``, a folder or
    file of parquet / arrow files, or a hub name (from the local cache or the hub). Its own
    splits; the image column and the label column are detected from the features (the
    ``Image`` and ``ClassLabel`` columns) or named (``--hf-image-column``,
    ``--hf-label-column``); sample ids are ``split/row`` or an id column
    (``--hf-id-column``).
``wds:URL_PATTERN``
    webdataset tar shards, local or any fsspec URL (``s3://...``), ``{split}`` standing for
    the split and ``{000000..000099}`` for a range of shards; the image and label members
    named by ``--wds-image-key`` (``jpg;png``: the first present) and ``--wds-label-key``
    (``cls``); sample ids are the ``__key__``.
``csv:FILE`` / ``parquet:FILE``
    A manifest with columns ``path`` (relative to the manifest's folder, absolute, or a
    URL), ``label`` (a class name) and optionally ``split`` (else the seeded 80/20 split).

Every source reads its images through one decoding rule (``_images.open_image``), so the
bad-image check, the skip record and the handling of odd modes are the same for all.
Third-party packages add sources (a :class:`DatasetSource`) or named datasets (a
``datasets.DatasetEntry``) through the ``featstore.datasets`` entry-point group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["DatasetSource", "DATASET_SOURCES", "dataset_sources", "ENTRY_POINT_GROUP", "SOURCE_OPTIONS",
           "row_extra_keys"]

ENTRY_POINT_GROUP = "featstore.datasets"

# The options a source may take, declared in BuildOptions (the command line's --hf-image-column
# and so on come from there); each source names the ones it reads.
SOURCE_OPTIONS = ("hf_image_column", "hf_label_column", "hf_id_column", "wds_image_key", "wds_label_key")


@dataclass(frozen=True)
class DatasetSource:
    """One entry of the dataset-source registry.

    Attributes
    ----------
    name : str
        The prefix (``wds``).
    splits : callable
        ``splits(where, options) -> tuple of str``: the splits it offers.
    load : callable
        ``load(where, split, options, bad_images) -> ImageSource``.
    canonical : callable
        ``canonical(where) -> str``: the form a group records (local paths absolute), checking
        that it exists.
    identity : callable, optional
        ``identity(where, split, options) -> tuple of (key, value)``: what, besides the name,
        determines the rows (a fingerprint, the shard list and sizes, a manifest's digest, the
        columns read); part of the group's key.
    options : tuple of str
        The source options (of :data:`SOURCE_OPTIONS`) it takes.
    paths : bool
        Whether ``where`` is a local path (matched by its trailing path components, so a
        store built elsewhere can be queried by a relative path).
    example, description : str
        For ``featstore datasets``.
    extra : str, optional
        The distribution extra its libraries come with (``data``).
    split_keys : tuple of str
        The identity keys that differ between the splits of one dataset (HF's per-split
        fingerprint, the shard list): they say which rows a group holds, not how they were
        extracted, so a sweep's train and test groups may differ in them.
    """

    name: str
    splits: Callable[[str, Mapping[str, Any]], tuple[str, ...]]
    load: Callable
    canonical: Callable[[str], str]
    identity: Callable | None = None
    options: tuple[str, ...] = ()
    paths: bool = True
    example: str = ""
    description: str = ""
    extra: str | None = None
    split_keys: tuple[str, ...] = ()


# Spec extras that say which rows of the dataset a group holds (besides every source's
# split_keys): a k-shot subset, the set of images left out under --bad-images skip.
ROW_EXTRAS = ("per_class", "skipped")


def row_extra_keys() -> frozenset[str]:
    """The spec-extra keys that may differ between groups of one extraction on other rows (a
    sweep's k-shot train group and its full test group; HF's per-split fingerprints)."""
    return frozenset(ROW_EXTRAS).union(*(s.split_keys for s in dataset_sources().values()))


def _imagefolder_splits(where, options):
    from pathlib import Path

    from ._imagefolder import imagefolder_splits

    return imagefolder_splits(Path(where).expanduser())


def _imagefolder_load(where, split, options, bad_images):
    from pathlib import Path

    from ._imagefolder import load_imagefolder

    return load_imagefolder(Path(where).expanduser(), split, bad_images)


def _imagefolder_canonical(where):
    from pathlib import Path

    from .errors import InvalidParameterError

    path = Path(where).expanduser()
    if not path.is_dir():
        raise InvalidParameterError(key="dataset", value=f"imagefolder:{where}",
                                    expected=f"imagefolder:PATH of an existing folder of class folders "
                                             f"({str(path)!r} is not a directory)")
    return str(path.resolve())


def _lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on first call (the sources' libraries load only when used)."""

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module, __package__), name)(*args, **kwargs)

    call.__name__ = name
    return call


DATASET_SOURCES: dict[str, DatasetSource] = {s.name: s for s in (
    DatasetSource("imagefolder", _imagefolder_splits, _imagefolder_load, _imagefolder_canonical,
                  example="imagefolder:PATH",
                  description="class-per-folder tree: train/ test/ [val/] subfolders, else a seeded 80/20 "
                              "train/test split of the class folders, or all of them"),
    DatasetSource("hf", _lazy("._hfdata", "hf_splits"), _lazy("._hfdata", "hf_load"),
                  _lazy("._hfdata", "hf_canonical"), _lazy("._hfdata", "hf_identity"),
                  options=("hf_image_column", "hf_label_column", "hf_id_column"), paths=False,
                  split_keys=("hf_fingerprint",),
                  example="hf:PATH_OR_NAME",
                  description="Hugging Face datasets: a save_to_disk folder, parquet/arrow files, or a hub name; its "
                              "own splits; the Image and ClassLabel columns unless named",
                  extra="data"),
    DatasetSource("wds", _lazy("._shards", "wds_splits"), _lazy("._shards", "wds_load"),
                  _lazy("._shards", "wds_canonical"), _lazy("._shards", "wds_identity"),
                  options=("wds_image_key", "wds_label_key"), paths=False, split_keys=("shards",),
                  example="wds:URL_PATTERN",
                  description="webdataset tar shards, local or any fsspec URL (s3:// needs the s3 extra): {split} "
                              "for the split, {000000..000099} for shards; members jpg;png and cls unless named"),
    DatasetSource("csv", _lazy("._manifest", "manifest_splits"), _lazy("._manifest", "manifest_load"),
                  _lazy("._manifest", "manifest_canonical"), _lazy("._manifest", "manifest_identity"),
                  example="csv:FILE",
                  description="a manifest with columns path (relative to it, absolute, or a URL), label and "
                              "optionally split (else a seeded 80/20 train/test split)"),
    DatasetSource("parquet", _lazy("._manifest", "manifest_splits"), _lazy("._manifest", "manifest_load"),
                  _lazy("._manifest", "manifest_canonical"), _lazy("._manifest", "manifest_identity"),
                  example="parquet:FILE", description="the same manifest as a parquet file"),
)}


def dataset_sources() -> dict[str, DatasetSource]:
    """The registry with third-party sources (entry points ``featstore.datasets`` whose object
    is a :class:`DatasetSource`) added; entry points naming a ``DatasetEntry`` register a
    named dataset instead (see :func:`featstore.datasets.load_plugins`)."""
    from .datasets import load_plugins

    load_plugins()
    return DATASET_SOURCES
