"""``--launcher slurm``: a sweep's tasks, or a build's workers, on dask workers that SLURM starts (dask-jobqueue).

The sweep process runs the dask scheduler; ``jobs`` SLURM jobs each start one dask worker
per GPU (``gpus`` > 0, each worker on its own device) or one worker using the job's
``cores``. Workers read the features from the store themselves (a shared filesystem or an
object-store URL), so only task descriptions and row counts travel. A job that dies or is
cancelled (``scancel``, a time limit) loses no row: its task is resubmitted to another
worker, and the done record is written only after a task's rows are.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

from pydantic import Field

from .params import Check, Parameters, field_type

__all__ = ["SlurmOptions", "slurm_cluster", "SLURM_PREFIX", "slurm_fields", "given_slurm"]

SLURM_PREFIX = "slurm_"

# SLURM's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)$", re.IGNORECASE)

SlurmTime = Annotated[str, Check(lambda v: bool(_TIME.match(v)),
                                 "a SLURM time limit: MINUTES, HH:MM:SS or D-HH:MM:SS (e.g. 02:00:00)")]
Memory = Annotated[str, Check(lambda v: bool(_MEMORY.match(v)), "a size with its unit, e.g. 16GB or 4000MB")]


class SlurmOptions(Parameters):
    """What ``--launcher slurm`` asks SLURM for: a sweep spec's ``[slurm]`` table, and the
    ``--slurm-*`` options of ``featstore sweep`` and ``featstore build`` (which override it)."""

    partition: str | None = None
    """SLURM partition (queue) of the worker jobs (default: the cluster's default partition)."""
    account: str | None = None
    """SLURM account to charge (default: the user's default account)."""
    time: SlurmTime = "01:00:00"
    """Time limit of each worker job; a job that reaches it loses no row (its task runs again elsewhere)."""
    memory: Memory = "16GB"
    """Memory of each worker job."""
    cores: Annotated[int, Field(ge=1)] = 4
    """CPU cores of each worker job."""
    gpus: Annotated[int, Field(ge=0)] = 0
    """GPUs of each worker job (--gres=gpu:N); one dask worker per GPU, each on its own device."""
    jobs: Annotated[int, Field(ge=1)] = 1
    """Worker jobs to start."""
    host: str | None = None
    """Address the sweep's scheduler listens on, reachable from the compute nodes (default: this machine's
    address as dask picks it; 127.0.0.1 for a single-node cluster)."""


# A task's memory is torch, its features and the CKA pass: none of it is dask's to spill, and a
# worker that pauses at 80% of its limit (dask's default) never finishes the task it holds (seen:
# torch's import alone is ~0.8 GB of a 1 GB job). Workers neither spill nor pause; the nanny still
# restarts one past 95% (its task then runs again), and SLURM enforces the job's memory.
WORKER_MEMORY_POLICY = ["export DASK_DISTRIBUTED__WORKER__MEMORY__TARGET=False",
                        "export DASK_DISTRIBUTED__WORKER__MEMORY__SPILL=False",
                        "export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False"]


def cluster_options(o: SlurmOptions, log_dir: str | Path) -> dict:
    """dask-jobqueue's SLURMCluster keywords for these options."""
    processes = max(1, o.gpus)  # one worker per GPU; else one worker with every core
    return dict(
        cores=o.cores, processes=processes, memory=o.memory, walltime=o.time, queue=o.partition,
        account=o.account, job_extra_directives=[f"--gres=gpu:{o.gpus}"] if o.gpus else [],
        python=sys.executable, log_directory=str(log_dir),
        scheduler_options={"host": o.host} if o.host else {}, name="featstore",
        # one task at a time per worker; the task gives torch the worker's share of the cores
        worker_extra_args=["--nthreads", "1"],
        job_script_prologue=WORKER_MEMORY_POLICY,
    )


def slurm_cluster(o: SlurmOptions, log_dir: str | Path):
    """A dask-jobqueue SLURMCluster for these options, its jobs submitted and kept."""
    from dask_jobqueue import SLURMCluster

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    cluster = SLURMCluster(**cluster_options(o, log_dir))
    # adapt, not scale: a job that ends (scancel, its time limit, a lost node) is replaced
    cluster.adapt(minimum_jobs=o.jobs, maximum_jobs=o.jobs)
    return cluster


def slurm_fields(default_note: str, leave_out: tuple[str, ...] = ()) -> dict:
    """``slurm_*`` fields for ``pydantic.create_model``: each SlurmOptions field, optional
    (None: not given), its help saying where the default comes from (``default_note`` with
    ``{k}`` for the field's name)."""
    from pydantic import Field as _Field

    return {SLURM_PREFIX + k: (field_type(SlurmOptions, k) | None,
                               _Field(default=None, description=f"--launcher slurm: {f.description} Default: "
                                      + default_note.format(k=k) + ("." if f.default is None else
                                                                    f"{', else ' if default_note else ''}"
                                                                    f"{f.default!r}.")))
            for k, f in SlurmOptions.model_fields.items() if k not in leave_out}


def given_slurm(opts) -> dict:
    """The ``slurm_*`` options given (not None) on ``opts``, by SlurmOptions' names."""
    return {k: getattr(opts, SLURM_PREFIX + k) for k in SlurmOptions.model_fields
            if getattr(opts, SLURM_PREFIX + k, None) is not None}
