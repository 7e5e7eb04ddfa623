"""Launchers: where a sweep's tasks run. A registry of small entries, one per way.

Each launcher's ``run(todo, run, tick)`` runs the pending tasks and calls ``tick(rows)``
once per finished task; ``run`` is the sweep's :class:`Run` (store, output, device,
worker count, scheduler address).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from featstore import require_extra as require

from ._slurm import SlurmOptions, slurm_cluster
from ._tasks import run_task

__all__ = ["Launcher", "LAUNCHERS", "Run"]


@dataclass(frozen=True)
class Run:
    """What every task of one sweep run shares."""

    store: str
    out: str
    device: str
    workers: int
    scheduler: str | None
    slurm: "SlurmOptions | None" = None
    generation: dict | None = None  # the sweep run owning the output: workers commit only while it does


def _local(todo, run: Run, tick) -> None:
    for t in todo:
        tick(run_task(t, run.store, run.out, run.device, generation=run.generation))


def _joblib(todo, run: Run, tick) -> None:
    from joblib import Parallel, delayed

    threads = max(1, (os.cpu_count() or 1) // run.workers)
    par = Parallel(n_jobs=run.workers, backend="loky", return_as="generator_unordered")
    for n in par(delayed(run_task)(t, run.store, run.out, run.device, threads, run.generation, True) for t in todo):
        tick(n)


def _dask(todo, run: Run, tick) -> None:
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
        _run_on(client, todo, run, tick, threads=1 if not run.scheduler else None)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_on(client, todo, run: Run, tick, threads: int | None) -> None:
    """Submit every task to a dask client; tick as each finishes. Workers read the features
    from the store themselves; only the small task description travels through the
    scheduler. retries covers a task whose worker died (a killed process, a cancelled job)."""
    from distributed import as_completed

    futures = [client.submit(run_task, t, run.store, run.out, run.device, threads, run.generation,
                             key=f"task-{t.id}", pure=False, retries=3) for t in todo]
    for fut in as_completed(futures):
        tick(fut.result())


def _slurm_check() -> None:
    import shutil

    from featstore.errors import IncompatibleParametersError

    require("distributed", "--launcher slurm")
    require("dask_jobqueue", "--launcher slurm")
    if shutil.which("sbatch") is None:
        raise IncompatibleParametersError(key="launcher", value="slurm",
                                          reason="sbatch is not on the PATH: run the sweep on a SLURM login node "
                                                 "(or a machine that can submit jobs)")


def _slurm(todo, run: Run, tick) -> None:
    from distributed import Client

    o = run.slurm or SlurmOptions()
    cluster = slurm_cluster(o, os.path.join(run.out, "slurm-logs"))
    try:
        with Client(cluster) as client:
            _run_on(client, todo, run, tick, threads=max(1, o.cores // max(1, o.gpus)))
    finally:
        cluster.close()


@dataclass(frozen=True)
class Launcher:
    """One entry of the launcher registry.

    Attributes
    ----------
    name : str
    run : callable
        ``run(todo, run, tick)``.
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
    Launcher("local", _local, False, "every task in this process, one after another"),
    Launcher("joblib", _joblib, False, "tasks in --workers loky processes on this machine"),
    Launcher("dask", _dask, True, "tasks on a dask.distributed cluster: a local one with --workers processes, "
                                  "or an existing scheduler (--scheduler tcp://host:8786)",
             lambda: require("distributed", "--launcher dask")),
    Launcher("slurm", _slurm, False, "tasks on dask workers in SLURM jobs (dask-jobqueue): --slurm-jobs jobs, "
                                     "one worker per GPU; the --slurm-* options or the spec's [slurm] table",
             _slurm_check),
)}
