"""Class-per-folder image trees (``imagefolder:PATH``): the split layout and the walk.

Each folder is walked once: a directory is entered at most once (by device and inode), so a
symlink loop (``a/loop -> .``) or a second link to a folder already walked adds nothing; a
link that leads to the dataset's own root or above it is not followed; every file counts once
(by real path), and one file under two classes is an error. A tree on a pseudo-filesystem
(``/proc``, ``/sys``) is refused before it is walked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._images import IMAGE_EXTENSIONS, SEEDED_SPLITS, SPLIT_TEST_FRACTION, WHOLE_SPLIT, ImageSource, open_image, \
    seeded_split
from .errors import InvalidDatasetError

__all__ = ["IMAGEFOLDER_SPLITS", "WHOLE_FOLDER", "imagefolder_splits", "load_imagefolder"]

IMAGEFOLDER_SPLITS = ("train", "val", "test")
# A folder without split subfolders offers a seeded 80/20 train/test split of its class
# folders, or the whole folder as one split (an evaluation set such as ImageNetV2: 10,000
# images, all of them to be evaluated).
WHOLE_FOLDER = WHOLE_SPLIT


# Filesystems that hold no image data: an image folder on one is refused before it is walked
# (``imagefolder:/proc`` would otherwise follow /proc/*/root into the whole machine).
PSEUDO_FILESYSTEMS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                                "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs"})


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _has_subfolders(path: Path) -> bool:
    try:
        return any(e.is_dir() and not _hidden(e.name) for e in os.scandir(path))
    except OSError:
        return False


def _split_folders(path: Path) -> list[str]:
    """The split subfolders (train/, val/, test/) of a tree: split-named folders that hold class
    folders. A folder named like a split that holds images itself is a class (a tree whose classes
    include "train"); a tree that mixes both is an error."""
    named = [s for s in IMAGEFOLDER_SPLITS if (path / s).is_dir()]
    splits = [s for s in named if _has_subfolders(path / s)]
    if splits and len(splits) < len(named):
        classes = sorted(set(named) - set(splits))
        raise InvalidDatasetError(
            dataset=f"imagefolder:{path}",
            problem=f"{', '.join(splits)} hold class folders (split folders) but {', '.join(classes)} hold images "
                    f"(class folders): rename the class folder(s) named like a split, or put every split's classes "
                    f"in its own split folder")
    return splits


def imagefolder_splits(path: Path) -> tuple[str, ...]:
    """The split subfolders present (an evaluation-only tree may hold just test/), else a
    seeded 80/20 train/test split of the class folders, or all of them (``all``)."""
    return tuple(_split_folders(path)) or SEEDED_SPLITS


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` lies on (Linux: the longest mount point above it)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    real, best = os.path.realpath(path), (None, -1)
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) > best[1]:
                best = (parts[2], len(point))
    return best[0]


def _walk(top: Path, root_real: str, entered: dict) -> list[tuple[str, str]]:
    """(folder, file name) of every image file under ``top``, each folder entered once.

    ``entered`` maps (device, inode) of every folder entered so far (across class folders) to
    its path: a symlinked folder leading to one of them (a loop, or a second link to a folder
    already walked) adds nothing, and one leading to the dataset root or above it is not
    followed. Hidden files and folders are skipped."""
    found, stack = [], [str(top)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise InvalidDatasetError(dataset=f"imagefolder:{top}", problem=f"cannot list {folder!r}: "
                                                                            f"{e.strerror or e}") from None
        for e in entries:
            if _hidden(e.name):
                continue
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                continue  # a dangling link
            if is_dir:
                st = e.stat(follow_symlinks=True)
                key = (st.st_dev, st.st_ino)
                real = os.path.realpath(e.path)
                if key in entered or root_real == real or root_real.startswith(real.rstrip("/") + "/"):
                    continue  # a loop, a folder already walked, or the tree's own root or above it
                entered[key] = e.path
                stack.append(e.path)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((folder, e.name))
    return sorted(found)  # torchvision's order: by folder path, then by file name


def _scan_classes(root: Path, dataset: str, bad_images: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(file, class index)]) of a class-per-folder tree, in torchvision's
    ImageFolder order. Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``, ...)
    are ignored; each folder is walked once and each file counted once (see the module). A
    class folder without images is an error, or under ``skip`` a warning and no class; a class
    folder that is another class folder (a link) and a file under two classes are errors."""
    import warnings

    if not root.is_dir():
        raise InvalidDatasetError(dataset=dataset, problem=f"{str(root)!r} is not a folder")
    kind = _filesystem_type(root)
    if kind in PSEUDO_FILESYSTEMS:
        raise InvalidDatasetError(dataset=dataset, problem=f"{str(root)!r} is on a {kind} filesystem, which holds no "
                                                           f"image files; give the folder of class folders")
    root_real = os.path.realpath(root)
    names = sorted(e.name for e in root.iterdir() if e.is_dir() and not _hidden(e.name))
    entered: dict = {}
    files_of, owner = {}, {}
    for name in names:
        st = (root / name).stat()
        if (st.st_dev, st.st_ino) in entered:
            raise InvalidDatasetError(dataset=dataset, problem=f"class folder {name!r} is the folder "
                                                               f"{entered[(st.st_dev, st.st_ino)]!r} again (a link): "
                                                               f"its images would count under two classes")
        entered[(st.st_dev, st.st_ino)] = str(root / name)
        files = []
        for folder, file in _walk(root / name, root_real, entered):
            path = os.path.join(folder, file)
            real = os.path.realpath(path)
            if real in owner:
                if owner[real][0] != name:
                    raise InvalidDatasetError(dataset=dataset, problem=f"{path!r} and {owner[real][1]!r} are one file "
                                                                       f"under two classes ({owner[real][0]}, {name})")
                continue  # the same file twice in one class (a link): counted once
            owner[real] = (name, path)
            files.append(path)
        files_of[name] = files
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


def load_imagefolder(path: Path, split: str, bad_images: str = "fail") -> ImageSource:
    """One split of a class-per-folder tree (its split subfolder, a seeded share, or all of it)."""
    dataset = f"imagefolder:{path}"
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
            idx = seeded_split(targets, split)
            desc = f"ImageFolder({path}), seeded {1 - SPLIT_TEST_FRACTION:.0%}/{SPLIT_TEST_FRACTION:.0%} split"
    base = path / split if folders else path
    files = [samples[j][0] for j in idx]
    return ImageSource(lambda i: open_image(files[i]), targets[idx], classes,
                       [os.path.relpath(f, base) for f in files], description=desc, files=files)
