"""webdataset tar shards as a dataset source (``wds:URL_PATTERN``).

The pattern is a local path or any fsspec URL (``s3://bucket/{split}-{000000..000099}.tar``):
``{split}`` stands for the split, ``{a..b}`` for a zero-padded range and ``{x,y}`` for a list
(brace expansion as webdataset's). Without ``{split}`` the shards are one dataset, split
80/20 by the seeded rule (or ``all``).

Samples are grouped as webdataset groups them: consecutive tar members with the same key
(the member name up to its first dot in the last path component). A sample's image is its
first member whose extension is among ``--wds-image-key`` (``jpg;png``), its label the text
of ``--wds-label-key`` (``cls``: an integer, or a class name); its sample id is the key.

Each shard is indexed once, by reading its tar headers (member names, offsets and sizes; the
label members' few bytes), and the index is cached under ``FEATSTORE_CACHE`` (default
``~/.cache/featstore``) keyed by the shard's URL, size and modification time or ETag. An
image is then read as one byte range of its shard, so every sample is read exactly once, in
shard order, whatever the workers, and a resumed build reads only the shards that hold rows
it still needs. Each range read checks the tar header in front of it names the member, so a
stale index can never hand over another member's bytes. A missing shard, or one whose members
run past its end (truncated), is one error naming it, or under ``--bad-images skip`` a
warning and a recorded skip of the whole shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._images import SEEDED_SPLITS, ImageRef, ImageSource, open_image, split_positions
from .errors import DatasetNotFoundError, InvalidDatasetError, InvalidParameterError

__all__ = ["TarMember", "expand_pattern", "shard_urls", "index_shard", "wds_splits", "wds_load", "wds_canonical",
           "wds_identity", "DEFAULT_IMAGE_KEYS", "DEFAULT_LABEL_KEY", "SHARD_READS"]

DEFAULT_IMAGE_KEYS = "jpg;png"
DEFAULT_LABEL_KEY = "cls"
SPLIT = "{split}"
INDEX_VERSION = 1
# shards opened for their index or read for images in this process ({url: count}; tests and
# `featstore build`'s summary read it)
SHARD_READS: dict[str, int] = {}
_lock = threading.Lock()
_BRACE = re.compile(r"\{([^{}]*)\}")


def _count(url: str) -> None:
    with _lock:
        SHARD_READS[url] = SHARD_READS.get(url, 0) + 1


# ----------------------------------------------------------------------------- patterns


def expand_pattern(pattern: str) -> list[str]:
    """Brace expansion: ``{000..012}`` (zero-padded as written), ``{a,b}``; left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise InvalidParameterError(key="dataset", value=pattern, expected=(
                f"a range {{FIRST..LAST}} of integers, FIRST <= LAST (got {{{body}}})"))
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_pattern(head + item + tail)]


def _fs(url: str):
    """(fsspec filesystem, path) of a URL or local path; a protocol whose library is missing is
    one error naming the extra."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        from ._extras import require

        require(str(e).split("'")[1] if "'" in str(e) else "s3fs", f"--dataset wds:{url}")
        raise
    except ValueError as e:
        raise InvalidParameterError(key="dataset", value=f"wds:{url}", expected=f"a path or fsspec URL ({e})") \
            from None


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def wds_canonical(where: str) -> str:
    if "://" in where:
        _fs(where.replace(SPLIT, "x"))  # the protocol is known and its library installed
        return where
    path = os.path.abspath(os.path.expanduser(where))
    folder = Path(path.split("{", 1)[0]).parent
    if not folder.is_dir():
        raise InvalidParameterError(key="dataset", value=f"wds:{where}", expected=(
            f"wds:PATTERN of tar shards in an existing folder ({str(folder)!r} is not one)"))
    return path


def wds_splits(where: str, options) -> tuple[str, ...]:
    """The splits whose shards exist (``{split}`` read off the shard names), or the seeded
    train/test/all without ``{split}``."""
    if SPLIT not in where:
        return SEEDED_SPLITS
    fs, _ = _fs(where.replace(SPLIT, "x"))
    path = where.split("://", 1)[1] if "://" in where else where  # what fs.glob returns: no protocol
    found = []
    for name in fs.glob(_BRACE.sub("*", path)):
        m = re.fullmatch(_pattern_regex(path), name)
        if m and m.group("split") not in found:
            found.append(m.group("split"))
    if not found:
        raise DatasetNotFoundError(dataset=f"wds:{where}", looked_in=_BRACE.sub("*", where),
                                   how="No shard matches the pattern; check it, with {split} for the split name.")
    order = {s: i for i, s in enumerate(("train", "val", "validation", "test"))}
    return tuple(sorted(found, key=lambda s: (order.get(s, len(order)), s)))


def _pattern_regex(pattern: str) -> str:
    """A regex matching the pattern's shard names, capturing ``{split}``; other braces match
    any run of characters within one path component."""
    def literal(text):  # glob characters as the glob reads them, the rest literally
        return re.escape(text).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")

    out, pos, named = [], 0, False
    for m in _BRACE.finditer(pattern):
        out.append(literal(pattern[pos:m.start()]))
        if m.group(0) == SPLIT:
            out.append("(?P=split)" if named else "(?P<split>[^/]+?)")
            named = True
        else:
            out.append("[^/]*?")
        pos = m.end()
    out.append(literal(pattern[pos:]))
    return "".join(out)


def shard_urls(where: str, split: str | None) -> list[str]:
    """The shard URLs of ``split`` (of the whole dataset without ``{split}``), in order: the
    brace expansion, each glob (``*``, ``?``; splits often have different shard counts, as
    ``train-{000..146}`` and ``val-{000..006}``: ``{split}-*.tar``) replaced by its sorted
    matches. A glob that matches nothing is kept, to be reported missing."""
    out = []
    for url in expand_pattern(where.replace(SPLIT, split) if split is not None and SPLIT in where else where):
        if not any(c in url for c in "*?["):
            out.append(url)
            continue
        fs, path = _fs(url)
        scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
        found = sorted(fs.glob(path))
        out += [scheme + f if scheme and not f.startswith(scheme) else f for f in found] or [url]
    return out


# ----------------------------------------------------------------------------- reading


def _read_range(url: str, start: int, length: int) -> bytes:
    """``length`` bytes of a shard from ``start``: one ``pread`` locally, one range request
    through fsspec elsewhere (both safe from many threads at once)."""
    if _is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, start)
        finally:
            os.close(fd)
    else:
        fs, path = _fs(url)
        data = fs.cat_file(path, start=start, end=start + length)
    if len(data) != length:
        raise OSError(f"{url} ends at byte {start + len(data)}, before the member's end ({start + length}): "
                      f"truncated")
    return data


class TarMember(ImageRef):
    """One member of a tar shard, read as a byte range with the tar header in front of it
    checked to name this member."""

    __slots__ = ("url", "offset", "size", "name")

    def __init__(self, url: str, offset: int, size: int, name: str):
        self.url, self.offset, self.size, self.name = url, int(offset), int(size), name

    def read(self) -> bytes:
        _count(self.url)
        block = _read_range(self.url, self.offset - 512, self.size + 512)
        field = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if not field or not self.name.startswith(field):  # long names: the field holds their start
            raise OSError(f"{self.url}: the tar header at byte {self.offset - 512} names {field!r}, not "
                          f"{self.name!r}: the shard changed since it was indexed (remove the index cache "
                          f"{cache_dir()})")
        return block[512:]

    def __str__(self) -> str:
        return f"{self.url}:{self.name}"

    def __reduce__(self):
        return TarMember, (self.url, self.offset, self.size, self.name)


def cache_dir() -> Path:
    return Path(os.environ.get("FEATSTORE_CACHE") or Path.home() / ".cache" / "featstore") / "shards"


def _shard_version(url: str) -> tuple[int, str]:
    """(size, version) of a shard: its modification time or ETag; FileNotFoundError if absent."""
    fs, path = _fs(url)
    info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return int(info["size"]), str(version)


def _base_plus_ext(name: str):
    """webdataset's split of a member name into (key, extension)."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else (None, None)


def index_shard(url: str, label_key: str) -> dict:
    """Every regular member of a shard: names, data offsets and sizes, and the text of the
    ``label_key`` members (read: a few bytes each). Cached by (url, size, version)."""
    size, version = _shard_version(url)
    key = hashlib.sha256(json.dumps([INDEX_VERSION, url, size, version, label_key]).encode()).hexdigest()
    cached = cache_dir() / f"{key}.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # rebuilt below
    _count(url)
    names, offsets, sizes, labels = [], [], [], {}
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"member {info.name} runs to byte {info.offset_data + info.size}, past "
                                            f"the shard's end ({size} bytes)")
                names.append(info.name)
                offsets.append(info.offset_data)
                sizes.append(info.size)
                k, ext = _base_plus_ext(info.name)
                if ext is not None and ext.lower() == label_key.lower():
                    labels[info.name] = tar.extractfile(info).read().decode("utf-8", "replace").strip()
    except (tarfile.TarError, EOFError) as e:
        raise InvalidDatasetError(dataset=url, problem=f"not a complete tar shard: {e}") from None
    index = {"size": size, "names": names, "offsets": offsets, "sizes": sizes, "labels": labels}
    try:
        from .fileio import atomic_write

        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, json.dumps(index).encode())
    except OSError:
        pass  # an unwritable cache costs a re-read next time, nothing else
    return index


@dataclass
class _Sample:
    key: str
    url: str
    image: tuple[int, int, str] | None  # offset, size, member name
    label: str | None


def _samples(url: str, index: dict, image_keys: list[str], label_key: str) -> list[_Sample]:
    """The shard's samples, grouped as webdataset groups members (consecutive equal keys)."""
    out: list[_Sample] = []
    current, members = None, {}

    def close():
        if current is None:
            return
        image = next((members[e] for e in image_keys if e in members), None)
        label = next((index["labels"][n] for e, n in ((e, members[e][2]) for e in members)
                      if e == label_key.lower() and n in index["labels"]), None)
        out.append(_Sample(current, url, image, label))

    for name, offset, size in zip(index["names"], index["offsets"], index["sizes"]):
        k, ext = _base_plus_ext(name)
        if k is None or os.path.basename(name).startswith("__"):
            continue
        if k != current:
            close()
            current, members = k, {}
        members[ext.lower()] = (offset, size, name)
    close()
    return out


def _keys(options) -> tuple[list[str], str]:
    image = options.get("wds_image_key") or DEFAULT_IMAGE_KEYS
    label = options.get("wds_label_key") or DEFAULT_LABEL_KEY
    return [e.strip().lower() for e in image.split(";") if e.strip()], label.strip()


def _index_split(where: str, split: str, options, bad_images: str):
    """(samples, skipped [(shard, reason)]) of the split's shards, in shard order."""
    import warnings

    image_keys, label_key = _keys(options)
    samples, skipped = [], []
    for url in shard_urls(where, split if SPLIT in where else None):
        try:
            index = index_shard(url, label_key)
        except FileNotFoundError:
            problem = "missing"
        except InvalidDatasetError as e:
            problem = e.fields["problem"]
        else:
            samples += _samples(url, index, image_keys, label_key)
            continue
        if bad_images != "skip":
            raise InvalidDatasetError(dataset=f"wds:{where}", problem=(
                f"shard {url}: {problem} (nothing was built; fix the shard, or build with --bad-images skip to "
                f"leave it out, recorded with the group)"))
        warnings.warn(f"wds:{where}: shard {url} left out: {problem}", stacklevel=3)
        skipped.append((url, f"shard {problem}"))
    return samples, skipped


def _classes(labels: list[str]) -> tuple[list[str], np.ndarray]:
    if all(re.fullmatch(r"[0-9]+", v) for v in labels):
        values = np.asarray([int(v) for v in labels], dtype=np.int64)
        return [str(i) for i in range(int(values.max()) + 1)], values
    names = sorted(set(labels))
    return names, np.searchsorted(np.asarray(names), np.asarray(labels)).astype(np.int64)


def wds_load(where: str, split: str, options, bad_images: str) -> ImageSource:
    image_keys, label_key = _keys(options)
    samples, skipped = _index_split(where, split, options, bad_images)
    problems = [(s, "no image member (" + ";".join(image_keys) + ")") for s in samples if s.image is None]
    problems += [(s, f"no {label_key} member") for s in samples if s.image is not None and s.label is None]
    if problems and bad_images != "skip":
        listed = "; ".join(f"{s.url}:{s.key}: {why}" for s, why in problems[:20])
        raise InvalidDatasetError(dataset=f"wds:{where}", problem=(
            f"{len(problems)} sample(s) cannot be used: {listed}" + (" ..." if len(problems) > 20 else "")
            + " (name the members with --wds-image-key / --wds-label-key, or build with --bad-images skip)"))
    skipped += [(s.key, why) for s, why in problems]
    bad = {id(s) for s, _ in problems}
    samples = [s for s in samples if id(s) not in bad]
    if not samples:
        raise InvalidDatasetError(dataset=f"wds:{where}", problem=f"split {split!r}: no usable sample in its shards")
    seen: dict[str, str] = {}
    for s in samples:
        if s.key in seen:
            raise InvalidDatasetError(dataset=f"wds:{where}", problem=f"key {s.key!r} is in {seen[s.key]} and in "
                                                                      f"{s.url}: sample ids must be unique")
        seen[s.key] = s.url
    classes, targets = _classes([s.label for s in samples])
    positions = split_positions(targets, split) if SPLIT not in where else np.arange(len(samples))
    files = [TarMember(samples[i].url, *samples[i].image) for i in positions]
    n_shards = len({s.url for s in samples})
    source = ImageSource(lambda i: open_image(files[i]), targets[positions], classes,
                         [samples[i].key for i in positions],
                         description=f"webdataset wds:{where} [{split}], {n_shards} shards", files=files)
    source.skipped = skipped
    return source


def wds_identity(where: str, split: str, options) -> tuple[tuple[str, str], ...]:
    """The shard list with each shard's size (a changed shard, or another list, is another
    group), and the members read."""
    image_keys, label_key = _keys(options)
    listed = []
    for url in shard_urls(where, split if SPLIT in where else None):
        try:
            listed.append(f"{url} {_shard_version(url)[0]}")
        except FileNotFoundError:
            listed.append(f"{url} missing")
    digest = hashlib.sha256("\n".join(listed).encode()).hexdigest()
    return (("shards", f"{len(listed)} shards, sha256 {digest[:16]} of their URLs and sizes"),
            ("members", f"image={';'.join(image_keys)}, label={label_key}"))
