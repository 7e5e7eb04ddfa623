"""`featstore build`: run a backbone once over a dataset and write Zarr feature groups.

The pass is crash-safe and resumable. Rows are processed in blocks; each group's
chunk is written (atomically, by zarr's local store) and only then marked in the
group's ``progress`` array; the group's ``state`` becomes ``complete`` only after
every chunk of every view is marked. A build killed at any moment and run again
recomputes only unmarked chunks. Forward passes overlap with compression and
writing (a writer thread), and data loading runs in DataLoader workers.
"""

from __future__ import annotations

import os
import platform
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _datasets, _faults, _models
from ._device import DEVICES, resolve_device
from ._spec import PAPER_AUGMENTATION, ExtractionSpec, TransformSpec
from ._store import DEFAULT_STORE, META, FeatureStore, Group, _check_writable
from .errors import InvalidParameterError, StaleGroupError, UnknownNameError

__all__ = ["build", "chunk_rows_for", "resolve_transform", "make_transforms", "DEVICES", "DTYPES"]

DTYPES = ("float16", "float32")
CHUNK_TARGET_BYTES = 8 << 20  # ~8 MB of uncompressed rows per chunk


def chunk_rows_for(n_neurons: int, dtype: str, target_bytes: int = CHUNK_TARGET_BYTES) -> int:
    """Rows per chunk: a power of two near ``target_bytes`` of whole rows (64..65536).

    Powers of two make the chunks of several layers written in one pass nest, so a
    block of the smallest chunk size always lies inside one chunk of every group.
    """
    itemsize = np.dtype(dtype).itemsize
    rows = max(1, target_bytes // max(1, n_neurons * itemsize))
    return int(min(65536, max(64, 1 << int(np.floor(np.log2(rows))))))


def resolve_transform(model, image_size: int | None = None) -> TransformSpec:
    """Eval preprocessing from the model's pretrained config (timm's resolve_data_config)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    size = tuple(int(v) for v in cfg["input_size"])
    if image_size is not None:
        if image_size < 8:
            raise InvalidParameterError(f"image_size={image_size!r} must be >= 8 pixels")
        size = (size[0], int(image_size), int(image_size))
    return TransformSpec(
        input_size=size,
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        crop_mode=str(cfg.get("crop_mode", "center")),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )


def make_transforms(t: TransformSpec):
    """(eval transform, augmented transform) as torchvision callables on PIL images."""
    import timm.data
    from torchvision import transforms as T

    eval_tf = timm.data.create_transform(
        input_size=t.input_size,
        is_training=False,
        interpolation=t.interpolation,
        mean=t.mean,
        std=t.std,
        crop_pct=t.crop_pct,
        crop_mode=t.crop_mode,
    )
    # the paper's train-time augmentation (appendix B), then the eval preprocessing
    aug_tf = T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25),
            T.RandomRotation(degrees=2),
            eval_tf,
        ]
    )
    return eval_tf, aug_tf


def _view_seed(seed: int, view: int, index: int) -> int:
    # one independent stream per (seed, view, sample): identical whatever the worker,
    # batch or resume point
    return int(np.random.SeedSequence([seed, view, index]).generate_state(1)[0])


class _Items:
    """Map-style dataset of (view, row) items -> preprocessed image tensors."""

    def __init__(self, source, index: np.ndarray, eval_tf, aug_tf, seed: int):
        self.source = source
        self.index = index
        self.eval_tf = eval_tf
        self.aug_tf = aug_tf
        self.seed = seed

    def __len__(self):
        return len(self.index)

    def __getitem__(self, item):
        import torch

        view, row = item
        img = self.source.image(self.index[row])
        if view == 0:
            return self.eval_tf(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_view_seed(self.seed, view, int(self.index[row])))
            return self.aug_tf(img)


@dataclass
class _Target:
    """One group being written in this pass."""

    spec: ExtractionSpec
    zgroup: object
    n: int
    done: np.ndarray  # (1 + views, n_chunks) bool
    features: object
    views: object
    progress: object

    @property
    def rows(self) -> int:
        return self.spec.chunk_rows


def _versions() -> dict[str, str]:
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
    }


def _parse_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    else:
        items = [str(v) for v in value]
    if not items:
        raise InvalidParameterError(f"{name}={value!r} names nothing")
    return items


def build(
    model: str = _models.EMBEDDED_MODEL,
    *,
    weights: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    mapping: str = "names",
    layers: Sequence[str] | str = ("pre_logits",),
    pooling: str = "avg",
    dataset: str = "fashion-mnist",
    splits: Sequence[str] | str = ("train", "test"),
    root: str | os.PathLike | None = None,
    download: bool = False,
    limit: int | None = None,
    seed: int = 0,
    views: int = 0,
    dtype: str = "float16",
    store: str | os.PathLike = DEFAULT_STORE,
    batch_size: int | None = None,
    workers: int = 0,
    device: str = "auto",
    image_size: int | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
    wait: bool = True,
    log=None,
) -> list[Group]:
    """Extract features once and write one group per (layer, split).

    Parameters
    ----------
    model : str
        timm architecture name.
    weights : {"embedded", "hub", "checkpoint", "random"}, optional
        Weight source; default ``embedded`` for tf_efficientnet_lite0, else ``hub``.
    checkpoint : path, optional
        File for ``weights="checkpoint"`` (safetensors or a torch state dict).
    mapping : {"names", "positional"}
        How checkpoint tensors map onto the model.
    layers : list of str or comma-separated str
        ``pre_logits`` and/or module names; all come from one backbone pass.
    pooling : {"avg", "max", "cls", "flatten"}
        Reduction of spatial maps / token sequences of module layers.
    dataset, splits, root, download
        What to run on (see ``featstore.dataset_names()``).
    limit : int, optional
        Stratified, seeded subset of each split.
    seed : int
        Seed of ``limit`` and of the augmented views.
    views : int
        Extra augmented passes over the train split.
    dtype : {"float16", "float32"}
        Storage dtype.
    store : path or URL
        Store root.
    batch_size, workers, device
        Forward-pass settings (``device="auto"`` uses CUDA when present, with autocast).
        ``batch_size=None`` picks 16 on CPU (cache-friendly) and 256 on CUDA.
    image_size : int, optional
        Override the model's input resolution (tests, quick looks).
    chunk_rows : int, optional
        Rows per chunk (default: a power of two near 8 MB).
    progress : bool
        Show a progress bar with images/s.
    wait : bool
        When another build holds a group's lock, wait for it (else raise).

    Returns
    -------
    list of Group
        The complete groups, one per (layer, split).
    """
    import torch

    say = log or (lambda msg: print(msg, file=sys.stderr))
    # ---- validate everything before touching the disk
    layers = _parse_list(layers, "layers")
    splits = _parse_list(splits, "splits")
    if dtype not in DTYPES:
        raise UnknownNameError("dtype", dtype, DTYPES)
    if pooling not in _models.POOLINGS:
        raise UnknownNameError("pooling", pooling, _models.POOLINGS)
    for name, value, low in (("limit", limit, 1), ("views", views, 0), ("batch_size", batch_size, 1),
                             ("workers", workers, 0), ("seed", seed, 0)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low):
            raise InvalidParameterError(f"{name}={value!r} must be an integer >= {low}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise InvalidParameterError(f"chunk_rows={chunk_rows!r} must be a positive integer")
    dataset = _datasets.canonical_dataset_name(dataset)
    valid_splits = _datasets.dataset_splits(dataset)
    for split in splits:
        if split not in valid_splits:
            raise UnknownNameError(f"split of dataset {dataset!r}", split, valid_splits)
    device = resolve_device(device)
    on_gpu = device.startswith("cuda")
    if batch_size is None:
        batch_size = 256 if on_gpu else 16
    _check_writable(str(store))
    FeatureStore.check_foreign(str(store))

    backbone, winfo = _models.create_backbone(model, weights, checkpoint, mapping, seed=seed)
    extractor = _models.FeatureExtractor(backbone, layers, pooling, model)
    tspec = resolve_transform(backbone, image_size)
    eval_tf, aug_tf = make_transforms(tspec)
    compute = "autocast-float16" if on_gpu else "float32"

    # probe the output widths with one tiny forward pass (cheap, catches bad layers early)
    with torch.no_grad():
        dummy = torch.zeros((1,) + tuple(tspec.input_size))
        widths = {k: int(v.shape[1]) for k, v in extractor(dummy).items()}

    sources = {split: _datasets.load_split(dataset, split, root, download) for split in splits}
    for split, src in sources.items():
        if len(src) == 0:
            raise InvalidParameterError(f"split {split!r} of dataset {dataset!r} is empty")

    fs = FeatureStore(store, mode="a")
    versions = _versions()
    built: list[Group] = []
    # channels_last is ~2x faster for these convnets on CPU and the norm on GPU
    backbone.to(device=device, memory_format=torch.channels_last)
    for split in splits:
        src = sources[split]
        index = _datasets.stratified_subset(src.targets, limit, seed)
        n_views = views if split == "train" else 0
        specs = {}
        for layer in layers:
            d = widths[layer]
            specs[layer] = ExtractionSpec(
                model=model,
                weights=winfo.source,
                weights_sha256=winfo.sha256,
                layer=layer,
                pooling="model" if layer == _models.PRE_LOGITS else pooling,
                dataset=dataset,
                split=split,
                limit=limit,
                seed=seed,
                views=n_views,
                dtype=dtype,
                compute=compute,
                transform=tspec,
                augmentation=PAPER_AUGMENTATION if n_views else "",
                chunk_rows=chunk_rows or chunk_rows_for(d, dtype),
            )
        names = [s.group_name() for s in specs.values()]

        def on_wait(name, holder):
            say(f"featstore: group {name} is being built by {holder}; waiting for it to finish ...")

        with fs.lock(names, wait=wait, on_wait=on_wait):
            fs.reopen()
            targets = []
            for layer, spec in specs.items():
                t = _open_target(fs, spec, src, index, widths[layer], versions, winfo, device, dataset)
                if t is None:
                    say(f"featstore: {spec.group_name()} is already complete")
                else:
                    targets.append((layer, t))
            if targets:
                _run_pass(extractor, backbone, targets, src, index, eval_tf, aug_tf, seed, n_views,
                          batch_size, workers, device, progress, f"{model}:{dataset}:{split}")
            fs.reopen()
            built.extend(fs.group(name) for name in names)
    extractor.close()
    return built


def _open_target(fs: FeatureStore, spec: ExtractionSpec, src, index, d: int, versions, winfo, device, dataset):
    """Create the group (atomically, via a rename) or reopen a partial one to resume."""

    name = spec.group_name()
    n = len(index)
    z = fs.raw_group(name)
    if z is not None:
        meta = z.attrs.asdict().get(META, {})
        if meta.get("state") == "complete":
            return None
        stored = ExtractionSpec.from_dict(meta["spec"])
        if stored != spec:  # cannot happen unless attributes were edited: the key names the spec
            raise StaleGroupError(f"partial group {name} records another spec: {stored.diff(spec)}")
        old = meta.get("provenance", {}).get("versions", {})
        changed = {k: (old.get(k), v) for k, v in versions.items() if k in ("torch", "timm", "torchvision") and old.get(k) != v}
        if changed:
            raise StaleGroupError(
                f"partial group {name} was started with other library versions {changed}; its "
                f"finished chunks could differ from new ones. Remove it (`featstore rm {name} --store "
                f"{fs.path}`) and build again."
            )
    else:
        tmp = fs.new_group_dir(name)
        _create_group(tmp, spec, src, index, d, versions, winfo, device)
        _faults.point("group-created")
        os.replace(tmp, Path(fs.path) / name)  # atomic: the group appears whole or not at all
        fs.reopen()
        z = fs.raw_group(name)
    # a write killed mid-way leaves only a temporary file beside the chunk (zarr writes
    # to a temporary name and renames); drop them, the chunk is not marked done anyway
    for leftover in (Path(fs.path) / name).rglob("*.partial"):
        leftover.unlink(missing_ok=True)
    progress = z["progress"]
    done = progress[:].astype(bool)
    views_arr = z["views"] if spec.views else None
    return _Target(spec, z, n, done, z["features"], views_arr, progress)


def _create_group(path: Path, spec: ExtractionSpec, src, index, d: int, versions, winfo, device) -> None:
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
            "dataset": src.description,
            "device": device,
            "host": platform.node(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    g = zarr.open_group(zarr.storage.LocalStore(str(path)), mode="w", attributes={META: meta})
    kw = dict(config={"write_empty_chunks": True})
    g.create_array("features", shape=(n, d), chunks=(rows, d), dtype=spec.dtype, fill_value=0, **kw)
    if spec.views:
        g.create_array("views", shape=(spec.views, n, d), chunks=(1, rows, d), dtype=spec.dtype, fill_value=0, **kw)
    g.create_array("labels", data=src.targets[index].astype(np.int64))
    g.create_array("sample_index", data=index.astype(np.int64))
    ids = g.create_array("sample_ids", shape=(n,), dtype=str)
    ids[:] = np.asarray(src.sample_ids[index], dtype=str)
    g.create_array("progress", shape=(1 + spec.views, n_chunks), chunks=(1, 1), dtype="uint8", fill_value=0)


def _run_pass(extractor, backbone, targets, src, index, eval_tf, aug_tf, seed, n_views, batch_size,
              workers, device, show_progress, label):
    """One backbone pass over the rows and views still missing in any target group."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    n = len(index)
    block = min(t.rows for _, t in targets)  # every chunk size is a multiple of it (powers of two)
    # blocks still needed, view-major so that each group buffers one chunk at a time
    work = []
    for view in range(1 + n_views):
        for start in range(0, n, block):
            if any(not t.done[view, start // t.rows] for _, t in targets):
                work.append((view, start, min(start + block, n)))
    todo_images = sum(stop - start for _, start, stop in work)
    if not todo_images:
        _finish(targets, 0.0, 0)
        return
    batches = []
    for view, start, stop in work:
        for b in range(start, stop, batch_size):
            batches.append([(view, r) for r in range(b, min(b + batch_size, stop))])
    items = _Items(src, index, eval_tf, aug_tf, seed)
    loader = DataLoader(
        items,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    writer = _Writer()
    buffers: dict[tuple[int, int, int], np.ndarray] = {}  # (target#, view, chunk) -> rows
    filled: dict[tuple[int, int, int], int] = {}
    t0 = time.perf_counter()
    # in a log file (not a terminal) a redraw every 10 s keeps the log readable
    bar = tqdm(total=todo_images, unit="img", desc=label, disable=not show_progress, smoothing=0.1,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else _nullcontext()
    try:
        with torch.inference_mode():
            for batch, x in zip(batches, loader):
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with autocast:
                    out = extractor(x)
                view = batch[0][0]
                r0, r1 = batch[0][1], batch[-1][1] + 1
                for ti, (layer, t) in enumerate(targets):
                    c = r0 // t.rows
                    if t.done[view, c]:
                        continue
                    key = (ti, view, c)
                    if key not in buffers:
                        c_rows = min(t.rows, n - c * t.rows)
                        buffers[key] = np.empty((c_rows, out[layer].shape[1]), dtype=t.spec.dtype)
                        filled[key] = 0
                    buffers[key][r0 - c * t.rows : r1 - c * t.rows] = out[layer].float().cpu().numpy()
                    filled[key] += r1 - r0
                    if filled[key] == len(buffers[key]):
                        writer.submit(t, view, c, buffers.pop(key))
                        del filled[key]
                bar.update(r1 - r0)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    _finish(targets, time.perf_counter() - t0, todo_images)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _finish(targets, seconds: float, images: int) -> None:
    for _, t in targets:
        done = t.progress[:].astype(bool)
        if not done.all():  # pragma: no cover - a bug, never a user error
            raise RuntimeError(f"internal error: {t.spec.group_name()} has unwritten chunks {np.argwhere(~done)[:5]}")
        meta = dict(t.zgroup.attrs.asdict()[META])
        meta["state"] = "complete"
        timings = dict(meta.get("timings", {}))
        timings["seconds"] = round(timings.get("seconds", 0.0) + seconds, 3)
        timings["images_this_run"] = images
        timings["images_per_second"] = round(images / seconds, 2) if seconds else None
        timings["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["timings"] = timings
        _faults.point("finish")
        # one atomic write of zarr.json: the group flips from building to complete
        t.zgroup.attrs.update({META: meta})


class _Writer:
    """Background thread that writes finished chunks, then marks them in ``progress``.

    The queue is bounded so memory stays at a few chunks; an error in the thread is
    raised in the caller at the next submit or at close.
    """

    def __init__(self, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="featstore-writer", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is not None:
                continue
            t, view, c, data = job
            try:
                start = c * t.rows
                if view == 0:
                    t.features[start : start + len(data)] = data
                else:
                    t.views[view - 1, start : start + len(data)] = data
                _faults.point("chunk-data")
                # only after the chunk is on disk is it recorded as done
                t.progress[view, c] = 1
                t.done[view, c] = True
                _faults.point("chunk-mark")
            except OSError as e:  # disk full, permission denied, I/O error
                from .errors import StoreError

                self._error = StoreError(
                    f"writing chunk {c} of view {view} of group {t.spec.group_name()} failed: "
                    f"{e.strerror or e} ({type(e).__name__}). Finished chunks are kept and the group stays "
                    f"'building'; fix the cause (free space, permissions) and re-run the same command to resume.")
                self._error.__cause__ = e
            except BaseException as e:  # re-raised in the main thread
                self._error = e

    def _raise(self):
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, t, view, c, data):
        self._raise()
        self._q.put((t, view, c, data))

    def close(self):
        self._q.put(None)
        self._thread.join()
        self._raise()

    def abort(self):
        # drain what is queued (finished chunks are worth keeping), then stop
        with_error = self._error
        self._q.put(None)
        self._thread.join(timeout=60)
        if with_error is None:
            self._error = None
