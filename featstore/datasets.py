"""Dataset registry: every downstream task as a list of (PIL image, label) per split.

Each entry maps a name to a loader that returns an :class:`ImageSource` for one
split. Loaders never download unless asked (``download=True``), and the error for a
missing dataset says how to get it.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Sequence

import numpy as np

from ._images import (
    BAD_IMAGE_POLICIES,
    IMAGE_EXTENSIONS,
    ImageSource,
    check_images,
    image_problem,
    open_image,
    seeded_split,
    to_rgb,
)
from .errors import (
    ClassMapError,
    DatasetNotFoundError,
    IncompatibleParametersError,
    InvalidParameterError,
    UnknownNameError,
)
from .params import Check

__all__ = [
    "ImageSource",
    "DatasetName",
    "parse_dataset_name",
    "DATASETS",
    "register_dataset",
    "dataset_names",
    "load_split",
    "dataset_splits",
    "stratified_subset",
    "DEBIAN_FASHION_MNIST",
    "DatasetText",
    "DatasetEntry",
    "IMAGEFOLDER",
    "load_plugins",
    "dataset_identity",
    "check_source_options",
    "per_class_subset",
    "resolve_dataset_path",
    "CLASS_MAPS",
    "class_mapping",
    "check_images",
    "image_problem",
    "to_rgb",
    "open_image",
    "IMAGE_EXTENSIONS",
    "BAD_IMAGE_POLICIES",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetEntry:
    """A named dataset (``--dataset NAME``): ``loader(split, root, download) -> ImageSource``
    for each of ``splits``; ``needs_root``: its files live under ``--root`` (torchvision's)."""

    name: str
    splits: tuple[str, ...]
    loader: Callable[..., ImageSource]
    description: str
    needs_root: bool = False


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, splits: tuple[str, ...], description: str, needs_root=False):
    """Decorator: register ``loader(split, root, download) -> ImageSource`` under ``name``."""

    def deco(fn):
        DATASETS[name] = DatasetEntry(name, splits, fn, description, needs_root)
        return fn

    return deco


IMAGEFOLDER = "imagefolder"
_PLUGINS_LOADED = False


def load_plugins() -> None:
    """Register what third-party packages declare in the ``featstore.datasets`` entry-point
    group: a ``DatasetSource`` (a prefix) or a ``DatasetEntry`` (a named dataset). Once per
    process; the command line and every name check see them."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    from ._datasources import DATASET_SOURCES, ENTRY_POINT_GROUP, DatasetSource

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, DatasetSource):
            DATASET_SOURCES.setdefault(obj.name, obj)
        elif isinstance(obj, DatasetEntry):
            DATASETS.setdefault(obj.name, obj)
        else:
            raise TypeError(f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}) is a {type(obj).__name__}, "
                            f"not a DatasetSource or a DatasetEntry")


def _sources():
    from ._datasources import dataset_sources

    return dataset_sources()


def dataset_names() -> list[str]:
    load_plugins()
    return sorted(DATASETS) + [s.example or f"{s.name}:..." for s in _sources().values()]


@dataclass(frozen=True)
class DatasetName:
    """A parsed dataset name: a registry name, or ``SOURCE:WHERE`` (``imagefolder:PATH``,
    ``hf:...``, ``wds:...``, ``csv:FILE``, ...).

    Attributes
    ----------
    source : str
        ``""`` for a registered dataset, else the source's prefix.
    name : str
        The registry name, or where the source reads (a path or URL) as written.
    """

    source: str
    name: str

    @property
    def path(self) -> Path:
        return Path(self.name).expanduser()

    def __str__(self) -> str:
        return f"{self.source}:{self.name}" if self.source else self.name

    @property
    def label(self) -> str:
        """Short name for group names and figures: the registry name or the source's prefix."""
        return self.source or self.name

    @property
    def entry(self):
        """The source's registry entry (None for a registered dataset)."""
        return _sources().get(self.source) if self.source else None

    def matches(self, recorded: str) -> bool:
        """Whether a group's recorded dataset (canonical: absolute local paths) is this one.

        A registry name matches itself, a URL itself. A local path matches its absolute path,
        the path this name resolves to from here, or a recorded path that ends in the same
        whole path components (``imagefolder:imagenet`` matches ``/data/imagenet``, never
        ``/data/tiny-imagenet``), so a store built on another machine can still be queried.
        """
        other = parse_dataset_name(recorded)
        if other.source != self.source:
            return False
        if not self.source or "://" in self.name or "://" in other.name:
            return other.name == self.name
        mine, theirs = Path(os.path.normpath(self.path)), Path(os.path.normpath(other.path))
        if mine.is_absolute():
            return mine == theirs
        if Path(os.path.abspath(mine)) == theirs:
            return True
        return len(theirs.parts) >= len(mine.parts) and theirs.parts[-len(mine.parts):] == mine.parts


def parse_dataset_name(name) -> DatasetName:
    """Split a dataset name into its source and where, checking its form (not that it exists).

    The one place that reads a dataset prefix. A prefix this process does not know is read as
    one when the name looks like ``PREFIX:...`` with a lower-case word (a group written by a
    third-party source still opens without it); :func:`canonical_dataset_name` refuses it.
    """
    if not isinstance(name, str) or not name:
        raise InvalidParameterError(key="dataset", value=name, expected=_describe_names())
    source, sep, rest = name.partition(":")
    if sep and (source in _sources() or (source.isidentifier() and source.islower() and len(source) > 1)):
        if not rest:
            raise InvalidParameterError(key="dataset", value=name, expected=f"{source}:WHERE with a path or URL")
        return DatasetName(source, rest)
    if "/" in name or "\\" in name or ".." in name or sep:
        raise InvalidParameterError(
            key="dataset", value=name,
            expected=f"a registry name ({', '.join(sorted(DATASETS))}); for files use a source prefix "
                     f"({', '.join(s.example for s in _sources().values())})")
    return DatasetName("", name)


def is_dataset_name(name) -> bool:
    """Whether ``name`` is a registered dataset or ``SOURCE:WHERE`` of a known source (where
    is not checked)."""
    try:
        return bool(_registered(name))
    except (InvalidParameterError, UnknownNameError):
        return False


def _describe_names() -> str:
    from ._datasources import DATASET_SOURCES  # what is known so far: this runs while modules load

    return (f"a registered dataset ({', '.join(sorted(DATASETS))}) or SOURCE:WHERE "
            f"({', '.join(s.example for s in DATASET_SOURCES.values())})")


DatasetText = Annotated[str, Check(is_dataset_name, _describe_names)]
"""A dataset name as the build and sweeps take it."""


def _registered(name: str) -> DatasetName:
    """A dataset name that this process can load: a registered name, or a known source's."""
    load_plugins()
    parsed = parse_dataset_name(name)
    if parsed.source and parsed.source not in _sources():
        raise UnknownNameError("dataset source", parsed.source, _sources(), context=f"dataset {name!r}")
    if not parsed.source and parsed.name not in DATASETS:
        raise UnknownNameError("dataset", name, dataset_names())
    return parsed


def check_source_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse a source option given for a dataset whose source does not read it
    (``--hf-image-column`` with ``imagefolder:``), naming the sources that do."""
    from ._datasources import SOURCE_OPTIONS

    parsed = _registered(name)
    takes = parsed.entry.options if parsed.entry else ()
    for key in SOURCE_OPTIONS:
        if options.get(key) is not None and key not in takes:
            readers = [s.name + ":" for s in _sources().values() if key in s.options]
            raise IncompatibleParametersError(key=key, value=str(options[key]),
                                              reason=f"it is read by {', '.join(readers)} datasets, not {name!r}")


def dataset_splits(name: str, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The split names a dataset offers."""
    parsed = _registered(name)
    if parsed.entry is not None:
        return tuple(parsed.entry.splits(parsed.name, options or {}))
    return DATASETS[parsed.name].splits


def canonical_dataset_name(name: str) -> str:
    """Registry name, or ``SOURCE:WHERE`` with local paths made absolute (checked to exist)."""
    parsed = _registered(name)
    if parsed.entry is not None:
        return f"{parsed.source}:{parsed.entry.canonical(parsed.name)}"
    return parsed.name


def dataset_identity(name: str, split: str, options: Mapping[str, Any] | None = None) -> tuple[tuple[str, str], ...]:
    """What besides its name determines a split's rows (a fingerprint, the shard list, a
    manifest's digest, the columns read): part of the group's key. Nothing for registered
    datasets and image folders, so their keys are what they always were."""
    parsed = _registered(name)
    if parsed.entry is not None and parsed.entry.identity is not None:
        return tuple(parsed.entry.identity(parsed.name, split, options or {}))
    return ()


def load_split(name: str, split: str, root: str | os.PathLike | None = None, download: bool = False,
               bad_images: str = "fail", options: Mapping[str, Any] | None = None) -> ImageSource:
    """Load one split of a dataset.

    Parameters
    ----------
    name : str
        Registry name (see :func:`dataset_names`) or ``SOURCE:WHERE``.
    split : str
        One of :func:`dataset_splits` (name).
    root : path, optional
        Where torchvision datasets live (or are downloaded to).
    download : bool
        Allow torchvision to download the dataset into ``root``.
    bad_images : {"fail", "skip"}
        What a source does with what cannot be read as a whole (an image folder's class folder
        without images, a missing or truncated shard): an error, or a warning and a recorded skip.
    options : mapping, optional
        Source options (``hf_image_column``, ``wds_image_key``, ...; see ``SOURCE_OPTIONS``).
    """
    parsed = parse_dataset_name(canonical_dataset_name(name))
    options = dict(options or {})
    splits = dataset_splits(str(parsed), options)
    if split not in splits:
        raise UnknownNameError("split", split, splits, context=f"dataset {str(parsed)!r}")
    if parsed.entry is not None:
        return parsed.entry.load(parsed.name, split, options, bad_images)
    entry = DATASETS[parsed.name]
    if entry.needs_root and root is None:
        root = os.environ.get("FEATSTORE_DATA_ROOT", "data/datasets")
    return entry.loader(split, root, download)


def resolve_dataset_path(text: str, folder: Path) -> str:
    """A spec's ``SOURCE:WHERE`` with a relative local ``WHERE`` taken from ``folder`` (the spec
    file's): always for path sources (``imagefolder:``, ``csv:``, ``parquet:``), and for the
    others (``hf:``, ``wds:``) when that folder holds it (else a hub name stays a hub name).
    Registered names, URLs and absolute paths are returned as they are."""
    if ":" not in text:
        return text
    prefix, where = text.split(":", 1)
    entry = _sources().get(prefix)
    if entry is None or "://" in where or not where or Path(where).expanduser().is_absolute() or where.startswith("~"):
        return text
    candidate = folder / where
    if entry.paths or candidate.exists() or Path(str(candidate).split("{", 1)[0]).parent.is_dir():
        return f"{prefix}:{(folder / where).resolve() if '{' not in where else Path(folder).resolve() / where}"
    return text


def stratified_subset(targets: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified subset of ``limit`` samples.

    Each class gets its share of ``limit`` in proportion to its frequency (largest
    remainder rounding), and at least one sample while ``limit`` allows it.

    Parameters
    ----------
    targets : array of shape (n_samples,)
    limit : int or None
        Subset size; None or >= n_samples keeps every sample.
    seed : int
    """
    targets = np.asarray(targets)
    n = len(targets)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise InvalidParameterError(key="limit", value=limit, expected="a positive number of images (or None)")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets, return_counts=True)
    share = counts / n * limit
    take = np.floor(share).astype(int)
    # guarantee each class one sample while the limit allows, then largest remainders
    if limit >= len(classes):
        take = np.maximum(take, 1)
    rest = limit - take.sum()
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while rest > 0:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
            rest -= 1
        i += 1
    while rest < 0:  # the max(.,1) guarantee overshot: trim the largest classes
        c = int(np.argmax(take))
        take[c] -= 1
        rest += 1
    chosen = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(targets == c)
        chosen.append(rng.choice(idx, size=int(k), replace=False))
    return np.sort(np.concatenate(chosen))


def per_class_subset(targets: np.ndarray, k: int, seed: int, classes: Sequence[str] | None = None,
                     dataset: str = "dataset") -> np.ndarray:
    """Sorted indices of a seeded k-shot subset: ``k`` samples of every class present.

    Raises
    ------
    InvalidDatasetError
        Naming every class with fewer than ``k`` samples (and how many it has).
    """
    from .errors import InvalidDatasetError

    targets = np.asarray(targets)
    labels, counts = np.unique(targets, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(labels, counts) if n < k]
    if short:
        name = (lambda c: classes[c] if classes is not None and 0 <= c < len(classes) else str(c))
        listed = ", ".join(f"{name(c)} ({n})" for c, n in short[:20]) + (" ..." if len(short) > 20 else "")
        raise InvalidDatasetError(dataset=dataset, problem=f"--per-class {k} needs {k} images of every class; "
                                                           f"{len(short)} have fewer: {listed}")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(targets == c), size=k, replace=False) for c in labels]
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------- fashion-mnist

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx_dir(candidates) -> Path | None:
    for d in candidates:
        if d is None:
            continue
        d = Path(d)
        for sub in (d, d / "FashionMNIST" / "raw"):
            if (sub / "train-images-idx3-ubyte.gz").exists() or (sub / "train-images-idx3-ubyte").exists():
                return sub
    return None


def _idx_file(d: Path, stem: str) -> Path:
    gz = d / f"{stem}.gz"
    return gz if gz.exists() else d / stem


@register_dataset(
    "fashion-mnist",
    ("train", "test"),
    "Fashion-MNIST (Zalando), 10 classes, 28x28 grayscale: Debian's dataset-fashion-mnist "
    "files when installed, else torchvision's FashionMNIST (--download)",
)
def _fashion_mnist(split: str, root, download: bool) -> ImageSource:
    from PIL import Image

    env_dir = os.environ.get("FEATSTORE_FASHION_MNIST_DIR")
    d = _find_idx_dir([env_dir, root, DEBIAN_FASHION_MNIST])
    if d is None:
        if not download:
            raise DatasetNotFoundError(
                dataset="Fashion-MNIST", looked_in=[str(p) for p in (env_dir, root, DEBIAN_FASHION_MNIST) if p],
                how="Install Debian's package (apt-get install dataset-fashion-mnist), or pass --download --root DIR "
                    "to fetch it with torchvision.")
        from torchvision.datasets import FashionMNIST

        root = root or "data/datasets"
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
        d = _find_idx_dir([root])
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_idx_file(d, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(d, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return ImageSource(
        lambda i: Image.fromarray(images[i], mode="L"),
        labels,
        FASHION_MNIST_CLASSES,
        [f"{split}/{i}" for i in range(len(labels))],
        description=f"IDX files in {d}",
    )


# ----------------------------------------------------------------------------- digits


@register_dataset(
    "digits",
    ("train", "test"),
    "scikit-learn's handwritten digits, 10 classes, 8x8 grayscale, seeded 80/20 split",
)
def _digits(split: str, root, download: bool) -> ImageSource:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    idx = seeded_split(bunch.target, split)
    return ImageSource(
        lambda i: Image.fromarray(images[idx[i]], mode="L"),
        bunch.target[idx],
        [str(c) for c in bunch.target_names],
        [f"digits/{j}" for j in idx],
        description="sklearn.datasets.load_digits",
    )


# ----------------------------------------------------------------------------- torchvision


def _torchvision_source(ds, split: str, classes=None) -> ImageSource:
    for attr in ("targets", "_labels", "labels"):
        if hasattr(ds, attr):
            targets = np.asarray(getattr(ds, attr), dtype=np.int64)
            break
    else:  # pragma: no cover - every registered dataset has one of them
        targets = np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)
    if classes is None:
        classes = getattr(ds, "classes", None) or [str(c) for c in range(int(targets.max()) + 1)]
    files = getattr(ds, "_image_files", None) or getattr(ds, "_images", None)  # datasets that read files
    # file-backed datasets read through open_image, as image folders do: one decoding rule
    # (every PIL mode, EXIF orientation, bombs refused) whatever the source
    return ImageSource(
        (lambda i: open_image(files[i])) if files else (lambda i: ds[i][0]),
        targets,
        classes,
        [f"{split}/{i}" for i in range(len(targets))],
        description=f"torchvision.datasets.{type(ds).__name__}({getattr(ds, 'root', '')})",
        files=files,
    )


def _tv_missing(name: str, root, err: Exception) -> DatasetNotFoundError:
    return DatasetNotFoundError(dataset=name, looked_in=f"--root {str(root)!r} ({err})",
                                how="Pass --download to fetch it with torchvision, or --root pointing to an "
                                    "existing copy.")


def _torchvision_loader(cls_name: str, split_kw):
    def load(split: str, root, download: bool) -> ImageSource:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            ds = cls(str(root), download=download, **split_kw(split))
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise _tv_missing(cls_name, root, e) from None
        return _torchvision_source(ds, split)

    return load


register_dataset("cifar10", ("train", "test"), "CIFAR-10 via torchvision (--root, --download)", True)(
    _torchvision_loader("CIFAR10", lambda s: {"train": s == "train"})
)
register_dataset("cifar100", ("train", "test"), "CIFAR-100 via torchvision (--root, --download)", True)(
    _torchvision_loader("CIFAR100", lambda s: {"train": s == "train"})
)
register_dataset(
    "flowers102", ("train", "val", "test"), "Oxford Flowers-102 via torchvision (--root, --download)", True
)(_torchvision_loader("Flowers102", lambda s: {"split": s}))
register_dataset(
    "oxford-pets", ("train", "test"), "Oxford-IIIT Pets via torchvision; train = trainval (--root, --download)", True
)(
    _torchvision_loader(
        "OxfordIIITPet", lambda s: {"split": "trainval" if s == "train" else "test", "target_types": "category"}
    )
)


# ----------------------------------------------------------------------------- class maps

CLASS_MAPS = ("by-name", "by-index")  # or the path of a JSON file {evaluation class: training class}


def _index_names(test_classes: list[str], n_train: int, *, train: str, test: str) -> np.ndarray:
    """``by-index``: each evaluation class's *name* read as the index of a training class
    (ImageNetV2's folders ``0`` ... ``999`` are ImageNet's classes in the sorted WordNet-id
    order). Folder names sort as strings (``0, 1, 10, 100, ...``), so position is never used."""
    import re

    not_integers = [c for c in test_classes if not re.fullmatch(r"[0-9]+", c)]
    if not_integers:
        raise ClassMapError(test=test, train=train, problem=(
            f"by-index reads each class name as a training class index, but {len(not_integers)} of "
            f"{len(test_classes)} names are not integers: {', '.join(not_integers[:10])}"
            + (" ..." if len(not_integers) > 10 else "") + " (use by-name, or a JSON file {its class: train's class})"))
    index = np.array([int(c) for c in test_classes], dtype=np.int64)
    outside = [c for c, i in zip(test_classes, index) if i >= n_train]
    if outside:
        raise ClassMapError(test=test, train=train, problem=(
            f"{len(outside)} class names are not indices of the {n_train} training classes (0..{n_train - 1}): "
            f"{', '.join(outside[:10])}" + (" ..." if len(outside) > 10 else "")))
    values, counts = np.unique(index, return_counts=True)
    if (counts > 1).any():
        twice = [c for c, i in zip(test_classes, index) if i in set(values[counts > 1].tolist())]
        raise ClassMapError(test=test, train=train, problem=f"class names that read as one index: {', '.join(twice[:10])}")
    return index


def class_mapping(train_classes, test_classes, how: str = "by-name", *, train: str = "train",
                  test: str = "test") -> np.ndarray:
    """For each class of an evaluation set, the index of the training class it is.

    Parameters
    ----------
    train_classes, test_classes : sequence of str
    how : str
        ``by-name`` (the same class names, in any order); ``by-index`` (each evaluation class's
        name is the integer index of a training class: ImageNetV2's folders ``0`` ... ``999``
        against ImageNet's sorted WordNet ids; every name must be an integer, of any width); or
        a JSON file mapping evaluation class names to training class names.
    train, test : str
        What the class lists belong to, for messages.

    Raises
    ------
    ClassMapError
        Naming every evaluation class that maps to no training class (or, for ``by-index``,
        every name that is not an integer index of one).
    """
    import json

    train_classes, test_classes = [str(c) for c in train_classes], [str(c) for c in test_classes]
    if how == "by-index":
        return _index_names(test_classes, len(train_classes), train=train, test=test)
    names = test_classes
    if how != "by-name":
        path = Path(how).expanduser()
        if not path.is_file():
            raise InvalidParameterError(key="class_map", value=how,
                                        expected=f"one of {', '.join(CLASS_MAPS)} or the path of a JSON file "
                                                 f"{{evaluation class: training class}}")
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InvalidParameterError(key="class_map", value=how, expected=f"a JSON object ({e})") from None
        unmapped = [c for c in test_classes if c not in table]
        if unmapped:
            raise ClassMapError(test=test, train=train,
                                problem=f"{len(unmapped)} classes missing from {how}: {', '.join(unmapped[:10])}")
        names = [str(table[c]) for c in test_classes]
    index = {c: i for i, c in enumerate(train_classes)}
    missing = [c for c in names if c not in index]
    if missing:
        raise ClassMapError(test=test, train=train, problem=f"{len(missing)} classes the probes were not trained on: "
                                                           f"{', '.join(missing[:10])}"
                                                           + (" ..." if len(missing) > 10 else ""))
    return np.array([index[c] for c in names])
