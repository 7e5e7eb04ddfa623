"""Sweeps: a TOML spec -> tasks -> resumable Parquet results, on local / joblib / dask.

A spec lists feature groups x selection modes x fractions x seeds x probe protocol x
metrics. It expands into tasks, one per (group, mode, seed) plus one full-layer
reference per group; each task opens its train and test groups once, read-only, trains
its batch of probes (one per fraction), computes their CKAs, and commits its rows
atomically: ``results/<task_id>.parquet`` is written to a temporary name and renamed,
then ``done/<task_id>.json`` records the row count. A task is done exactly when its
record exists, so a sweep killed at any moment and re-run gives the rows of one
uninterrupted run: no duplicates, none missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featstore.errors import (
    FeatstoreError,
    GroupNotFoundError,
    InvalidParameterError,
    StaleGroupError,
    UnknownNameError,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SweepSpec", "Task", "load_spec", "expand_tasks", "run_sweep", "load_results", "run_task", "LAUNCHERS"]

LAUNCHERS = ("local", "joblib", "dask")
PAPER_FRACTIONS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.8, 0.9, 1.0)
SEEDED_MODES = ("random", "randproj")
GROUP_KEYS = ("model", "layer", "dataset", "weights", "pooling", "dtype", "seed")
SPLIT_KEYS = ("split", "limit", "views")
PROBE_KEYS = ("solver", "epochs", "lr", "momentum", "weight_decay", "batch_size", "lr_step", "lr_gamma",
              "val_fraction", "random_state", "precision", "randproj_distribution", "select_epoch")
PROBE_DEFAULTS = dict(solver="sgd", epochs=50, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=256, lr_step=10,
                      lr_gamma=0.1, val_fraction=0.1, random_state=0, precision="fp32",
                      randproj_distribution="uniform", select_epoch="best")
# spec fields that may differ between the train and the test group of one pairing
SPLIT_ONLY_FIELDS = {"split", "limit", "views", "augmentation", "chunk_rows"}


def _keys_error(section: str, table: dict, allowed) -> InvalidParameterError:
    bad = sorted(set(table) - set(allowed))[0]
    value = table[bad]
    shown = "a table" if isinstance(value, (dict, list)) and len(repr(value)) > 40 else repr(value)
    return InvalidParameterError(
        f"Unknown key {bad!r} (= {shown}) in [{section}] of the sweep spec; allowed: {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class GroupPair:
    """One (train, test) pairing of cached feature groups, by query keys."""

    query: tuple[tuple[str, Any], ...]
    train: tuple[tuple[str, Any], ...]
    test: tuple[tuple[str, Any], ...]

    def train_query(self) -> dict:
        return {**dict(self.query), "split": "train", **dict(self.train)}

    def test_query(self) -> dict:
        return {**dict(self.query), "split": "test", **dict(self.test)}

    def label(self) -> str:
        q = dict(self.query)
        return f"{q.get('model', '?')}/{q.get('layer', 'pre_logits')}/{q.get('dataset', '?')}"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep spec (see ``load_spec``)."""

    store: str
    groups: tuple[GroupPair, ...]
    modes: tuple[str, ...]
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    probe: tuple[tuple[str, Any], ...]
    accuracy: bool = True
    cka: bool = True
    cka_estimator: str = "biased"
    cka_batch_size: int = 256

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["groups"] = [{"query": dict(g.query), "train": dict(g.train), "test": dict(g.test)} for g in self.groups]
        d["probe"] = dict(self.probe)
        return d

    def key(self) -> str:
        """sha256 of everything that determines the results (the store path excluded)."""
        d = self.to_dict()
        d.pop("store")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def load_spec(source: str | os.PathLike | dict, store: str | None = None) -> SweepSpec:
    """Parse and validate a sweep spec from a TOML file (or an equivalent dict).

    Example::

        store = "data/featstore.zarr"

        [[groups]]
        model = "tf_efficientnet_lite0"
        layer = "pre_logits"
        dataset = "fashion-mnist"
        train = { limit = 5000 }      # optional split-specific keys (limit, views, split)
        test = { limit = 1000 }

        [selection]
        modes = ["random", "prefix", "pca", "randproj"]
        fractions = [0.01, 0.1, 0.5, 1.0]   # default: the paper's 22
        seeds = [0, 1, 2, 3, 4]

        [probe]
        epochs = 50                   # any SubsetProbes protocol keyword

        [metrics]
        accuracy = true
        cka = true
        cka_estimator = "biased"      # or "unbiased", "minibatch"
    """
    from probes import CKA_ESTIMATORS, SELECTION_MODES

    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidParameterError(f"sweep spec {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidParameterError(f"sweep spec {str(path)!r} is not valid TOML: {e}") from None
    top = {"store", "groups", "selection", "probe", "metrics"}
    if set(raw) - top:
        raise _keys_error("top level", raw, top)
    groups_raw = raw.get("groups")
    if not groups_raw or not isinstance(groups_raw, list):
        raise InvalidParameterError("the sweep spec needs at least one [[groups]] table (model, layer, dataset)")
    groups = []
    for i, g in enumerate(groups_raw):
        allowed = set(GROUP_KEYS) | {"train", "test"}
        if set(g) - allowed:
            raise _keys_error(f"groups[{i}]", g, allowed)
        if "model" not in g or "dataset" not in g:
            raise InvalidParameterError(f"groups[{i}] needs 'model' and 'dataset' (and optionally 'layer', ...)")
        query = {k: v for k, v in g.items() if k in GROUP_KEYS}
        query.setdefault("layer", "pre_logits")
        for name in ("model", "dataset", "layer"):
            v = query[name]
            if not isinstance(v, str) or (name != "dataset" and ("/" in v or ".." in v)):
                raise InvalidParameterError(f"groups[{i}].{name}={v!r} is not a valid name")
        sub = {}
        for split in ("train", "test"):
            s = g.get(split, {})
            if not isinstance(s, dict):
                raise InvalidParameterError(f"groups[{i}].{split} must be a table of {', '.join(SPLIT_KEYS)}")
            if set(s) - set(SPLIT_KEYS):
                raise _keys_error(f"groups[{i}].{split}", s, SPLIT_KEYS)
            sub[split] = tuple(sorted(s.items()))
        groups.append(GroupPair(tuple(sorted(query.items())), sub["train"], sub["test"]))
    sel = raw.get("selection", {})
    allowed = {"modes", "fractions", "seeds"}
    if set(sel) - allowed:
        raise _keys_error("selection", sel, allowed)
    modes = tuple(sel.get("modes", ["random"]))
    for m in modes:
        if m not in SELECTION_MODES:
            raise UnknownNameError("selection mode", m, SELECTION_MODES, "in [selection] modes")
    if not modes or len(set(modes)) != len(modes):
        raise InvalidParameterError(f"[selection] modes={list(modes)!r} must be a non-empty list without repeats")
    fractions = tuple(sel.get("fractions", PAPER_FRACTIONS))
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise InvalidParameterError(f"[selection] fraction {f!r} must be in (0, 1]")
    if not fractions or len(set(fractions)) != len(fractions):
        raise InvalidParameterError("[selection] fractions must be a non-empty list without repeats")
    seeds = tuple(sel.get("seeds", [0, 1, 2, 3, 4]))
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise InvalidParameterError(f"[selection] seed {s!r} must be a non-negative integer")
    if not seeds or len(set(seeds)) != len(seeds):
        raise InvalidParameterError("[selection] seeds must be a non-empty list without repeats")
    probe = dict(raw.get("probe", {}))
    if set(probe) - set(PROBE_KEYS):
        raise _keys_error("probe", probe, PROBE_KEYS)
    probe = {**PROBE_DEFAULTS, **probe}
    from probes import SubsetProbes

    SubsetProbes(**probe)._validate()  # same messages as the estimator itself
    metrics = dict(raw.get("metrics", {}))
    allowed = {"accuracy", "cka", "cka_estimator", "cka_batch_size"}
    if set(metrics) - allowed:
        raise _keys_error("metrics", metrics, allowed)
    est = metrics.get("cka_estimator", "biased")
    if est not in CKA_ESTIMATORS:
        raise UnknownNameError("CKA estimator", est, CKA_ESTIMATORS, "in [metrics] cka_estimator")
    return SweepSpec(
        store=str(store or raw.get("store", "data/featstore.zarr")),
        groups=tuple(groups), modes=modes, fractions=tuple(float(f) for f in fractions), seeds=seeds,
        probe=tuple(sorted(probe.items())), accuracy=bool(metrics.get("accuracy", True)),
        cka=bool(metrics.get("cka", True)), cka_estimator=est, cka_batch_size=int(metrics.get("cka_batch_size", 256)),
    )


@dataclass(frozen=True)
class Task:
    """One unit of work: a (group pairing, mode, seed) batch of probes."""

    spec_key: str
    group_index: int
    group: GroupPair
    mode: str  # a selection mode, or "full" for the full-layer reference
    seed: int | None
    fractions: tuple[float, ...]
    probe: tuple[tuple[str, Any], ...]
    accuracy: bool
    cka: bool
    cka_estimator: str
    cka_batch_size: int

    @property
    def id(self) -> str:
        blob = json.dumps([self.spec_key, self.group_index, self.mode, self.seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def label(self) -> str:
        return f"{self.group.label()} {self.mode}" + (f" seed {self.seed}" if self.seed is not None else "")


def expand_tasks(spec: SweepSpec) -> list[Task]:
    """The spec's tasks: per group, one full-layer reference, then each mode x seed."""
    key = spec.key()
    common = dict(spec_key=key, probe=spec.probe, accuracy=spec.accuracy, cka=spec.cka,
                  cka_estimator=spec.cka_estimator, cka_batch_size=spec.cka_batch_size)
    tasks = []
    for gi, g in enumerate(spec.groups):
        tasks.append(Task(group_index=gi, group=g, mode="full", seed=None, fractions=(1.0,), **common))
        for mode in spec.modes:
            for seed in (spec.seeds if mode in SEEDED_MODES else (None,)):
                tasks.append(Task(group_index=gi, group=g, mode=mode, seed=seed, fractions=spec.fractions, **common))
    return tasks


# ----------------------------------------------------------------------------- checks before work


def _open_pair(store, g: GroupPair):
    import featstore

    fs = featstore.open(store) if not isinstance(store, featstore.FeatureStore) else store
    groups = []
    for split, query in (("train", g.train_query()), ("test", g.test_query())):
        try:
            groups.append(fs.group(**query))
        except FeatstoreError as e:
            raise type(e)(f"sweep group {g.label()} ({split}): {e}") from None
    return groups


def check_groups(spec: SweepSpec) -> None:
    """Every group exists, is complete, and its train and test groups match."""
    import featstore

    fs = featstore.open(spec.store)
    for g in spec.groups:
        train, test = _open_pair(fs, g)
        a, b = train.spec.to_dict(), test.spec.to_dict()
        diff = {k: (a[k], b[k]) for k in a if k not in SPLIT_ONLY_FIELDS and a[k] != b[k]}
        if diff:
            raise StaleGroupError(
                f"sweep group {g.label()}: train group {train.name} and test group {test.name} were built "
                f"with different specs: {diff}; build both with the same model, weights and preprocessing")
        if train.classes != test.classes:
            raise StaleGroupError(f"sweep group {g.label()}: train and test have different class lists")


# ----------------------------------------------------------------------------- running one task


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        from featstore.errors import StoreError

        raise StoreError(f"writing {path} failed: {e.strerror or e}; nothing of this task was recorded, and "
                         f"re-running the sweep resumes from the tasks already done") from e


class _CachedGroup:
    """One group pair's train / test features and the CKA passes taken over them."""

    def __init__(self, key, train, test):
        self.key, self.train, self.test = key, train, test
        self._statistics: dict = {}
        self._lock = threading.Lock()

    def cka_statistics(self, estimator: str):
        import probes

        with self._lock:  # tasks of one group in threads of one worker take the pass once
            if estimator not in self._statistics:
                self._statistics[estimator] = probes.cka_statistics(self.train.X, estimator)
            return self._statistics[estimator]


class _GroupCache:
    """The last group pair a process read (a ``_CachedGroup``).

    A sweep runs a group's tasks one after another (the reference, then each mode x
    seed), so a worker that runs several of them reads the features and takes the
    d x d CKA pass once, not per task. Only one pair is held: a different group first
    drops the old one, so an idle worker never holds two layers. The key includes when
    each group was built and completed, so a group rebuilt in place is read afresh.
    Thread-safe (``dask worker --nthreads N`` runs tasks in threads of one process):
    each task keeps the entry it got, so a thread that moves the cache to another group
    never changes the features or statistics a running task uses.
    """

    _entry: _CachedGroup | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls, train, test) -> _CachedGroup:
        import probes

        key = tuple((g.path, g.provenance.get("created"), g.timings.get("completed")) for g in (train, test))
        with cls._lock:
            if cls._entry is None or cls._entry.key != key:
                cls._entry = None  # drop the old layer before reading the new one
                data = probes.load_training_data(train)
                cls._entry = _CachedGroup(key, data, probes.load_training_data(test, n_classes=data.n_classes,
                                                                                where="test"))
            return cls._entry

    @classmethod
    def key(cls):
        return cls._entry.key if cls._entry is not None else None

    @classmethod
    def clear(cls) -> None:
        cls._entry = None


def run_task(task: Task, store: str, out: str, device: str = "auto", threads: int | None = None) -> int:
    """Train, evaluate and (optionally) CKA one task; commit its rows; return the row count.

    Safe to call again for a done task (it returns its recorded count without work).
    """
    import torch

    from featstore import _faults
    import probes

    out = Path(out)
    done = out / "done" / f"{task.id}.json"
    if done.exists():
        return json.loads(done.read_text())["rows"]
    if threads:
        torch.set_num_threads(threads)
    device = _worker_device(device)
    t0 = time.perf_counter()
    train, test = _open_pair(store, task.group)
    proto = dict(task.probe)
    if task.mode == "full":
        est = probes.SubsetProbes(subsets=[np.arange(train.n_neurons)], include_full=False, device=device, **proto)
    else:
        est = probes.SubsetProbes(mode=task.mode, fractions=task.fractions,
                                  seeds=(task.seed,) if task.seed is not None else (0,),
                                  include_full=False, device=device, **proto)
    cached = _GroupCache.get(train, test)  # read once per group by each worker
    data, test_data = cached.train, cached.test
    est.fit(data)
    t_fit = time.perf_counter() - t0
    res = est.evaluate(test_data)
    if task.mode == "full":
        res["mode"] = "full"
        res["fraction"] = 1.0
    t1 = time.perf_counter()
    if task.cka:
        selections = []
        for fam in est.families_:
            for i, dr in enumerate(fam.draws):
                selections.append(fam.columns[: dr.k] if fam.columns is not None else fam.basis[:, : dr.k])
        stats = cached.cka_statistics(task.cka_estimator) if task.cka_estimator != "minibatch" else None
        cka = probes.subset_cka(data.X, selections, estimator=task.cka_estimator, batch_size=task.cka_batch_size,
                                statistics=stats)
        res["cka"] = np.asarray(cka)
        res["cka_degenerate"] = cka.degenerate
        res["cka_estimator"] = cka.estimator
    else:
        res["cka"] = np.nan
        res["cka_degenerate"] = False
        res["cka_estimator"] = None
    t_cka = time.perf_counter() - t1
    q = dict(task.group.query)
    res.insert(0, "task", task.id)
    res.insert(1, "group", task.group_index)
    for i, k in enumerate(("model", "layer", "dataset")):
        res.insert(2 + i, k, q.get(k))
    res["weights"] = train.spec.weights
    res["train_group"] = train.name
    res["test_group"] = test.name
    res["n_neurons"] = train.n_neurons
    res["n_classes"] = len(train.classes)
    res["seed"] = task.seed
    res["protocol"] = json.dumps(proto, sort_keys=True)
    res["seconds_fit"] = t_fit
    res["seconds_cka"] = t_cka
    res["seconds_task"] = time.perf_counter() - t0
    res["host"] = socket.gethostname()
    if not task.accuracy:
        res["test_accuracy"] = np.nan
    res["draw"] = res["draw"].astype(np.int64)
    res["seed"] = res["seed"].astype("Int64")
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (out / "done").mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    res.to_parquet(buf, index=False)
    _atomic_write_bytes(results / f"{task.id}.parquet", buf.getvalue())
    _faults.point("task-rows")
    _atomic_write_bytes(done, json.dumps({"task": task.id, "rows": len(res), "label": task.label(),
                                          "seconds": res["seconds_task"].iloc[0]}).encode())
    _faults.point("task-done")
    return len(res)


def _worker_device(device: str) -> str:
    """On a multi-GPU machine, dask worker i of a LocalCluster uses cuda:(i mod n_gpus):
    one process per GPU. Workers are spawned processes, so no CUDA state was forked."""
    if device not in ("auto", "cuda"):
        return device
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{index % n}" if n > 1 else device


# ----------------------------------------------------------------------------- the sweep


def _is_ours(entry: Path) -> bool:
    """The lock file, or the temporary file of a sweep.json write that may be in flight."""
    return entry.name == ".lock" or re.fullmatch(r"\.sweep\.json\.[0-9a-f]{8}\.tmp", entry.name) is not None


def _check_out(spec: SweepSpec, out: Path) -> None:
    """Refuse an output directory holding another sweep or foreign files; writes nothing."""
    if out.exists() and not out.is_dir():
        raise InvalidParameterError(f"--out {str(out)!r} is a file; choose a directory")
    # List first, look for sweep.json after: a sweep records it before anything else, so an
    # entry listed while another sweep starts in this directory implies it.
    listed = [p for p in out.iterdir() if not _is_ours(p)] if out.is_dir() else []
    meta = out / "sweep.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if old.get("key") != spec.key():
            raise InvalidParameterError(
                f"--out {str(out)!r} holds results of a different sweep spec (key {old.get('key', '?')[:12]} vs "
                f"{spec.key()[:12]}); use a new output directory or the spec that made it")
        return
    if listed:
        raise InvalidParameterError(f"--out {str(out)!r} is a non-empty directory without a sweep.json; choose a new one")


def _prepare_out(spec: SweepSpec, out: Path) -> None:
    """Under the output lock: check again (another sweep may have just started it), then record the spec."""
    _check_out(spec, out)
    meta = out / "sweep.json"
    if not meta.exists():
        _atomic_write_bytes(meta, json.dumps({"key": spec.key(), "spec": spec.to_dict()}, indent=2,
                                             default=str).encode())


def pending_tasks(spec: SweepSpec, out: str | os.PathLike) -> list[Task]:
    done = Path(out) / "done"
    return [t for t in expand_tasks(spec) if not (done / f"{t.id}.json").exists()]


def run_sweep(spec: SweepSpec | str | os.PathLike, out: str | os.PathLike, launcher: str = "local",
              workers: int | None = None, scheduler: str | None = None, device: str = "auto",
              progress: bool = True, log=None, return_results: bool = True) -> "pd.DataFrame | None":
    """Run (or resume) a sweep and return its results table.

    Parameters
    ----------
    spec : SweepSpec or path to a TOML spec
    out : path
        Output directory (results/, done/, sweep.json).
    launcher : {"local", "joblib", "dask"}
    workers : int, optional
        Processes for joblib / a local dask cluster (default: cores).
    scheduler : str, optional
        Address of an existing dask scheduler (``tcp://host:8786``); workers must reach
        the store path.
    device : {"auto", "cpu", "cuda"}
    return_results : bool
        Load and return the whole results table at the end (its size grows with the
        number of draws; the sweep itself holds one task at a time).
    """
    import fcntl

    from tqdm.auto import tqdm

    say = log or (lambda m: print(m, file=sys.stderr))
    if launcher not in LAUNCHERS:
        raise UnknownNameError("launcher", launcher, LAUNCHERS)
    if scheduler and launcher != "dask":
        raise InvalidParameterError(f"--scheduler is for --launcher dask (got --launcher {launcher})")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise InvalidParameterError(f"workers={workers!r} must be a positive integer")
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    check_groups(spec)  # all before any work
    out = Path(out)
    _check_out(spec, out)  # before anything is created
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"featstore sweep: another sweep is writing to {out}; waiting for it to finish ...")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        _prepare_out(spec, out)
        todo = pending_tasks(spec, out)
        total = len(expand_tasks(spec))
        if len(todo) < total:
            say(f"featstore sweep: {total - len(todo)} of {total} tasks already done; running {len(todo)}")
        bar = tqdm(total=len(todo), unit="task", desc="sweep", disable=not progress, dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)
        n_workers = workers or os.cpu_count() or 1
        rows = 0

        def tick(n):
            nonlocal rows
            rows += n
            bar.update(1)
            bar.set_postfix(draws=rows)

        if launcher == "local":
            for t in todo:
                tick(run_task(t, spec.store, str(out), device))
        elif launcher == "joblib":
            from joblib import Parallel, delayed

            threads = max(1, (os.cpu_count() or 1) // n_workers)
            par = Parallel(n_jobs=n_workers, backend="loky", return_as="generator_unordered")
            for n in par(delayed(run_task)(t, spec.store, str(out), device, threads) for t in todo):
                tick(n)
        else:
            _run_dask(todo, spec, out, n_workers, scheduler, device, tick)
        bar.close()
    finally:
        _GroupCache.clear()  # the local launcher's tasks ran in this process: free the features
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    return load_results(out) if return_results else None


def _run_dask(todo, spec, out, n_workers, scheduler, device, tick):
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        if device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available() and torch.cuda.device_count() > 1:
                n_workers = torch.cuda.device_count()  # one worker process per GPU
        # processes are spawned (distributed's default), never forked after CUDA is touched
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")
        client = Client(cluster)
    try:
        threads = 1 if not scheduler else None
        # workers read the features from the store path themselves; only the small task
        # description travels through the scheduler. retries covers a task whose worker died.
        futures = [client.submit(run_task, t, spec.store, str(out), device, threads, key=f"task-{t.id}",
                                 pure=False, retries=3) for t in todo]
        for fut in as_completed(futures):
            tick(fut.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def load_results(out: str | os.PathLike) -> "pd.DataFrame":
    """The sweep's results as a pandas DataFrame, one row per draw (completed tasks only)."""
    import pandas as pd

    out = Path(out)
    if not (out / "sweep.json").exists():
        raise GroupNotFoundError(f"{str(out)!r} holds no sweep results (no sweep.json)")
    frames = []
    for rec in sorted((out / "done").glob("*.json")):
        info = json.loads(rec.read_text())
        df = pd.read_parquet(out / "results" / f"{info['task']}.parquet")
        if len(df) != info["rows"]:
            raise StaleGroupError(f"results of task {info['task']} hold {len(df)} rows, recorded {info['rows']}")
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["group", "mode", "seed", "fraction", "draw"], na_position="first",
                          kind="stable").reset_index(drop=True)
