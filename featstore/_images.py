"""Images as a model takes them: one decoding rule for every file-reading source, the
bad-file check, and :class:`ImageSource`, one split of a dataset as random access."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

__all__ = ["ImageSource", "ImageRef", "to_rgb", "open_image", "read_image_bytes", "image_problem", "check_images",
           "seeded_split", "split_positions", "SEEDED_SPLITS", "WHOLE_SPLIT", "IMAGE_EXTENSIONS", "BAD_IMAGE_POLICIES", "SPLIT_SEED", "SPLIT_TEST_FRACTION"]

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


class ImageRef:
    """An image's encoded bytes that are not a file of their own: a member of a tar shard, a cell
    of a table, a URL. Sources that read such bytes give a sequence of these as their ``files``;
    every rule for files (the decoding, the bad-file check, the device decoder) takes them too.

    Subclasses implement ``read() -> bytes`` and ``__str__`` (where it is, for messages); they
    must pickle cheaply (DataLoader workers receive them)."""

    def read(self) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError


def read_image_bytes(ref) -> bytes:
    """The encoded bytes of a file path or an :class:`ImageRef`."""
    if isinstance(ref, ImageRef):
        return ref.read()
    with open(ref, "rb") as f:
        return f.read()


def _opened(ref):
    """What ``PIL.Image.open`` takes for ``ref``: the path itself, or the bytes of a reference."""
    import io

    return io.BytesIO(ref.read()) if isinstance(ref, ImageRef) else ref


def open_image(path):
    """A file's image (a path or an :class:`ImageRef`) as RGB (``to_rgb``), fully decoded; a
    decompression bomb is refused."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(_opened(path)) as img:
            img.load()
            return to_rgb(img)


def image_problem(path) -> str | None:
    """Why a file cannot serve as an image ("empty", "not an image", "truncated or corrupt",
    "decompression bomb ...", "unreadable ..."), or None when it can. Fast: JPEGs are decoded at
    1/8 scale (truncation still shows), PNGs checked chunk by chunk (CRCs), others decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        source = _opened(path)
        if (source.getbuffer().nbytes if hasattr(source, "getbuffer") else os.path.getsize(source)) == 0:
            return "empty"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
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
    files : sequence of path or ImageRef, optional
        The encoded image behind each sample, for sources that read encoded images (checked
        before a build): file paths, or :class:`ImageRef` (tar members, table cells, URLs).
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
        self.files = None if files is None else [f if isinstance(f, ImageRef) else str(f) for f in files]
        self._keep = np.arange(len(self.targets))  # positions in the underlying source
        # (sample or container id, reason) of what the source itself left out under
        # --bad-images skip (a missing shard): recorded with the group, beside the bad files
        self.skipped: list[tuple[str, str]] = []

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
        out.skipped = list(self.skipped)
        return out


# A dataset without splits of its own offers a seeded 80/20 train/test split, or every sample
# as one split (an evaluation set: all of it to be evaluated).
WHOLE_SPLIT = "all"
SEEDED_SPLITS = ("train", "test", WHOLE_SPLIT)


def split_positions(targets: np.ndarray, split: str) -> np.ndarray:
    """Positions of ``split`` (one of :data:`SEEDED_SPLITS`) in a dataset without its own splits."""
    return np.arange(len(targets)) if split == WHOLE_SPLIT else seeded_split(targets, split)


def seeded_split(targets: np.ndarray, split: str) -> np.ndarray:
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
