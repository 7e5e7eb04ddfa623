"""A sweep's tasks: expansion from the spec, the fits that train them, the per-worker
feature cache, and running one fit.

A task is one (group pairing, mode, seed) batch of probes, plus one full-layer
reference per pairing (per seed): the unit of rows, of task ids and of resumption. A fit
is the tasks of one pairing that train together (``probes.fit_together``: one pass of
the engine; by default every task of the pairing). A fit opens its train and test
groups read-only, trains the probes of its tasks not done, and each task computes its
CKAs and commits its rows (``_results``) on its own.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import featstore
from featstore._datasources import row_extra_keys
from featstore import _launchers
from featstore._launchers import worker_device
import probes
from featstore import faults
from featstore.errors import FeatstoreError, InvalidFeaturesError, MismatchedGroupsError

from ._results import commit_rows, done_count, record_test_labels
from ._spec import SPLIT_ONLY_FIELDS, GroupTable, MetricsTable, SelectionTable, SweepSpec

__all__ = ["Task", "expand_tasks", "plan_fits", "run_fit", "run_task", "check_groups", "FULL_LAYER"]

FULL_LAYER = "full"  # the mode of each pairing's full-layer reference task


@dataclass(frozen=True)
class Task:
    """One unit of work: a (group pairing, mode, seed) batch of probes.

    Attributes
    ----------
    spec_key : str
        The sweep spec's content hash.
    group_index : int
        Which ``[[groups]]`` table.
    group : GroupTable
    mode : str
        A selection mode, or ``"full"`` for the full-layer reference.
    seed : int or None
        The draw seed of seeded modes.
    selection, probe, metrics
        The spec's tables the task runs with.
    """

    spec_key: str
    group_index: int
    group: GroupTable
    mode: str
    seed: int | None
    selection: SelectionTable
    probe: probes.Protocol
    metrics: MetricsTable
    cka_options: tuple[tuple[str, Any], ...]
    features: tuple[str, ...] = ()
    """The content keys of the pairing's train, test and validation groups (their specs' sha256):
    rows computed from other features are other tasks."""
    shared: str = ""
    """The digest of what every task of the sweep shares (selection, metrics), hashed once."""

    @property
    def id(self) -> str:
        """A hash of everything this task's rows depend on (its pairing and the features it reads,
        its resolved protocol and selection, the metrics, mode and seed): a change to one pairing
        changes only its tasks. The shared part is hashed once per sweep, so an id costs the
        same however many seeds the selection lists."""
        shared = self.shared or _shared_digest(self.selection, self.metrics)
        blob = json.dumps([shared, self.group_index, self.group.model_dump(mode="json"),
                           self.probe.model_dump(mode="json"), self.mode, self.seed, list(self.features)],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def label(self) -> str:
        return f"{self.group.label()} {self.mode}" + (f" seed {self.seed}" if self.seed is not None else "")

    def estimator(self, n_neurons: int, device: str, max_memory_mb: int | None = None) -> probes.SubsetProbes:
        """The task's SubsetProbes. A reference task trains the whole layer: under a seed (the
        seed's minibatch order, as the released code's full-layer run: random neurons at
        fraction 1), or as one explicit subset. ``max_memory_mb``: the worker's (default:
        SubsetProbes')."""
        protocol = {**self.probe.model_dump(), "verbose": False}
        if max_memory_mb is not None:
            protocol["max_memory_mb"] = max_memory_mb  # the sweep's own bar says how far it is
        if self.mode == FULL_LAYER and self.seed is not None:
            return probes.SubsetProbes(mode="random", fractions=(1.0,), seeds=(self.seed,), include_full=False,
                                       device=device, **protocol)
        if self.mode == FULL_LAYER:
            return probes.SubsetProbes(subsets=[np.arange(n_neurons)], include_full=False, device=device, **protocol)
        selection = self.selection.model_dump(exclude={"modes", "seeds"})
        return probes.SubsetProbes(mode=self.mode, seeds=(self.seed,) if self.seed is not None else (0,),
                                   include_full=False, device=device, **selection, **protocol)


def _shared_digest(selection: SelectionTable, metrics: MetricsTable) -> str:
    blob = json.dumps([selection.model_dump(mode="json"), metrics.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def expand_tasks(spec: SweepSpec, features: list | None = None) -> list[Task]:
    """The spec's tasks: per pairing, the full-layer reference (per seed), then each mode x seed.

    ``features`` (``resolve_features``): per pairing, the keys of the groups it reads, part of
    every task id; a sweep passes them (resolved from its store, or as its output recorded them).
    """
    selection = spec.selection_for()
    common = dict(spec_key=spec.key(), selection=selection, metrics=spec.metrics,
                  cka_options=tuple(spec.cka_options().items()), shared=_shared_digest(selection, spec.metrics))
    seeded = any(probes.SELECTION_MODES[m].seeded for m in selection.modes)
    tasks = []
    for gi, g in enumerate(spec.pairings()):
        protocol = spec.protocol_for(g)
        keys = tuple(features[gi]["keys"]) if features is not None else ()
        # the full layer under each seed's minibatch order (DR's bootstrap resamples it with the
        # curves); one reference when no mode is seeded or every probe shares one order
        per_seed = protocol.minibatch_order == "per-seed"
        reference_seeds = selection.seeds if seeded and per_seed else (None,)
        tasks += [Task(group_index=gi, group=g, mode=FULL_LAYER, seed=s, probe=protocol, features=keys, **common)
                  for s in reference_seeds]
        for mode in selection.modes:
            for seed in (selection.seeds if probes.SELECTION_MODES[mode].seeded else (None,)):
                tasks.append(Task(group_index=gi, group=g, mode=mode, seed=seed, probe=protocol, features=keys,
                                  **common))
    return tasks


# ----------------------------------------------------------------------------- the groups of a pairing


def open_pair(store, g: GroupTable):
    """The pairing's complete (train, test, validation or None) groups; an error names the
    pairing and split."""
    fs = store if isinstance(store, featstore.FeatureStore) else featstore.open(store)
    groups = []
    for split, query in (("train", g.train_query()), ("test", g.test_query()), ("validation", g.val_query())):
        if query is None:
            groups.append(None)
            continue
        try:
            groups.append(fs.group(**query))
        except FeatstoreError as e:
            raise e.within(f"sweep group {g.label()} ({split})") from None
    return groups


def check_groups(spec: SweepSpec, shapes: dict | None = None) -> list[dict]:
    """Every pairing's groups exist and are complete, and its test (and validation) groups
    match its train group. Returns, per pairing, the features it reads: the groups' names and
    their content keys (``{"train", "test", "val", "keys"}``). ``shapes``, when given, receives
    per pairing what :func:`plan_fits` sizes and joins fits by (``_shape``)."""
    fs = featstore.open(spec.store)
    resolved = []
    for gi, g in enumerate(spec.pairings()):
        train, test, val = open_pair(fs, g)
        # a protocol these rows cannot serve (knn's ks past the train rows), before any task runs
        probes.SubsetProbes(**spec.protocol_for(g).model_dump()).check_rows(train.n_samples, len(train.classes),
                                                                          validation=val is not None)
        if shapes is not None:
            shapes[gi] = _shape(train, val)
        resolved.append({"train": train.name, "test": test.name, "val": val.name if val is not None else None,
                         "keys": [train.spec.key(), test.spec.key(), val.spec.key() if val is not None else ""]})
        present = np.unique(train.labels)
        if len(present) < 2:  # a probe on one class scores 1.0, and a DR from it is meaningless
            raise InvalidFeaturesError(where=f"sweep group {g.label()} (train {train.name})",
                                       problem=f"its labels hold {len(present)} class ({', '.join(train.classes[:3])}):"
                                               f" a probe needs at least 2 classes")
        test_mapping(g, train, test)  # another dataset's classes: they must map onto train's
        for other in (o for o in (test, val) if o is not None):
            a, b = _extraction(train.spec), _extraction(other.spec)
            may_differ = SPLIT_ONLY_FIELDS | ({"dataset"} if other is test and g.class_map() else set())
            diff = {k: (a[k], b[k]) for k in a if k not in may_differ and a[k] != b[k]}
            if train.classes != other.classes and not (other is test and g.class_map()):
                diff["classes"] = ("train's class list", f"{other.spec.split}'s class list")
            if diff:
                raise MismatchedGroupsError(first=train.name, second=other.name, differences=diff,
                                            where=f"sweep group {g.label()}")
    return resolved


def _extraction(spec) -> dict:
    """A group's spec as a dict, its extras that only say which rows it holds (a k-shot subset,
    a source's per-split fingerprint, the images skipped) left out."""
    d = spec.to_dict()
    rows = row_extra_keys()
    d["extra"] = [pair for pair in d.get("extra", []) if pair[0] not in rows]
    return d


def test_mapping(g: GroupTable, train, test) -> tuple[int, ...] | None:
    """Train's class index of each test class when the test group is another dataset's."""
    how = g.class_map()
    if how is None:
        return None
    return tuple(int(i) for i in featstore.class_mapping(train.classes, test.classes, how,
                                                                  train=train.name, test=test.name))


# ----------------------------------------------------------------------------- the worker's cache


class _CachedPair:
    """One pairing's train / test features and the CKA passes taken over them."""

    def __init__(self, key, train, test, val=None):
        self.key, self.train, self.test, self.val = key, train, test, val
        self._statistics: dict = {}
        self._lock = threading.Lock()

    def cka_statistics(self, estimator: str):
        with self._lock:  # tasks of one pairing in threads of one worker take the pass once
            if estimator not in self._statistics:
                self._statistics[estimator] = probes.cka_statistics(self.train.X, estimator)
            return self._statistics[estimator]


class FeatureCache:
    """The pairings of the last fit a worker process ran (``_CachedPair`` each).

    A sweep runs a pairing's tasks in one fit (or a few), so a worker that runs several fits
    of a pairing reads its features and takes the d x d CKA pass once, not per fit. Only the
    pairings of the current fit are held: a fit of other pairings first drops the old, so an
    idle worker never holds layers it is not training. The key includes when each group was
    built and completed, so a group rebuilt in place is read afresh. Thread-safe (``dask
    worker --nthreads N`` runs fits in threads of one process): each fit keeps the entries it
    got, so a thread that moves the cache on never changes the features or statistics a
    running fit uses.
    """

    _entries: dict = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, train, test, val=None, test_map: tuple[int, ...] | None = None) -> _CachedPair:
        return cls.get_many([(train, test, val, test_map)])[0]

    @classmethod
    def get_many(cls, pairs: list[tuple]) -> list[_CachedPair]:
        """The entries of ``pairs`` ((train, test, val, test_map) each), read where not held."""
        keys = [tuple((g.path, g.provenance.get("created"), g.timings.get("completed")) if g is not None else None
                      for g in pair[:3]) + (pair[3],) for pair in pairs]
        with cls._lock:
            cls._entries = {k: e for k, e in cls._entries.items() if k in keys}  # drop the old before reading
            for key, (train, test, val, test_map) in zip(keys, pairs):
                if key not in cls._entries:
                    cls._entries[key] = _read_pair(key, train, test, val, test_map)
            return [cls._entries[k] for k in keys]

    @classmethod
    def key(cls):
        """The key of the entry held (the last, when a fit held several), None when empty."""
        return next(reversed(cls._entries)) if cls._entries else None

    @classmethod
    def clear(cls) -> None:
        cls._entries = {}


def _read_pair(key, train, test, val, test_map) -> _CachedPair:
    data = probes.load_training_data(train)
    if test_map is None:
        test_data = probes.load_training_data(test, n_classes=data.n_classes, where="test")
    else:  # another dataset: its labels in train's class indices
        own = probes.load_training_data(test, where="test")
        test_data = probes.load_training_data(own.X, np.asarray(test_map)[own.y], data.n_classes, where="test")
    val_data = None if val is None else probes.load_training_data(val, n_classes=data.n_classes, where="validation")
    return _CachedPair(key, data, test_data, val_data)


# ----------------------------------------------------------------------------- fits: tasks trained together


def _shape(train, val) -> tuple[int, int, int, str]:
    """(the layer's width, its classes, the train features' bytes in memory: every pass and the
    validation rows, as float32; a digest of the train and validation labels and the views)."""
    rows = train.n_samples * (1 + train.n_views) + (val.n_samples if val is not None else 0)
    digest = hashlib.sha256()  # what a joint fit of several pairings needs equal: labels, validation, views
    for part in (np.asarray(train.labels, dtype=np.int64), None if val is None else np.asarray(val.labels, np.int64)):
        digest.update(b"-" if part is None else part.tobytes())
    digest.update(str(train.n_views).encode())
    return train.n_neurons, len(train.classes), 4 * rows * train.n_neurons, digest.hexdigest()


def plan_fits(tasks: list[Task], shapes: dict[int, tuple], workers: int = 1,
              fits_per_pairing: int | None = None, max_memory_mb: int | None = None,
              share_rows: bool = False) -> list[tuple[Task, ...]]:
    """The fits that train ``tasks``: by default one per pairing, holding every task of it (its
    references and every mode x seed: ``probes.fit_together`` trains them in one pass).

    A pairing is split into more fits when
    - ``fits_per_pairing`` asks for N (at most one per task), or, left None, when the launcher has
      more ``workers`` than pairings: ceil(workers / pairings) fits per pairing, so that every
      worker has one;
    - the joint fit's working memory (``probes.fit_bytes``) would exceed what ``max_memory_mb``
      (default: SubsetProbes') leaves beside the features: tasks are packed into fits that stay
      under it (one task per fit when even one does not).
    With ``share_rows``, pairings that share their rows (the same train labels, validation and
    views, and one protocol: layers of one model, dataset and split) train in one fit, as many
    together as keep every worker busy (all of them with one worker) and fit ``max_memory_mb``
    with their features.
    ``shapes`` (filled by :func:`check_groups`) maps a pairing to its layer's width, its classes, its
    features' bytes in memory (0 when they stay on disk) and its rows' digest. Tasks keep their
    order within a pairing.
    """
    by_pairing: dict[int, list[Task]] = {}
    for t in tasks:
        by_pairing.setdefault(t.group_index, []).append(t)
    if fits_per_pairing is None:
        fits_per_pairing = max(1, -(-workers // max(1, len(by_pairing))))
    limit = (max_memory_mb or probes.SubsetProbesParameters.model_fields["max_memory_mb"].default) << 20
    sizes = {gi: [probes.fit_bytes(t.estimator(shapes[gi][0], "cpu", max_memory_mb), *shapes[gi][:2]) for t in group]
             for gi, group in by_pairing.items()}  # each task's estimated working memory

    def size(gi):
        return shapes[gi][2] + sum(sizes[gi])  # the pairing's features and its tasks' probes

    fits, alone = [], list(by_pairing)
    if share_rows and fits_per_pairing == 1:
        kinds: dict[tuple, list[int]] = {}
        for gi, group in by_pairing.items():
            kinds.setdefault((shapes[gi][3], group[0].probe.model_dump_json()), []).append(gi)
        per_fit = max(1, len(by_pairing) // max(1, workers))  # pairings per fit that keep every worker busy
        alone = []
        for members in kinds.values():
            for at in range(0, len(members), per_fit):
                part = members[at:at + per_fit]
                if len(part) > 1 and sum(size(gi) for gi in part) <= limit:
                    fits.append(tuple(t for gi in part for t in by_pairing[gi]))
                else:
                    alone += part
    for gi in sorted(alone):
        group, feature_bytes = by_pairing[gi], shapes[gi][2]
        budget = limit - feature_bytes if feature_bytes < limit else limit  # beyond it the features stay on disk
        for part, part_sizes in _split_even(group, sizes[gi], min(fits_per_pairing, len(group))):
            fits += _pack(part, part_sizes, budget)
    order = {id(t): i for i, t in enumerate(tasks)}
    return sorted(fits, key=lambda f: order[id(f[0])])


def _split_even(group, sizes, n: int):
    """``group`` in ``n`` consecutive parts of near-equal estimated work (its draws' memory)."""
    if n <= 1:
        return [(group, sizes)]
    total, parts, at, acc = sum(sizes), [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        left = len(group) - i - 1
        if len(parts) < n - 1 and (acc >= total * (len(parts) + 1) / n or left == n - 1 - len(parts)):
            parts.append((group[at:i + 1], sizes[at:i + 1]))
            at = i + 1
    parts.append((group[at:], sizes[at:]))
    return [p for p in parts if p[0]]


def _pack(group, sizes, budget):
    """Consecutive tasks packed into fits whose estimated working memory stays under ``budget``."""
    fits, current, used = [], [], 0
    for t, size in zip(group, sizes):
        if current and used + size > budget:
            fits.append(tuple(current))
            current, used = [], 0
        current.append(t)
        used += size
    fits.append(tuple(current))
    return fits


# ----------------------------------------------------------------------------- running a fit


def run_task(task: Task, store: str, out: str, device: str = "auto", threads: int | None = None,
             generation: dict | None = None, die_with_parent: bool = False) -> int:
    """Run one task alone (its own fit); return its row count. See :func:`run_fit`."""
    return run_fit((task,), store, out, device, threads, generation, die_with_parent)[1]


def run_fit(tasks: tuple[Task, ...], store: str, out: str, device: str = "auto", threads: int | None = None,
            generation: dict | None = None, die_with_parent: bool = False,
            progress: bool = False, max_memory_mb: int | None = None) -> tuple[int, int]:
    """Train the tasks of one pairing (or of pairings that share rows) in one joint fit, evaluate
    and (optionally) CKA each, and commit each task's rows on its own; return (tasks, rows).

    Tasks already done are skipped (their recorded rows counted), so a fit resumed after a crash
    trains only what is missing; each task's rows are what its own fit gives (its draws, initial
    weights and minibatch orders are its own: ``probes.fit_together``). ``generation``: the
    sweep run that launched it (rows are committed only while that run owns the output).
    ``die_with_parent``: a worker process on the sweep's machine (joblib's) is killed by the
    kernel when the sweep dies, even by SIGKILL. ``progress``: a bar over the fit's epochs.
    ``max_memory_mb``: the probes' (default: SubsetProbes').
    """
    import torch

    if die_with_parent:
        _launchers.die_with_parent()
    done = [done_count(out, t) for t in tasks]
    todo = [t for t, n in zip(tasks, done) if n is None]
    rows = sum(n for n in done if n is not None)
    if not todo:
        return len(tasks), rows
    faults.point("fit-started")
    if threads:
        torch.set_num_threads(threads)
    device = worker_device(device)
    t0 = time.perf_counter()
    pairings = list(dict.fromkeys(t.group_index for t in todo))  # several when they share rows
    opened = {}
    for gi in pairings:
        first = next(t for t in todo if t.group_index == gi)
        train, test, val = open_pair(store, first.group)
        found = (train.spec.key(), test.spec.key(), val.spec.key() if val is not None else "")
        if first.features and found != tuple(first.features):
            from featstore.errors import StaleGroupError

            raise StaleGroupError(name=train.name, store=str(store),
                                  reason="the pairing's groups changed since the sweep resolved them (rebuilt or "
                                         "replaced): re-run the sweep")
        opened[gi] = (train, test, val, test_mapping(first.group, train, test))
    cached = dict(zip(pairings, FeatureCache.get_many([opened[gi] for gi in pairings])))  # read once per worker
    estimators = probes.fit_together(
        [t.estimator(opened[t.group_index][0].n_neurons, device, max_memory_mb) for t in todo],
        [cached[t.group_index].train for t in todo], validation=[cached[t.group_index].val for t in todo],
        verbose=progress)
    t_fit = time.perf_counter() - t0
    for gi in pairings:
        record_test_labels(out, gi, cached[gi].test.y)  # what each row's test_correct refers to
    for task, est in zip(todo, estimators):
        faults.point("task-started")
        t1 = time.perf_counter()
        train, test, val, _ = opened[task.group_index]
        res = _task_rows(task, est, cached[task.group_index], train, test, val)
        res["seconds_fit"] = t_fit  # the joint fit's: every task of it trained together
        res["fit_tasks"] = len(todo)
        res["seconds_task"] = res["seconds_cka"] + (time.perf_counter() - t1) + t_fit / len(todo)
        rows += commit_rows(out, task, res, generation)
    return len(tasks), rows


def _task_rows(task: Task, est, cached: _CachedPair, train, test, val):
    """A fitted task's rows: its draws' test results, their CKAs and what they were computed from."""
    data, test_data = cached.train, cached.test
    res = est.evaluate(test_data)
    if task.mode == FULL_LAYER:
        res["mode"] = FULL_LAYER
        res["fraction"] = 1.0
    t1 = time.perf_counter()
    cka_options = dict(task.cka_options)
    if task.metrics.cka:
        selections = [fam.columns[: dr.k] if fam.columns is not None else fam.basis[:, : dr.k]
                      for fam in est.families_ for dr in fam.draws]
        reusable = probes.CKA_ESTIMATORS[cka_options["estimator"]].sums is not None
        stats = cached.cka_statistics(cka_options["estimator"]) if reusable else None
        cka = probes.subset_cka(data.X, selections, statistics=stats, **cka_options)
        res["cka"] = np.asarray(cka)
        res["cka_degenerate"] = cka.degenerate  # cka is NaN there
        res["cka_estimator"] = cka.estimator
        res["cka_shuffle_seed"] = cka.shuffle_seed  # the minibatch estimator's row shuffle, else None
        res["cka_space"] = cka.space  # feature (d x d Gram) or sample (n x n kernels, layers wider than n)
    else:
        res["cka"] = np.nan
        res["cka_degenerate"] = False
        res["cka_estimator"] = None
        res["cka_shuffle_seed"] = None
        res["cka_space"] = None
    t_cka = time.perf_counter() - t1
    res.insert(0, "task", task.id)
    res.insert(1, "group", task.group_index)
    for i, k in enumerate(("model", "layer", "dataset")):
        res.insert(2 + i, k, getattr(task.group, k))
    res["weights"] = train.spec.weights
    res["train_group"] = train.name
    res["test_group"] = test.name
    res["test_dataset"] = test.spec.dataset
    res["val_group"] = val.name if val is not None else None  # None: a seeded share of train validated
    res["n_neurons"] = train.n_neurons
    res["n_classes"] = len(train.classes)
    res["seed"] = task.seed
    res["protocol"] = json.dumps(task.probe.model_dump(mode="json"), sort_keys=True)
    res["pairing_name"] = task.group.name  # the spec's name for the pairing (None: the report makes one)
    res["seconds_cka"] = t_cka
    res["host"] = socket.gethostname()
    if not task.metrics.accuracy:
        res["test_accuracy"] = np.nan
    res["draw"] = res["draw"].astype(np.int64)
    res["seed"] = res["seed"].astype("Int64")
    return res
