"""Launchers: where a sweep's tasks or a build's workers run. A registry of small entries.

A launcher runs a list of :class:`Call` (a module-level function and its arguments, so it
can travel to another process) and calls ``tick(result)`` as each finishes. Every function
it runs takes two more keywords the launcher sets: ``threads`` (the CPU threads a call may
use where several share a machine, None in this process) and ``die_with_parent`` (a worker
process on this machine asks the kernel to kill it when the launching process dies).

``featstore sweep`` and ``featstore build`` share the registry and the ``[slurm]`` options
(:class:`featstore._slurm.SlurmOptions`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from ._extras import require
from ._slurm import SlurmOptions, slurm_cluster

__all__ = ["Call", "Run", "Launcher", "LAUNCHERS", "WorkerDiedError", "worker_device", "die_with_parent"]


@dataclass(frozen=True)
class Call:
    """One unit of work: ``fn(*args, **kwargs, threads=..., die_with_parent=...)``; ``key``
    names it (unique within a run: dask's task key)."""

    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    key: str = ""


@dataclass(frozen=True)
class Run:
    """What every call of one run shares: how many processes (``workers``: joblib's, a local
    dask cluster's, ``local``'s when > 1), the device they train or extract on, an existing
    dask scheduler, the SLURM options and where the SLURM jobs' logs go."""

    workers: int
    device: str = "auto"
    scheduler: str | None = None
    slurm: SlurmOptions | None = None
    log_dir: str = "."


class WorkerDiedError(RuntimeError):
    """A worker process of ``local`` ended without a result (SIGKILL, the OOM killer)."""

    def __init__(self, key: str, exitcode: int):
        super().__init__(f"worker {key} died (exit code {exitcode})")
        self.key, self.exitcode = key, exitcode


def _in_process(calls: list[Call], run: Run, tick) -> None:
    for c in calls:
        tick(c.fn(*c.args, **c.kwargs, threads=None, die_with_parent=False))


def _process_main(c: Call, threads: int, results) -> None:
    from .errors import FeatstoreError

    try:
        results.put((c.key, c.fn(*c.args, **c.kwargs, threads=threads, die_with_parent=True)))
    except FeatstoreError as e:  # one clear line, raised by the launching process: no traceback here
        results.put((c.key, _Failed(e)))


@dataclass(frozen=True)
class _Failed:
    """A call that raised a featstore error in its process (re-raised by the launcher)."""

    error: Exception


def _local(calls: list[Call], run: Run, tick) -> None:
    """In this process, one after another; with ``run.workers`` > 1, each call in its own
    spawned process (CUDA is never forked), ``run.workers`` at a time. A process that dies
    leaves the others running; its call is reported (:class:`WorkerDiedError`, or the
    featstore error it raised) once every other call has finished, so that what they can
    finish is finished."""
    if run.workers <= 1 or len(calls) <= 1:
        return _in_process(calls, run, tick)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // min(run.workers, len(calls)))
    pending, running, died, failed = list(calls), {}, [], []
    while pending or running:
        while pending and len(running) < run.workers:
            c = pending.pop(0)
            p = ctx.Process(target=_process_main, args=(c, threads, results), name=f"featstore-{c.key}")
            p.start()
            running[c.key] = p
        try:
            key, result = results.get(timeout=0.5)
        except Exception:  # queue.Empty: look for processes that ended without a result
            for key, p in list(running.items()):
                if not p.is_alive() and results.empty():
                    p.join()
                    del running[key]
                    if p.exitcode != 0:
                        died.append(WorkerDiedError(key, p.exitcode))
            continue
        running.pop(key).join()
        if isinstance(result, _Failed):
            failed.append(result.error)
            continue
        tick(result)
    if failed:  # after every other call: what they could finish is finished
        raise failed[0]
    if died:
        raise died[0]


def _joblib(calls: list[Call], run: Run, tick) -> None:
    from joblib import Parallel, delayed

    threads = max(1, (os.cpu_count() or 1) // run.workers)
    par = Parallel(n_jobs=run.workers, backend="loky", return_as="generator_unordered")
    for n in par(delayed(c.fn)(*c.args, **c.kwargs, threads=threads, die_with_parent=True) for c in calls):
        tick(n)


def _dask(calls: list[Call], run: Run, tick) -> None:
    from distributed import Client, LocalCluster

    cluster = None
    n_workers = run.workers
    if run.scheduler:
        client = Client(run.scheduler)
    else:
        if run.device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available() and torch.cuda.device_count() > 1:
                n_workers = torch.cuda.device_count()  # one worker process per GPU
        # processes are spawned (distributed's default), never forked after CUDA is touched
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")
        client = Client(cluster)
    try:
        _run_on(client, calls, tick, threads=1 if not run.scheduler else None)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_on(client, calls: list[Call], tick, threads: int | None) -> None:
    """Submit every call to a dask client; tick as each finishes. Only the small call
    description travels through the scheduler; workers read and write the store themselves.
    retries covers a call whose worker died (a killed process, a cancelled job)."""
    from distributed import as_completed

    futures = [client.submit(c.fn, *c.args, **c.kwargs, threads=threads, die_with_parent=False, key=c.key,
                             pure=False, retries=3) for c in calls]
    for fut in as_completed(futures):
        tick(fut.result())


def _slurm_check() -> None:
    import shutil

    from .errors import IncompatibleParametersError

    require("distributed", "--launcher slurm")
    require("dask_jobqueue", "--launcher slurm")
    if shutil.which("sbatch") is None:
        raise IncompatibleParametersError(key="launcher", value="slurm",
                                          reason="sbatch is not on the PATH: run on a SLURM login node (or a "
                                                 "machine that can submit jobs)")


def _slurm(calls: list[Call], run: Run, tick) -> None:
    from distributed import Client

    o = run.slurm or SlurmOptions()
    cluster = slurm_cluster(o, os.path.join(run.log_dir, "slurm-logs"))
    try:
        with Client(cluster) as client:
            _run_on(client, calls, tick, threads=max(1, o.cores // max(1, o.gpus)))
    finally:
        cluster.close()


@dataclass(frozen=True)
class Launcher:
    """One entry of the launcher registry.

    Attributes
    ----------
    name : str
    run : callable
        ``run(calls, run, tick)``.
    scheduler : bool
        Whether it can use an existing scheduler's address (``--scheduler``).
    description : str
    check : callable, optional
        ``check()`` raises, before any work, when this machine cannot run it.
    """

    name: str
    run: Callable
    scheduler: bool
    description: str
    check: Callable | None = None


LAUNCHERS: dict[str, Launcher] = {entry.name: entry for entry in (
    Launcher("local", _local, False, "this machine: a sweep's tasks in this process, one after another; a build's "
                                     "--jobs workers in spawned processes, one per --devices entry"),
    Launcher("joblib", _joblib, False, "tasks in --workers loky processes on this machine"),
    Launcher("dask", _dask, True, "on a dask.distributed cluster: a local one with --workers processes (one per GPU "
                                  "on a multi-GPU machine), or an existing scheduler (--scheduler tcp://host:8786)",
             lambda: require("distributed", "--launcher dask")),
    Launcher("slurm", _slurm, False, "on dask workers in SLURM jobs (dask-jobqueue), one worker per GPU; the "
                                     "--slurm-* options or a spec's [slurm] table", _slurm_check),
)}


def die_with_parent() -> None:
    """Linux: have the kernel send this process SIGKILL when its parent dies, so a killed
    sweep's or build's worker processes do not run on."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def worker_device(device: str) -> str:
    """On a multi-GPU machine, dask worker i uses cuda:(i mod n_gpus): one process per GPU.
    A LocalCluster names its workers 0, 1, ...; dask-jobqueue names the workers of one job
    JOB-0, JOB-1, ... (the job sees only its own GPUs). Workers are spawned processes, so no
    CUDA state was forked."""
    if device not in ("auto", "cuda"):
        return device
    try:
        from distributed import get_worker

        index = int(str(get_worker().name).rsplit("-", 1)[-1])
    except (ImportError, ValueError, TypeError):
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{index % n}" if n > 1 else device
