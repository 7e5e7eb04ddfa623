"""Launchers: where a sweep's tasks run. A registry of small entries, one per way.

Each launcher's ``run(todo, run, tick)`` runs the pending tasks and calls ``tick(rows)``
once per finished task; ``run`` is the sweep's :class:`Run` (store, output, device,
worker count, scheduler address).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

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


def _local(todo, run: Run, tick) -> None:
    for t in todo:
        tick(run_task(t, run.store, run.out, run.device))


def _joblib(todo, run: Run, tick) -> None:
    from joblib import Parallel, delayed

    threads = max(1, (os.cpu_count() or 1) // run.workers)
    par = Parallel(n_jobs=run.workers, backend="loky", return_as="generator_unordered")
    for n in par(delayed(run_task)(t, run.store, run.out, run.device, threads) for t in todo):
        tick(n)


def _dask(todo, run: Run, tick) -> None:
    from distributed import Client, LocalCluster, as_completed

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
        threads = 1 if not run.scheduler else None
        # workers read the features from the store path themselves; only the small task
        # description travels through the scheduler. retries covers a task whose worker died.
        futures = [client.submit(run_task, t, run.store, run.out, run.device, threads, key=f"task-{t.id}",
                                 pure=False, retries=3) for t in todo]
        for fut in as_completed(futures):
            tick(fut.result())
    finally:
        client.close()
        if cluster is not None:
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
    """

    name: str
    run: Callable
    scheduler: bool
    description: str


LAUNCHERS: dict[str, Launcher] = {entry.name: entry for entry in (
    Launcher("local", _local, False, "every task in this process, one after another"),
    Launcher("joblib", _joblib, False, "tasks in --workers loky processes on this machine"),
    Launcher("dask", _dask, True, "tasks on a dask.distributed cluster: a local one with --workers processes, "
                                  "or an existing scheduler (--scheduler tcp://host:8786)"),
)}
