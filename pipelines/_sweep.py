"""Sweeps: a TOML spec -> tasks -> resumable Parquet results, on local / joblib / dask.

A spec lists feature groups x selection modes x fractions x seeds x probe protocol x
metrics (``_spec``). It expands into tasks (``_tasks``), one per (group pairing, mode,
seed) plus one full-layer reference per pairing (per seed); the tasks of a pairing train
together in one fit (``plan_fits``: more where workers or memory ask for it); a launcher
(``_launchers``) runs the fits; each task commits its rows atomically (``_results``). A
sweep killed at any moment and re-run gives the rows of one uninterrupted run: no
duplicates, none missing; it trains only the tasks not done.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, create_model

import probes
from featstore import Device, resolve_device
from featstore.errors import IncompatibleParametersError
from featstore.fileio import locked
from featstore.params import OneOf, Parameters, defaults, validate

from featstore._launchers import LAUNCHERS, Call, Run
from featstore._slurm import SLURM_PREFIX, SlurmOptions, given_slurm, slurm_fields
from ._results import (
    LOCK_NAME,
    check_out,
    claim_generation,
    load_results,
    pending_tasks,
    prepare_out,
    recorded_features,
    tidy_out,
)
from ._spec import SweepSpec, load_spec
from ._tasks import FeatureCache, check_groups, expand_tasks, plan_fits, run_fit

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["run_sweep", "SweepRun", "sweep_progress"]


class _SweepRunBase(Parameters):

    launcher: Annotated[str, OneOf(LAUNCHERS, "launcher")] = "local"
    """Where tasks run: local, joblib, dask or slurm (see pipelines.LAUNCHERS)."""
    workers: Annotated[int, Field(ge=1)] | None = None
    """Processes for joblib or a local dask cluster (default: the number of cores)."""
    scheduler: str | None = None
    """Address of an existing dask scheduler (tcp://host:8786); its workers must reach the store."""
    device: Device = "auto"
    """Where probes train: auto (cuda when present), cpu, cuda or cuda:N."""
    progress: Annotated[bool, Field(json_schema_extra={"off": "No progress bar over the tasks"})] = True
    """Show a progress bar over tasks."""
    max_memory_mb: Annotated[int, Field(ge=16)] = probes.SubsetProbesParameters.model_fields["max_memory_mb"].default
    """Memory a worker's fit may take (its train features, and the probes' state beside them): a pairing
    whose fit would take more is split into fits that do not (probes.SubsetProbes' max_memory_mb; the
    results do not depend on it)."""
    share_rows: Literal["auto", "on", "off"] = "auto"
    """Pairings that share their rows (layers of one model, dataset and split: the same labels, validation
    and protocol) train in one fit: on, off, or auto (on when probes train on a GPU, where a fit's kernel
    launches rather than its arithmetic take the time; off on the CPU, where separate fits cost the same)."""
    fits_per_pairing: Annotated[int, Field(ge=1)] | None = None
    """How many fits train one pairing's tasks (each fit trains its tasks together, in one pass of the
    engine). Default: 1, or ceil(workers / pairings) when the launcher has more workers than pairings;
    more where one fit would not fit the probes' max_memory_mb."""


SweepRun = create_model(
    "SweepRun", __base__=_SweepRunBase,
    __doc__="How a sweep runs (not what it computes: that is the spec): ``run_sweep``'s keywords and "
            "``featstore sweep``'s options. ``slurm_*`` are :class:`SlurmOptions` (default: the spec's "
            "[slurm] table, else SlurmOptions' own).",
    **slurm_fields("the spec's [slurm] {k}"))
SweepRun.__module__ = __name__
_RUN = defaults(SweepRun)


def check_run(options: dict, key_format=None) -> SweepRun:
    """The run options, validated (``key_format`` names them as command-line flags)."""
    opts = validate(SweepRun, options, key_format=key_format)
    name = key_format or (lambda k: k)
    if opts.scheduler and not LAUNCHERS[opts.launcher].scheduler:
        raise IncompatibleParametersError(
            key=name("scheduler"), value=opts.scheduler,
            reason=f"--launcher {opts.launcher} runs no scheduler; use one of "
                   + ", ".join(n for n, e in LAUNCHERS.items() if e.scheduler))
    if opts.launcher != "slurm":
        for k in SlurmOptions.model_fields:
            if getattr(opts, SLURM_PREFIX + k) is not None:
                raise IncompatibleParametersError(
                    key=name(SLURM_PREFIX + k), value=getattr(opts, SLURM_PREFIX + k),
                    reason=f"it is an option of --launcher slurm, not of --launcher {opts.launcher}")
    elif opts.workers is not None:
        raise IncompatibleParametersError(
            key=name("workers"), value=opts.workers,
            reason="--launcher slurm starts one worker per GPU in each of --slurm-jobs jobs; set those instead")
    return opts


def slurm_options(spec: SweepSpec, opts) -> SlurmOptions:
    """The [slurm] table as written, under the --slurm-* options given."""
    written = spec.slurm.model_dump(include=spec.slurm.model_fields_set)
    return SlurmOptions(**{**written, **given_slurm(opts)})


def run_sweep(spec: SweepSpec | str | os.PathLike | dict, out: str | os.PathLike, *,
              launcher: str = _RUN["launcher"], workers: int | None = _RUN["workers"],
              scheduler: str | None = _RUN["scheduler"], device: str = _RUN["device"],
              progress: bool = _RUN["progress"], fits_per_pairing: int | None = _RUN["fits_per_pairing"],
              max_memory_mb: int = _RUN["max_memory_mb"], share_rows: str = _RUN["share_rows"], log=None, return_results: bool = True, **slurm) -> "pd.DataFrame | None":
    """Run (or resume) a sweep and return its results table.

    Every argument and the whole spec are checked, and every group opened, before anything
    is written or trained.

    Parameters
    ----------
    spec : SweepSpec, path to a TOML spec, or an equivalent dict
    out : path
        Output directory (results/, done/, sweep.json).
    launcher, workers, scheduler, device, progress, fits_per_pairing, max_memory_mb, share_rows
        Declared in :class:`SweepRun`.
    **slurm
        ``slurm_partition``, ``slurm_account``, ``slurm_time``, ``slurm_memory``, ``slurm_cores``,
        ``slurm_gpus``, ``slurm_jobs``, ``slurm_host``: declared in :class:`SlurmOptions`.
    log : callable, optional
        Receives status lines (default: printed to stderr).
    return_results : bool
        Load and return the whole results table at the end (its size grows with the
        number of draws; the sweep itself holds one task at a time).
    """
    from tqdm.auto import tqdm

    say = log or (lambda m: print(m, file=sys.stderr))
    opts = check_run(dict(launcher=launcher, workers=workers, scheduler=scheduler, device=device, progress=progress,
                          fits_per_pairing=fits_per_pairing, max_memory_mb=max_memory_mb, share_rows=share_rows,
                          **slurm))
    entry = LAUNCHERS[opts.launcher]
    if entry.check is not None:
        entry.check()
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    # the estimator's own runtime checks (bf16 on this device), before any task starts
    for group in spec.pairings():
        probes.SubsetProbes(**spec.protocol_for(group).model_dump(), device=opts.device).check_params()
    shapes: dict = {}
    features = check_groups(spec, shapes)  # per pairing: the groups it reads and their keys
    out = Path(out)
    check_out(spec, out, features)  # before anything is created
    _check_out_writable(out)
    out.mkdir(parents=True, exist_ok=True)

    def waiting(holder):
        say(f"featstore sweep: another sweep ({holder}) is writing to {out}; waiting for it to finish ...")

    with locked(out / LOCK_NAME, on_wait=waiting):
        try:
            prepare_out(spec, out, features)
            generation = claim_generation(out)  # this run owns OUT: its workers commit while it does
            tidy_out(out, say)  # damaged or foreign results set aside: their tasks run again
            tasks = expand_tasks(spec, features)
            todo = pending_tasks(tasks, out)
            if len(todo) < len(tasks):
                say(f"featstore sweep: {len(tasks) - len(todo)} of {len(tasks)} tasks already done; "
                    f"running {len(todo)}")
            # local runs a sweep's fits in this process (--workers is joblib's and dask's)
            run = Run(1 if opts.launcher == "local" else opts.workers or os.cpu_count() or 1, opts.device,
                      opts.scheduler, slurm_options(spec, opts) if opts.launcher == "slurm" else None, str(out))
            workers = run.workers if opts.launcher != "slurm" else run.slurm.jobs * max(1, run.slurm.gpus or 1)
            on_gpu = bool(run.slurm.gpus) if opts.launcher == "slurm" else resolve_device(opts.device).startswith("cuda")
            share = opts.share_rows == "on" or (opts.share_rows == "auto" and on_gpu)
            fits = plan_fits(todo, shapes, workers, opts.fits_per_pairing, opts.max_memory_mb, share)
            bar = tqdm(total=len(todo), unit="task", desc="sweep", disable=not opts.progress, dynamic_ncols=True,
                       mininterval=0.1 if sys.stderr.isatty() else 10.0)
            rows = 0

            def tick(result):
                nonlocal rows
                tasks_done, n = result
                rows += n
                bar.update(tasks_done)
                bar.set_postfix(draws=rows)

            # in this process, on a terminal, each fit's own bar shows its epochs below the sweep's
            in_process = opts.progress and opts.launcher == "local" and sys.stderr.isatty()
            calls = [Call(run_fit, (fit, str(spec.store), str(out), opts.device),
                          {"generation": generation, "progress": in_process, "max_memory_mb": opts.max_memory_mb}, key=f"fit-{fit[0].id}") for fit in fits]
            try:
                entry.run(calls, run, tick)
            finally:
                bar.close()  # also when stopped: the message that follows starts on its own line
        finally:
            FeatureCache.clear()  # the local launcher's tasks ran in this process: free the features
    return load_results(out) if return_results else None


def _check_out_writable(out: Path) -> None:
    """--out (or the nearest folder above it that exists) must take writes: one clear error
    before any work, not an OSError from the first task's commit."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        from featstore.errors import OutputConflictError

        raise OutputConflictError(path=str(out), reason=f"cannot be written ({str(probe)!r} "
                                                        f"{'is not a folder' if not probe.is_dir() else 'denies writes'})")


def sweep_progress(out) -> dict | None:
    """How far a sweep's output is: {"done", "total", "missing": labels of the tasks not done},
    from the spec it records (None when that spec no longer validates)."""
    import json

    from featstore.errors import FeatstoreError

    meta = Path(out) / "sweep.json"
    try:
        recorded = json.loads(meta.read_text())
        spec = dict(recorded["spec"])
        spec.pop("resolved", None)
        tasks = expand_tasks(load_spec(spec), recorded_features(out))
    except (OSError, ValueError, KeyError, TypeError, FeatstoreError):
        return None
    missing = pending_tasks(tasks, out)
    return {"done": len(tasks) - len(missing), "total": len(tasks), "missing": [t.label() for t in missing]}
