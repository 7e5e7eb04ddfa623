"""Builds beyond one process: many workers filling one split's groups, each row range once.

``featstore build --jobs N`` (``--launcher local|joblib|dask|slurm``, ``--devices``) runs the
split's pass on N workers. The coordinator (the ``featstore build`` process) plans and checks
the build, creates the groups (atomically, as a one-process build does) under their build
locks, cuts the rows still missing into ranges (whole chunks of every layer's group: a
multiple of the largest chunk), and launches the workers through the launcher registry
(:mod:`featstore._launchers`, the sweeps' own). Each worker builds its own backbone on its own
device and then, range by range, takes the range's *claim*: an exclusive ``flock`` on
``.featstore/claims/<groups>/<range>.lock`` whose file names the holder. The kernel drops the
lock of a worker that dies (SIGKILL, a lost job), so a claim never needs to expire; a worker
holding one writes the range's missing chunks and marks each after it is on disk, exactly as
the one-process pass does. A first round skips claims held by others; a second waits on them,
so the survivors finish the range of a worker that died. Two workers never write one chunk,
and a chunk is marked once.

After each range a worker looks, under ``finish.lock``, whether every flag of a group is
set; the one that sees it first flips the group to complete, with the timings (and float16
spread sums) every worker recorded beside its claims. A worker checks that it computes the
groups the coordinator created (the same keys: library versions, files and options) before
it writes anything.

Claims are file locks, so the store must be on a filesystem that has them: a local disk, or
NFSv4/Lustre/GPFS shared by the nodes of a SLURM job or a dask cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from . import _launchers
from ._launchers import LAUNCHERS, Call, Run, WorkerDiedError
from ._slurm import SLURM_PREFIX, SlurmOptions, given_slurm
from ._store import META, FeatureStore, Group
from ._values import SpreadTracker
from .errors import BuildWorkersError, FeatstoreError, IncompatibleParametersError, StaleGroupError
from .fileio import LockBusy, atomic_write, locked

__all__ = ["check_launch", "distributed", "worker_kind", "extract_many", "work", "row_ranges"]

RANGES_PER_WORKER = 4  # ranges per worker: a worker that dies loses at most a quarter of its share


def check_launch(o):
    """--launcher, --jobs, --devices, --scheduler and --slurm-* checked together, before any work;
    for a build shared by workers, its precision fixed here from the workers' device kind (it
    is part of the groups' key, so every worker must compute the same)."""
    if o.devices and o.launcher != "local":
        raise IncompatibleParametersError(key="devices", value=",".join(o.devices), reason=(
            f"--devices places --launcher local's workers; --launcher {o.launcher}'s workers each take their own "
            f"device"))
    if o.scheduler and not LAUNCHERS[o.launcher].scheduler:
        raise IncompatibleParametersError(key="scheduler", value=o.scheduler, reason=(
            f"--launcher {o.launcher} runs no scheduler; use one of "
            + ", ".join(n for n, e in LAUNCHERS.items() if e.scheduler)))
    if o.launcher != "slurm":
        for k, v in given_slurm(o).items():
            raise IncompatibleParametersError(key=SLURM_PREFIX + k, value=v, reason=(
                f"it is an option of --launcher slurm, not of --launcher {o.launcher}"))
    if not distributed(o):
        return o
    if not isinstance(o.model, str) or o.model.startswith("module:"):
        raise IncompatibleParametersError(key="model", value=str(o.model)[:60], reason=(
            "a torch.nn.Module given from Python builds in this process only: build it with jobs=1, or save its "
            "weights and name a model the workers can build (a source name, with --weights checkpoint)"))
    if "://" in str(o.store):
        raise IncompatibleParametersError(key="store", value=str(o.store), reason=(
            "workers claim row ranges with file locks, so a shared build writes to a local or shared filesystem; "
            "build there and `featstore push` it"))
    for device in o.devices or ():  # each exists here (CUDA is queried, not initialised)
        from ._device import resolve_device

        try:
            resolve_device(device)
        except FeatstoreError as e:
            raise e.within("--devices") from None
    entry = LAUNCHERS[o.launcher]
    if entry.check is not None:
        entry.check()
    kind = worker_kind(o)
    return o.model_copy(update={"precision": o.precision or ("fp16" if kind == "cuda" else "fp32")})


def distributed(o) -> bool:
    """Whether a build runs on workers other than this process."""
    return o.launcher != "local" or job_count(o) > 1


def job_count(o) -> int:
    return o.jobs or (len(o.devices) if o.devices else 1)


def worker_kind(o) -> str:
    """``cuda`` or ``cpu``: what the workers will extract on (the default precision and so the
    groups' keys follow it), decided without touching CUDA in this process when others do."""
    if o.devices:
        return "cuda" if any(d.startswith("cuda") for d in o.devices) else "cpu"
    if o.launcher == "slurm":
        return "cuda" if (o.slurm_gpus or 0) > 0 else "cpu"
    from ._device import resolve_device

    return "cuda" if resolve_device(o.device).startswith("cuda") else "cpu"


def row_ranges(n: int, unit: int, jobs: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering n rows: multiples of ``unit`` rows (whole chunks of every
    group), about RANGES_PER_WORKER per worker."""
    per = unit * max(1, -(-n // (unit * jobs * RANGES_PER_WORKER)))
    return [(a, min(a + per, n)) for a in range(0, n, per)]


def _claims_dir(fs: FeatureStore, names: list[str]) -> Path:
    return fs.internal_dir / "claims" / hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


def _range_done(targets, a: int, b: int) -> bool:
    return all(t.done[:, a // t.rows: -(-b // t.rows)].all() for _, t in targets)


def _devices(o, jobs: int) -> list[str]:
    """Each worker's device: --devices in turn; several local workers on a multi-GPU device
    spec take cuda:0, cuda:1, ...; else the build's --device (dask and SLURM workers resolve
    auto/cuda to their own GPU)."""
    if o.devices:
        return [o.devices[i % len(o.devices)] for i in range(jobs)]
    if o.launcher == "local" and o.device in ("auto", "cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > 1:
            return [f"cuda:{i % n}" for i in range(jobs)]
    return [o.device] * jobs


def extract_many(plan, fs: FeatureStore, split: str, specs: dict, say) -> list[Group]:
    """The coordinator's side of one split: groups created or reopened under their build
    locks, the missing rows cut into ranges, the workers launched; the groups it returns are
    complete, or one error says how far they got."""
    from tqdm.auto import tqdm

    from ._build import _subset
    from ._groups import open_target, versions

    o = plan.options
    src = plan.sources[split]
    index = _subset(plan, src)
    names = [s.group_name() for s in specs.values()]

    def on_wait(name, holder):
        say(f"featstore: group {name} is being built by {holder}; waiting for it to finish ...")

    with fs.lock(names, wait=o.wait, on_wait=on_wait):
        fs.reopen()
        targets = []
        for layer, spec in specs.items():
            t = open_target(fs, spec, src, index, plan.widths[layer], versions(plan.model_provenance), plan.weights,
                             plan.device, plan.skipped.get(split, []), plan.model_provenance)
            if t is None:
                say(f"featstore: {spec.group_name()} is already complete")
            else:
                targets.append((layer, t))
        built = {t.spec.group_name() for _, t in targets}
        if targets:
            jobs = job_count(o)
            unit = max(t.rows for _, t in targets)
            ranges = [r for r in row_ranges(len(index), unit, jobs) if not _range_done(targets, *r)]
            claims = _claims_dir(fs, names)
            claims.mkdir(parents=True, exist_ok=True)
            options = _worker_options(o)
            calls = [Call(work, (options, split, names, plan.dropped.get(split, []), plan.skipped.get(split, []),
                                 ranges, str(claims), device, i), key=f"build-{split}-{i}-{claims.name}")
                     for i, device in enumerate(_devices(o, jobs))]
            say(f"featstore: {split}: {len(ranges)} row ranges on {jobs} workers ({o.launcher})")
            total = sum(t.done.size for _, t in targets)
            bar = tqdm(total=total, initial=sum(int(t.done.sum()) for _, t in targets), unit="chunk",
                       desc=f"{o.model}:{plan.dataset}:{split} ({jobs} workers)", disable=not o.progress,
                       dynamic_ncols=True)
            stop = threading.Event()

            def watch():  # the chunks marked so far, from the groups' progress flags
                while not stop.wait(1.0):
                    bar.n = sum(int(np.asarray(t.progress[:]).sum()) for _, t in targets)
                    bar.refresh()

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            run = Run(workers=jobs, device=o.device, scheduler=o.scheduler,
                      slurm=SlurmOptions(**{**given_slurm(o), "jobs": jobs}) if o.launcher == "slurm" else None,
                      log_dir=str(fs.internal_dir))
            died = None
            try:
                LAUNCHERS[o.launcher].run(calls, run, lambda result: None)
            except WorkerDiedError as e:
                died = e
            finally:
                stop.set()
                watcher.join()
                bar.n = sum(int(np.asarray(t.progress[:]).sum()) for _, t in targets)
                bar.close()
            fs.reopen()
            _try_finish(fs, [(layer, t) for layer, t in targets], claims, say)
            fs.reopen()
            left = [n for n in built if fs.raw_group(n).attrs.asdict()[META].get("state") != "complete"]
            if left:
                missing = sum(int((~np.asarray(fs.raw_group(n)["progress"][:]).astype(bool)).sum()) for n in left)
                raise BuildWorkersError(groups=", ".join(left), store=fs.path, problem=(
                    f"{missing} chunk(s) are not written" + (f" ({died}, and no other worker was left to take its "
                                                             f"rows)" if died else "")))
            if died is not None:
                say(f"featstore: warning: {died}; the other workers built its rows")
            import shutil

            shutil.rmtree(claims, ignore_errors=True)
        fs.reopen()
        groups = [fs.group(name) for name in names]
        for g in groups:
            g.built_now = g.name in built
        return groups


def _worker_options(o) -> dict:
    """The build's options as each worker takes them: one process, its own device (set per
    call), no second image check (the coordinator's stands: its skipped files travel as
    positions), no progress bar of its own (the coordinator shows the chunks)."""
    d = o.model_dump()
    for k in ("name", "preprocess"):
        d.pop(k, None)
    d.update(launcher="local", jobs=1, devices=None, scheduler=None, check=False, progress=False)
    for k in list(d):
        if k.startswith("slurm_"):
            d[k] = None
    return d


def work(options: dict, split: str, names: list[str], dropped: list[int], skipped: list, ranges: list,
         claims: str, device: str, worker: int, threads: int | None = None, die_with_parent: bool = False) -> dict:
    """One worker: its own backbone on ``device``, then every range it can claim (a first
    round skipping ranges held by others, a second waiting on them). Returns what it did."""
    import socket

    import torch

    from ._build import PREPROCESSING, BuildOptions, _plan, _specs, _subset
    from ._groups import open_target
    from ._groups import versions as group_versions
    from ._pass import run_pass
    from ._preprocess import make_transforms

    if die_with_parent:
        _launchers.die_with_parent()
    if threads:
        torch.set_num_threads(threads)
    _fork_loaders()
    from ._device import resolve_device

    device = resolve_device(_launchers.worker_device(device))
    o = BuildOptions(**{**options, "device": device})
    plan = _plan(o)
    src = plan.sources[split]
    if dropped:
        src = plan.sources[split] = src.without(dropped)
    plan.skipped[split] = [tuple(x) for x in skipped]
    specs = _specs(plan, split)
    got = [s.group_name() for s in specs.values()]
    if got != names:
        raise StaleGroupError(name=names[0], store=str(o.store), reason=(
            f"worker {worker} on {socket.gethostname()} ({device}) computes the groups {got}, not the ones the "
            f"build created ({names}): every worker needs the same library versions, files and options"))
    index = _subset(plan, src)
    fs = FeatureStore(o.store, mode="a")
    versions = group_versions(plan.model_provenance)
    targets = []
    for layer, spec in specs.items():
        t = open_target(fs, spec, src, index, plan.widths[layer], versions, plan.weights, plan.device,
                         plan.skipped.get(split, []), plan.model_provenance, create=False)
        if t is not None:
            targets.append((layer, t))
    did = {"worker": worker, "device": device, "host": socket.gethostname(), "images": 0, "ranges": 0}
    if not targets:
        return did
    eval_tf, aug_tf = make_transforms(plan.transform, PREPROCESSING[o.preset].augmentation)
    folder = Path(claims)
    try:
        for wait in (False, True):
            for a, b in ranges:
                try:
                    with locked(folder / f"{a:012d}.lock", wait=wait):
                        for _, t in targets:
                            t.done[:] = np.asarray(t.progress[:]).astype(bool)
                        if _range_done(targets, a, b):
                            continue
                        start = time.time()
                        stats = run_pass(plan.extractor, plan.backbone, targets, src, index, eval_tf, aug_tf, o.seed,
                                         specs[o.layers[0]].views, plan.batch_size, plan.workers, plan.device, False,
                                         f"{o.model}:{plan.dataset}:{split}", plan.decoder, plan.precision,
                                         rows=(a, b), finish=False)
                        _record(folder, a, worker, device, start, stats, targets)
                        did["images"] += stats.images
                        did["ranges"] += 1
                except LockBusy:
                    continue
                _try_finish(fs, targets, folder)
    finally:
        plan.extractor.close()
    return did


def _fork_loaders() -> None:
    """DataLoader workers forked, as in a one-process build: a worker that was itself spawned
    (local, dask, SLURM) inherits spawn as the default start method, which would pickle every
    dataset (a registered dataset's closures cannot be pickled) and start each loader slowly."""
    import multiprocessing as mp
    import sys

    if sys.platform.startswith("linux") and mp.get_start_method(allow_none=True) != "fork":
        mp.set_start_method("fork", force=True)


def _record(folder: Path, a: int, worker: int, device: str, start: float, stats, targets) -> None:
    """What a range cost, and (float16 groups) its spread sums, beside its claim."""
    stem = f"range-{a:012d}-{worker}-{os.getpid()}-{time.time_ns()}"
    spreads = {targets[ti][1].spec.group_name(): sp for ti, sp in stats.spreads.items()}
    if spreads:
        arrays = {}
        for name, sp in spreads.items():
            arrays[f"{name}.total"], arrays[f"{name}.squares"] = sp.total, sp.squares
            arrays[f"{name}.count"] = np.asarray([sp.count])
        np.savez(folder / f"{stem}.npz", **arrays)
    atomic_write(folder / f"{stem}.json", json.dumps(
        {"worker": worker, "device": device, "images": stats.images, "seconds": stats.seconds, "start": start,
         "end": time.time()}).encode())


def _try_finish(fs: FeatureStore, targets, folder: Path, say=None) -> None:
    """Under the groups' finish lock: flip each group whose every flag is set and that is not
    complete yet, with the timings and float16 spreads every worker recorded."""
    from ._pass import finish_group

    with locked(folder / "finish.lock"):
        records = None
        for layer, t in targets:
            if not np.asarray(t.progress[:]).astype(bool).all():
                continue
            fs.reopen()
            z = fs.raw_group(t.spec.group_name())
            if z.attrs.asdict()[META].get("state") == "complete":
                continue
            if records is None:
                records = [json.loads(p.read_text()) for p in sorted(folder.glob("range-*.json"))]
            t.zgroup = z
            images = sum(r["images"] for r in records)
            seconds = sum(r["seconds"] for r in records)
            wall = (max(r["end"] for r in records) - min(r["start"] for r in records)) if records else 0.0
            finish_group(t, layer, seconds, images, images / wall if wall else None, _coarse(folder, t), say,
                         extra_timings={"workers": len({(r["worker"], r["device"]) for r in records}),
                                        "devices": sorted({r["device"] for r in records})})


def _coarse(folder: Path, t) -> dict | None:
    if t.spec.dtype != "float16":
        return None
    name = t.spec.group_name()
    merged = SpreadTracker(t.features.shape[1])
    for p in sorted(folder.glob("range-*.npz")):
        with np.load(p) as f:
            if f"{name}.count" in f:
                merged.count += int(f[f"{name}.count"][0])
                merged.total += f[f"{name}.total"]
                merged.squares += f[f"{name}.squares"]
    return merged.coarse()
