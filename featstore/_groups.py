"""A build's groups on disk: created whole (a temporary folder renamed into place, or at a
URL uploaded with its metadata last) or reopened to resume, after checking that the partial
group records the same spec and library versions."""

from __future__ import annotations

import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from . import faults
from ._chunks import CHECKSUMS, DIGEST_BYTES
from ._pass import _Target
from ._spec import ExtractionSpec
from ._store import META, FeatureStore
from .errors import StaleGroupError

__all__ = ["open_target", "versions", "NUMERIC_LIBRARIES", "chunk_columns_for"]

# Layers wider than this (flattened feature maps) get chunks that also split their columns,
# WIDE_CHUNK_COLUMNS each, so a block of columns is read without the rest of each row.
WIDE_COLUMNS = 16384
WIDE_CHUNK_COLUMNS = 8192


def chunk_columns_for(n_neurons: int) -> int:
    """Columns per chunk: the whole row, or WIDE_CHUNK_COLUMNS for layers wider than WIDE_COLUMNS."""
    return n_neurons if n_neurons <= WIDE_COLUMNS else min(n_neurons, WIDE_CHUNK_COLUMNS)


# the libraries whose versions can change the numbers a build writes; a partial group resumes
# only under the same ones (the model's own library, open_clip or transformers, is added)
NUMERIC_LIBRARIES = ("torch", "timm", "torchvision")


def versions(model_provenance: dict | None = None) -> dict[str, str]:
    """The versions a group records; ``model_provenance``'s library (open_clip_torch,
    transformers) among them."""
    import timm
    import torch
    import torchvision
    import zarr

    from . import __version__

    return {
        "featstore": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        **({model_provenance["library"]: model_provenance["version"]}
           if model_provenance and model_provenance.get("library") not in (None, *NUMERIC_LIBRARIES)
           else {}),
    }


def open_target(fs: FeatureStore, spec: ExtractionSpec, src, index, d: int, versions, winfo, device, skipped,
                 model_provenance=None, create: bool = True):
    """Create the group (atomically, via a rename) or reopen a partial one to resume (a worker
    of a shared build, ``create=False``, only reopens what its coordinator created)."""

    name = spec.group_name()
    n = len(index)
    z = fs.raw_group(name)
    if z is not None:
        meta = z.attrs.asdict().get(META, {})
        if meta.get("state") == "complete":
            return None
        stored = ExtractionSpec.from_dict(meta["spec"])
        if stored != spec:  # cannot happen unless attributes were edited: the key names the spec
            raise StaleGroupError(name=name, store=fs.path, reason=f"the partial group records another spec: "
                                                                   f"{stored.diff(spec)}")
        old = meta.get("provenance", {}).get("versions", {})
        numeric = NUMERIC_LIBRARIES + tuple(k for k in ((model_provenance or {}).get("library"),) if k)
        changed = {k: (old.get(k), v) for k, v in versions.items() if k in numeric and old.get(k) != v}
        if changed:
            raise StaleGroupError(
                name=name, store=fs.path,
                reason=f"the partial group was started with other library versions {changed}, so its finished "
                       f"chunks could differ from new ones; remove it (`featstore rm {name} --store {fs.path}`) "
                       f"and build again")
    elif not create:
        raise StaleGroupError(name=name, store=fs.path, reason="the group this worker was to fill is gone (removed "
                                                               "while the build ran?): re-run the build")
    elif "://" in fs.path:  # object storage: made here, uploaded with its metadata last
        import shutil
        import tempfile

        from .remote import put_new_group, remote_fs

        tmp = Path(tempfile.mkdtemp(prefix="featstore-group-"))
        try:
            _create_group(tmp / name, spec, src, index, d, versions, winfo, device, skipped, model_provenance)
            remote, root = remote_fs(fs.path, fs.storage_options)
            put_new_group(remote, root, tmp / name, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fs.reopen()
        z = fs.raw_group(name)
    else:
        tmp = fs.new_group_dir(name)
        _create_group(tmp, spec, src, index, d, versions, winfo, device, skipped, model_provenance)
        faults.point("group-created")
        os.replace(tmp, Path(fs.path) / name)  # atomic: the group appears whole or not at all
        fs.reopen()
        z = fs.raw_group(name)
    # a write killed mid-way leaves only a temporary file beside the chunk (zarr writes
    # to a temporary name and renames); drop them, the chunk is not marked done anyway
    # (an object store's PUT is whole or absent)
    if "://" not in fs.path:
        for leftover in (Path(fs.path) / name).rglob("*.partial"):
            leftover.unlink(missing_ok=True)
    # reopened arrays take zarr's default config, which skips writing a chunk equal to the fill
    # value: an all-zero chunk (a legitimately dead layer) would never be written, then be missing
    def writable(name):
        return z[name].with_config({"write_empty_chunks": True})

    progress = writable("progress")
    done = progress[:].astype(bool)
    views_arr = writable("views") if spec.views else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checksums = writable(CHECKSUMS) if CHECKSUMS in z.array_keys() else None
    return _Target(spec, z, n, done, writable("features"), views_arr, progress, checksums)


def _create_group(path: Path, spec: ExtractionSpec, src, index, d: int, versions, winfo, device, skipped,
                  model_provenance=None) -> None:
    import zarr
    import zarr.storage

    n = len(index)
    rows = spec.chunk_rows
    n_chunks = -(-n // rows)
    meta = {
        "state": "building",
        "spec": spec.to_dict(),
        "n_samples": n,
        "n_neurons": d,
        "classes": src.classes,
        "provenance": {
            "versions": versions,
            "weights": {"source": winfo.source, "sha256": winfo.sha256, "description": winfo.description},
            "model": model_provenance or {},  # source library and version, the constructor call, preprocessing
            "dataset": src.description,
            "device": device,
            "host": platform.node(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    if dict(spec.extra).get("bad_images") == "skip":  # the files left out, with why (featstore info, Group.skipped)
        meta["skipped"] = [{"sample": sid, "reason": why} for sid, why in skipped]
    g = zarr.open_group(zarr.storage.LocalStore(str(path)), mode="w", attributes={META: meta})
    kw = dict(config={"write_empty_chunks": True})
    cols = chunk_columns_for(d)  # a wide layer's chunks split its columns too (a group's layout, not its key)
    g.create_array("features", shape=(n, d), chunks=(rows, cols), dtype=spec.dtype, fill_value=0, **kw)
    if spec.views:
        g.create_array("views", shape=(spec.views, n, d), chunks=(1, rows, cols), dtype=spec.dtype, fill_value=0,
                       **kw)
    g.create_array("labels", data=src.targets[index].astype(np.int64))
    g.create_array("sample_index", data=index.astype(np.int64))
    ids = g.create_array("sample_ids", shape=(n,), dtype=str)
    ids[:] = np.asarray(src.sample_ids[index], dtype=str)
    g.create_array("progress", shape=(1 + spec.views, n_chunks), chunks=(1, 1), dtype="uint8", fill_value=0)
    # each chunk's content hash, written before its progress flag (``_chunks``: checked by every read)
    g.create_array(CHECKSUMS, shape=(1 + spec.views, n_chunks, -(-d // cols), DIGEST_BYTES),
                   chunks=(1, 1, -(-d // cols), DIGEST_BYTES), dtype="uint8", fill_value=0, **kw)
