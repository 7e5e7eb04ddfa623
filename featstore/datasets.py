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
from typing import Annotated, Callable, Sequence

import numpy as np

from .errors import ClassMapError, DatasetNotFoundError, InvalidDatasetError, InvalidParameterError, UnknownNameError
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
    "IMAGEFOLDER",
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
# Seed of the fixed train/test split for datasets that come without one; part of the
# dataset's definition, not a user knob, so every user gets the same split.
SPLIT_SEED = 0
SPLIT_TEST_FRACTION = 0.2


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BAD_IMAGE_POLICIES = ("fail", "skip")


def to_rgb(img):
    """An image of any PIL mode as the RGB image a model takes.

    EXIF orientation is applied. 16- and 32-bit integer images (``I;16``, ``I``) are taken as
    16-bit (divided by 257); float images (``F``) as [0, 1] (times 255); both then clipped
    to 0..255. Every other mode (1, L, LA, P, PA, RGBA, CMYK, ...) goes through PIL's own
    conversion (alpha dropped, palettes and CMYK mapped).
    """
    from PIL import Image, ImageOps

    if img.getexif().get(0x0112, 1) != 1:  # an EXIF orientation other than "as stored"
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def open_image(path):
    """A file's image as RGB (``to_rgb``), fully decoded; a decompression bomb is refused."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)


def image_problem(path) -> str | None:
    """Why a file cannot serve as an image ("empty", "not an image", "truncated or corrupt",
    "decompression bomb ...", "unreadable ..."), or None when it can. Fast: JPEGs are decoded at
    1/8 scale (truncation still shows), PNGs checked chunk by chunk (CRCs), others decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "empty"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                    img.load()
                elif img.format == "PNG":
                    img.verify()
                else:
                    img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"decompression bomb ({str(e).split('.')[0]})"
    except UnidentifiedImageError:
        return "not an image"
    except (SyntaxError, EOFError, ValueError, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, (EOFError,)) and e.errno is not None:
            return f"unreadable ({e.strerror})"
        return f"truncated or corrupt ({str(e) or type(e).__name__})"
    return None


def check_images(files: Sequence, progress: bool = True, label: str = "checking images",
                 workers: int | None = None) -> list[tuple[int, str]]:
    """(position, reason) of every file that is not a usable image, checked in parallel
    threads with a progress bar (PIL decodes outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    bad = []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(files), desc=label, unit="file",
                                                   disable=not progress, dynamic_ncols=True) as bar:
        for i, problem in enumerate(pool.map(image_problem, files, chunksize=64)):
            bar.update(1)
            if problem is not None:
                bad.append((i, problem))
    return bad


class ImageSource:
    """One split of a dataset: random access to images and labels.

    Parameters
    ----------
    get_image : callable
        ``get_image(i) -> PIL.Image`` for ``0 <= i < len(targets)``.
    targets : array of shape (n_samples,)
        Integer class labels.
    classes : sequence of str
        Class names; ``targets`` index into it.
    sample_ids : array of shape (n_samples,), optional
        Stable identifiers of the samples (file paths, or indices into the original
        split); defaults to ``split:index``.
    description : str
        Where the images came from (written into the group's provenance).
    files : sequence of path, optional
        The file behind each sample, for sources that read files (checked before a build).
    """

    def __init__(
        self,
        get_image: Callable[[int], "object"],
        targets: Sequence[int],
        classes: Sequence[str],
        sample_ids: Sequence[str] | None = None,
        description: str = "",
        files: Sequence | None = None,
    ):
        self._get_image = get_image
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = [str(c) for c in classes]
        self.sample_ids = (
            np.asarray(sample_ids, dtype=str)
            if sample_ids is not None
            else np.asarray([str(i) for i in range(len(self.targets))])
        )
        self.description = description
        self.files = None if files is None else [str(f) for f in files]
        self._keep = np.arange(len(self.targets))  # positions in the underlying source

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int):
        """The i-th image as an RGB PIL image (``to_rgb``: any mode, EXIF orientation applied)."""
        return to_rgb(self._get_image(int(self._keep[int(i)])))

    def without(self, positions: Sequence[int]) -> "ImageSource":
        """The same source without the samples at ``positions`` (bad files left out)."""
        drop = np.zeros(len(self.targets), dtype=bool)
        drop[np.asarray(list(positions), dtype=int)] = True
        out = ImageSource(self._get_image, self.targets[~drop], self.classes, self.sample_ids[~drop],
                          self.description, None if self.files is None else [f for f, d in zip(self.files, drop) if not d])
        out._keep = self._keep[~drop]
        return out


@dataclass(frozen=True)
class DatasetEntry:
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


def dataset_names() -> list[str]:
    return sorted(DATASETS) + [f"{IMAGEFOLDER}:PATH"]


@dataclass(frozen=True)
class DatasetName:
    """A parsed dataset name: a registry name, or ``imagefolder:PATH``.

    Attributes
    ----------
    source : str
        ``""`` for a registered dataset, ``"imagefolder"`` for a folder of class folders.
    name : str
        The registry name, or the folder's path as written.
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
        """Short name for group names and figures: the registry name or ``imagefolder``."""
        return self.source or self.name

    def matches(self, recorded: str) -> bool:
        """Whether a group's recorded dataset (canonical: absolute folder paths) is this one.

        A registry name matches itself. A folder matches its absolute path, the path this
        name resolves to from here, or a recorded path that ends in the same whole path
        components (``imagefolder:imagenet`` matches ``/data/imagenet``, never
        ``/data/tiny-imagenet``), so a store built on another machine can still be queried.
        """
        other = parse_dataset_name(recorded)
        if other.source != self.source:
            return False
        if not self.source:
            return other.name == self.name
        mine, theirs = Path(os.path.normpath(self.path)), Path(os.path.normpath(other.path))
        if mine.is_absolute():
            return mine == theirs
        if Path(os.path.abspath(mine)) == theirs:
            return True
        return len(theirs.parts) >= len(mine.parts) and theirs.parts[-len(mine.parts):] == mine.parts


def parse_dataset_name(name) -> DatasetName:
    """Split a dataset name into its source and name, checking its form (not that it exists).

    The one place that reads the ``imagefolder:`` prefix.
    """
    if not isinstance(name, str) or not name:
        raise InvalidParameterError(key="dataset", value=name,
                                    expected="a registered dataset name or imagefolder:PATH")
    source, sep, rest = name.partition(":")
    if sep and source == IMAGEFOLDER:
        if not rest:
            raise InvalidParameterError(key="dataset", value=name, expected="imagefolder:PATH with a folder path")
        return DatasetName(IMAGEFOLDER, rest)
    if "/" in name or "\\" in name or ".." in name:
        raise InvalidParameterError(
            key="dataset", value=name,
            expected=f"a registry name ({', '.join(sorted(DATASETS))}); for a folder of images use 'imagefolder:PATH'")
    return DatasetName("", name)


def is_dataset_name(name) -> bool:
    """Whether ``name`` is a registered dataset or ``imagefolder:PATH`` (the folder is not checked)."""
    try:
        return bool(_registered(name))
    except InvalidParameterError:
        return False


def _describe_names() -> str:
    return f"a registered dataset ({', '.join(sorted(DATASETS))}) or {IMAGEFOLDER}:PATH"


DatasetText = Annotated[str, Check(is_dataset_name, _describe_names)]
"""A dataset name as the build and sweeps take it."""


def _registered(name: str) -> DatasetName:
    """A dataset name that this process can load: a registered name, or a folder."""
    parsed = parse_dataset_name(name)
    if not parsed.source and parsed.name not in DATASETS:
        raise UnknownNameError("dataset", name, dataset_names())
    return parsed


def dataset_splits(name: str) -> tuple[str, ...]:
    """The split names a dataset offers."""
    parsed = _registered(name)
    if parsed.source == IMAGEFOLDER:
        return _imagefolder_splits(parsed.path)
    return DATASETS[parsed.name].splits


def canonical_dataset_name(name: str) -> str:
    """Registry name, with ``imagefolder:`` paths made absolute."""
    parsed = _registered(name)
    if parsed.source == IMAGEFOLDER:
        if not parsed.path.is_dir():
            raise InvalidParameterError(key="dataset", value=name,
                                        expected=f"imagefolder:PATH of an existing folder of class folders "
                                                 f"({str(parsed.path)!r} is not a directory)")
        return f"{IMAGEFOLDER}:{parsed.path.resolve()}"
    return parsed.name


def load_split(name: str, split: str, root: str | os.PathLike | None = None, download: bool = False,
               bad_images: str = "fail") -> ImageSource:
    """Load one split of a registered dataset.

    Parameters
    ----------
    name : str
        Registry name (see :func:`dataset_names`) or ``imagefolder:PATH``.
    split : str
        One of :func:`dataset_splits` (name).
    root : path, optional
        Where torchvision datasets live (or are downloaded to).
    download : bool
        Allow torchvision to download the dataset into ``root``.
    bad_images : {"fail", "skip"}
        What an image folder does with a class folder without images: an error, or a
        warning and no class.
    """
    parsed = parse_dataset_name(canonical_dataset_name(name))
    splits = dataset_splits(str(parsed))
    if split not in splits:
        raise UnknownNameError("split", split, splits, context=f"dataset {str(parsed)!r}")
    if parsed.source == IMAGEFOLDER:
        return _imagefolder(parsed.path, split, bad_images)
    entry = DATASETS[parsed.name]
    if entry.needs_root and root is None:
        root = os.environ.get("FEATSTORE_DATA_ROOT", "data/datasets")
    return entry.loader(split, root, download)


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


def _seeded_split(targets: np.ndarray, split: str) -> np.ndarray:
    """Fixed stratified train/test split for datasets that come without one."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        n_test = max(1, int(round(len(idx) * SPLIT_TEST_FRACTION))) if len(idx) > 1 else 0
        test.append(idx[:n_test])
    test_idx = np.sort(np.concatenate(test))
    if split == "test":
        return test_idx
    mask = np.ones(len(targets), bool)
    mask[test_idx] = False
    return np.flatnonzero(mask)


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
    idx = _seeded_split(bunch.target, split)
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


# ----------------------------------------------------------------------------- imagefolder


IMAGEFOLDER_SPLITS = ("train", "val", "test")
# A folder without split subfolders offers a seeded 80/20 train/test split of its class
# folders, or the whole folder as one split (an evaluation set such as ImageNetV2: 10,000
# images, all of them to be evaluated).
WHOLE_FOLDER = "all"


def _split_folders(path: Path) -> list[str]:
    return [s for s in IMAGEFOLDER_SPLITS if (path / s).is_dir()]


def _imagefolder_splits(path: Path) -> tuple[str, ...]:
    """The split subfolders present (an evaluation-only tree may hold just test/), else a
    seeded 80/20 train/test split of the class folders, or all of them (``all``)."""
    return tuple(_split_folders(path)) or ("train", "test", WHOLE_FOLDER)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_classes(root: Path, dataset: str, bad_images: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(file, class index)]) of a class-per-folder tree, in torchvision's
    ImageFolder order. Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``, ...)
    are ignored. A class folder without images is an error, or under ``skip`` a warning and
    no class."""
    import warnings

    if not root.is_dir():
        raise InvalidDatasetError(dataset=dataset, problem=f"{str(root)!r} is not a folder")
    names = sorted(e.name for e in root.iterdir() if e.is_dir() and not _hidden(e.name))
    files_of = {}
    for name in names:
        found = []
        for dirpath, dirnames, filenames in sorted(os.walk(root / name, followlinks=True)):
            dirnames[:] = [d for d in dirnames if not _hidden(d)]  # os.walk skips them below too
            if any(_hidden(part) for part in Path(dirpath).relative_to(root / name).parts):
                continue
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if not _hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
        files_of[name] = found
    empty = [n for n in names if not files_of[n]]
    if empty and bad_images == "fail":
        raise InvalidDatasetError(dataset=dataset, problem=f"class folders without images under {str(root)!r}: "
                                                           f"{', '.join(empty)} (add images, remove the folders, or "
                                                           f"build with --bad-images skip to leave them out)")
    if empty:
        warnings.warn(f"{dataset}: class folders without images under {root} left out: {', '.join(empty)}",
                      stacklevel=3)
    classes = [n for n in names if files_of[n]]
    if not classes:
        raise InvalidDatasetError(dataset=dataset, problem=f"no class folder with images under {str(root)!r}")
    return classes, [(f, c) for c, name in enumerate(classes) for f in files_of[name]]


def _imagefolder(path: Path, split: str, bad_images: str = "fail") -> ImageSource:
    dataset = f"{IMAGEFOLDER}:{path}"
    folders = _split_folders(path)
    if folders:
        classes, samples = _scan_classes(path / split, dataset, bad_images)
        first = folders[0]
        ref = _scan_classes(path / first, dataset, bad_images)[0] if first != split else classes
        if classes != ref:
            raise InvalidDatasetError(
                dataset=dataset, problem=f"split {split!r} has classes {classes[:5]}... but {first} has {ref[:5]}...; "
                                         f"every split needs the same class folders")
        targets = np.asarray([c for _, c in samples], dtype=np.int64)
        idx = np.arange(len(samples))
        desc = f"ImageFolder({path / split})"
    else:
        classes, samples = _scan_classes(path, dataset, bad_images)
        targets = np.asarray([c for _, c in samples], dtype=np.int64)
        if split == WHOLE_FOLDER:
            idx = np.arange(len(samples))
            desc = f"ImageFolder({path}), every image"
        else:
            idx = _seeded_split(targets, split)
            desc = f"ImageFolder({path}), seeded {1 - SPLIT_TEST_FRACTION:.0%}/{SPLIT_TEST_FRACTION:.0%} split"
    base = path / split if folders else path
    files = [samples[j][0] for j in idx]
    return ImageSource(lambda i: open_image(files[i]), targets[idx], classes,
                       [os.path.relpath(f, base) for f in files], description=desc, files=files)


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
