"""The build's backbone pass: items loaded in order (DataLoader workers, or threads for the
device-decode path), each block of outputs checked, buffered per chunk and handed to a writer
thread that writes the chunk and only then marks it done; the groups flip to complete at the
end. What the pass writes into is a :class:`_Target` per group, opened by ``_build``.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import faults
from ._chunks import chunk_digests
from ._spec import ExtractionSpec
from ._store import META
from ._values import SpreadTracker, check_values
from .errors import BadImagesError, FeatstoreError, WriteFailedError

__all__ = ["FORWARD_PRECISIONS", "run_pass", "PassStats", "finish_group"]

# The forward's precision: what each --precision records as the group's ``compute`` (part of
# its key) and the autocast dtype it runs under (None: plain float32, TF32 off on CUDA).
FORWARD_PRECISIONS = {"fp32": ("float32", None), "fp16": ("autocast-float16", "float16"),
                      "bf16": ("autocast-bfloat16", "bfloat16")}


def _view_seed(seed: int, view: int, index: int) -> int:
    # one independent stream per (seed, view, sample): identical whatever the worker,
    # batch or resume point
    return int(np.random.SeedSequence([seed, view, index]).generate_state(1)[0])


class _Items:
    """Map-style dataset of (view, row) items -> preprocessed image tensors.

    With ``raw_jpeg`` (``decode="device"``), a clean-pass item whose file is a JPEG the device
    path takes is its file's bytes instead, decoded and preprocessed in the main process on
    the device (``_decode.DevicePreprocess``); items are then (tensor, failure, is_raw).
    """

    def __init__(self, source, index: np.ndarray, eval_tf, aug_tf, seed: int, shape: tuple[int, ...],
                 raw_jpeg: bool = False):
        self.source = source
        self.index = index
        self.eval_tf = eval_tf
        self.aug_tf = aug_tf
        self.seed = seed
        self.shape = shape
        self.raw_jpeg = raw_jpeg and source.files is not None

    def __len__(self):
        return len(self.index)

    def __getitem__(self, item):
        if not self.raw_jpeg:
            return self.pil_item(*item)
        import torch

        from ._decode import raw_jpeg

        view, row = item
        if view == 0:
            try:
                data = raw_jpeg(self.source.files[int(self.index[row])])
            except OSError:
                data = None  # unreadable: the PIL path names the file and why
            if data is not None:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), "", True
        return (*self.pil_item(view, row), False)

    def pil_item(self, view, row):
        """(the preprocessed image, "") or, when the file cannot be decoded, (zeros, "path: reason"):
        the pass stops at the batch holding it and names it (a DataLoader worker's exception
        would lose which file it was)."""
        import torch

        try:
            img = self.source.image(self.index[row])
        except Exception as e:  # decoding is the file's problem, never the pass's
            files = self.source.files
            where = files[int(self.index[row])] if files else self.source.sample_ids[int(self.index[row])]
            return torch.zeros(self.shape), f"{where}: {type(e).__name__}: {e}"
        if view == 0:
            return self.eval_tf(img), ""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_view_seed(self.seed, view, int(self.index[row])))
            return self.aug_tf(img), ""


def _thread_batches(batches, items: _Items, threads: int, ahead: int = 4):
    """The items of each batch, loaded by a thread pool ``ahead`` batches in advance (file reads
    and PIL's decoding release the GIL), in order."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="featstore-read") as pool:
        pending: deque = deque()
        todo = iter(batches)
        for b in itertools.islice(todo, ahead):
            pending.append(pool.map(items.__getitem__, b))
        while pending:
            got = list(pending.popleft())
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.map(items.__getitem__, nxt))
            yield got


def _collate_items(items):
    return items  # device decoding: raw JPEG bytes of varying length, assembled by _device_batch


def _device_batch(got, batch, items: _Items, decoder, device):
    """(the batch (B, 3, H, W) on the device, failures) from items of the device-decode path:
    raw JPEGs decoded and preprocessed together there, the rest (PIL-preprocessed) copied in."""
    import torch

    parts: list = [None] * len(got)
    failures = [f for _, f, _ in got]
    raw = [i for i, (_, _, is_raw) in enumerate(got) if is_raw]
    if raw:
        for i, t in zip(raw, decoder([got[i][0] for i in raw])):
            if t is None:  # the device decoder refused the file: PIL takes it, here
                t, failures[i] = items.pil_item(*batch[i])
                t = t.to(device)
            parts[i] = t
    rest = [i for i, (_, _, is_raw) in enumerate(got) if not is_raw]
    if rest:
        moved = torch.stack([got[i][0] for i in rest]).to(device, non_blocking=True)
        for j, i in enumerate(rest):
            parts[i] = moved[j]
    return torch.stack(parts), failures


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
    checksums: object = None  # None: a partial group begun before builds recorded content hashes

    @property
    def rows(self) -> int:
        return self.spec.chunk_rows


def _forward_context(precision: str, device: str):
    """The autocast of ``precision`` on ``device`` (fp32: none, and TF32 off on CUDA)."""
    import contextlib

    import torch

    dtype = FORWARD_PRECISIONS[precision][1]
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype is not None:
        return torch.autocast(device_type, dtype=getattr(torch, dtype))
    if device_type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def no_tf32():
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    return no_tf32()


def run_pass(extractor, backbone, targets, src, index, eval_tf, aug_tf, seed, n_views, batch_size,
              workers, device, show_progress, label, decoder=None, precision: str = "fp32", say=None,
              rows: tuple[int, int] | None = None, finish: bool = True, guard=None) -> "PassStats":
    """One backbone pass over the rows and views still missing in any target group.

    Every block of every layer's outputs is checked before it is buffered (finite; within
    float16's range for float16 groups: ``_values.check_values``); float16 groups also track
    each neuron's spread, and a layer that float16 stores coarsely is reported and recorded.

    ``rows = (start, stop)`` restricts the pass to those rows (both multiples of every target's
    chunk rows, or stop = n): one worker's range of a build shared by many. ``finish=False``
    leaves the groups building (the worker that sets the last flag finishes them). ``guard()``
    is called before each chunk is written (it raises once the build's lock is lost)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    n = len(index)
    block = min(t.rows for _, t in targets)  # every chunk size is a multiple of it (powers of two)
    first, last = rows if rows is not None else (0, n)
    # blocks still needed, view-major so that each group buffers one chunk at a time
    work = []
    for view in range(1 + n_views):
        for start in range(first, min(last, n), block):
            if any(not t.done[view, start // t.rows] for _, t in targets):
                work.append((view, start, min(start + block, n)))
    todo_images = sum(stop - start for _, start, stop in work)
    if not todo_images:
        if finish:
            _finish(targets, 0.0, 0, {}, say)
        return PassStats(0, 0.0, {})
    batches = []
    for view, start, stop in work:
        for b in range(start, stop, batch_size):
            batches.append([(view, r) for r in range(b, min(b + batch_size, stop))])
    items = _Items(src, index, eval_tf, aug_tf, seed, shape=tuple(targets[0][1].spec.transform.input_size),
                   raw_jpeg=decoder is not None)
    def data_loader(sampler):
        return DataLoader(items, batch_sampler=sampler, collate_fn=_collate_items if items.raw_jpeg else None,
                          num_workers=workers, pin_memory=device.startswith("cuda"), persistent_workers=False,
                          prefetch_factor=4 if workers else None)

    if items.raw_jpeg:
        # the clean pass ships file bytes: threads read them here (worker processes would send each
        # through shared memory, measured ~2,400 files/s on 15 workers); views keep their workers
        clean = [b for b in batches if b[0][0] == 0]
        views = [b for b in batches if b[0][0] != 0]
        loader = itertools.chain(_thread_batches(clean, items, max(2, workers)),
                                 data_loader(views) if views else ())
        batches = clean + views
    else:
        loader = data_loader(batches)
    writer = _Writer(guard=guard)
    buffers: dict[tuple[int, int, int], np.ndarray] = {}  # (target#, view, chunk) -> rows
    filled: dict[tuple[int, int, int], int] = {}
    t0 = time.perf_counter()
    # in a log file (not a terminal) a redraw every 10 s keeps the log readable
    bar = tqdm(total=todo_images, unit="img", desc=label, disable=not show_progress, smoothing=0.1,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    autocast = _forward_context(precision, device)
    spreads = {ti: SpreadTracker(t.features.shape[1]) for ti, (_, t) in enumerate(targets) if t.spec.dtype == "float16"}
    try:
        with torch.inference_mode():
            for batch, got in zip(batches, loader):
                x, failures = _device_batch(got, batch, items, decoder, device) if items.raw_jpeg else got
                failed = [f for f in failures if f]
                if failed:  # a file the check did not catch (or no check): stop here, resumable
                    raise BadImagesError(
                        dataset=label, files=failed,
                        fix="The groups stay 'building' with every chunk written so far: replace or remove the "
                            "file(s) and re-run the same command to resume, or build with --bad-images skip (and "
                            "the check on) to leave such files out")
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
                    values = out[layer].float().cpu().numpy()
                    # before the block is cast to the storage dtype (float16 would turn an overflow into inf)
                    check_values(values, t.spec.dtype, layer=layer, group=t.spec.group_name(), rows=(r0, r1),
                                 view=view)
                    if ti in spreads:
                        spreads[ti].add(values)
                    if key not in buffers:
                        c_rows = min(t.rows, n - c * t.rows)
                        buffers[key] = np.empty((c_rows, out[layer].shape[1]), dtype=t.spec.dtype)
                        filled[key] = 0
                    buffers[key][r0 - c * t.rows : r1 - c * t.rows] = values
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
    stats = PassStats(todo_images, time.perf_counter() - t0, spreads)
    if finish:
        _finish(targets, stats.seconds, todo_images, {ti: sp.coarse() for ti, sp in spreads.items()}, say)
    return stats


@dataclass
class PassStats:
    """What one pass did: images forwarded, seconds, and (float16 groups, by target number)
    the per-neuron spread sums, to merge with other workers' before the group is finished."""

    images: int
    seconds: float
    spreads: dict


def _finish(targets, seconds: float, images: int, coarse: dict, say=None) -> None:
    """Flip each target to complete, with its timings and (float16) the neurons it stores coarsely."""
    for ti, (layer, t) in enumerate(targets):
        finish_group(t, layer, seconds, images, images / seconds if seconds else None, coarse.get(ti), say)


def finish_group(t, layer: str, seconds: float, images: int, rate: float | None, coarse: dict | None, say=None,
                 extra_timings: dict | None = None) -> None:
    """Flip one group to complete (every flag must be set), adding ``seconds`` of work on
    ``images`` images at ``rate`` images/s to its timings; ``coarse``: the float16 report."""
    done = t.progress[:].astype(bool)
    if not done.all():  # pragma: no cover - a bug, never a user error
        raise RuntimeError(f"internal error: {t.spec.group_name()} has unwritten chunks {np.argwhere(~done)[:5]}")
    meta = dict(t.zgroup.attrs.asdict()[META])
    meta["state"] = "complete"
    timings = dict(meta.get("timings", {}))
    timings["seconds"] = round(timings.get("seconds", 0.0) + seconds, 3)
    timings["images_this_run"] = images
    timings["images_per_second"] = round(rate, 2) if rate else None
    timings["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    timings.update(extra_timings or {})
    meta["timings"] = timings
    if coarse:
        meta["float16_coarse"] = coarse
        ex = coarse["examples"][0]
        if say is not None:
            say(f"featstore: warning: float16 keeps fewer than {coarse['min_levels']} distinct values within "
                f"+-3 sd for {coarse['neurons']} of {coarse['of']} neurons of layer {layer} (neuron "
                f"{ex['neuron']}: mean {ex['mean']:.4g}, sd {ex['sd']:.3g}, float16 step {ex['float16_step']:.3g}); "
                f"recorded in the group (featstore info). Build with --dtype float32 to keep their spread")
    faults.point("finish")
    # one atomic write of zarr.json: the group flips from building to complete
    t.zgroup.attrs.update({META: meta})


class _Writer:
    """Background thread that writes finished chunks, then marks them in ``progress``.

    The queue is bounded so memory stays at a few chunks; an error in the thread is
    raised in the caller at the next submit or at close.
    """

    def __init__(self, depth: int = 4, guard=None):
        self._guard = guard
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
                if self._guard is not None:
                    self._guard()  # the build still holds its lock (a URL's lease)
                start = c * t.rows
                if view == 0:
                    t.features[start : start + len(data)] = data
                else:
                    t.views[view - 1, start : start + len(data)] = data
                faults.point("chunk-data")
                if t.checksums is not None:  # what a read will check the chunk against
                    t.checksums[view, c] = chunk_digests(data, t.features.chunks[-1])
                # only after the chunk is on disk is it recorded as done
                t.progress[view, c] = 1
                t.done[view, c] = True
                faults.record("chunk-mark", f"{t.spec.group_name()} {view} {c}")
                faults.point("chunk-mark")
            except FeatstoreError as e:  # the build's lock lost: stop, naming why
                self._error = e
            except OSError as e:  # disk full, permission denied, I/O error
                self._error = WriteFailedError(
                    path=f"chunk {c} of view {view} of group {t.spec.group_name()}",
                    reason=f"{e.strerror or e} ({type(e).__name__})",
                    consequence="finished chunks are kept and the group stays 'building'; fix the cause (free "
                                "space, permissions) and re-run the same command to resume")
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
