"""Several SubsetProbes estimators fitted in one pass of the engine.

A sweep's pairing has many estimators (each (mode, seed) and each full-layer reference is
one, with its own rows and its own resumable commit), but the engine is fastest when every
draw of a layer trains together: families with equal prefix lengths share one batch, one
minibatch read serves every probe, one step runs every product. :func:`fit_together` trains
the draws of every estimator in one joint fit and hands each estimator back fitted as if it
had been fitted alone: its draws, their initial weights and minibatch orders are its own
(``initial_weights`` of its own draw index; each seed's own order), and its batches are laid
out as its own fit lays them out. What the joint fit changes is only how the products are
grouped (more families per batched GEMM), so a probe equals the lone fit's to float rounding
(on this project's CPUs, bit for bit for index modes: ``tests/test_together.py``).
"""

from __future__ import annotations

import numpy as np

from featstore.errors import IncompatibleParametersError

from ._engine import Protocol, SubsetProbes
from ._solvers import SOLVERS
from ._selection import SELECTION_MODES, subset_size

__all__ = ["fit_together", "fit_bytes", "SHARED_PARAMETERS"]

# What one joint fit shares: the protocol (one validation split, one schedule, the same
# minibatch orders per seed) and where and how it runs. The selection (mode, fractions,
# seeds, sizes, subsets, include_full) is each estimator's own.
SHARED_PARAMETERS = tuple(Protocol.model_fields) + ("device", "max_memory_mb", "cuda_graphs")


class _Joint(SubsetProbes):
    """The joint fit: every estimator's families, each draw initialised by its own estimator."""

    def _batches(self, device, dtype, families=None):
        """Index families of every estimator batched together; each estimator's projection
        families in the batches its own fit makes (see the module's docstring)."""
        index = [f for est in self.estimators_ for f in est.families_ if f.columns is not None]
        batches = SubsetProbes._batches(self, device, dtype, index) if index else []
        for est in self.estimators_:
            projected = [f for f in est.families_ if f.columns is None]
            if projected:
                batches += SubsetProbes._batches(self, device, dtype, projected)
        return batches

    def initial_weights(self, draw: int):
        est, local = self.owners_[draw]
        return est.initial_weights(local)

    def _source(self, family) -> int:
        return self.family_sources_[id(family)]

    def _n_features(self, source: int) -> int:
        return self.source_data_[source].X.shape[1]

    def _source_passes(self, data) -> list[list]:
        return [[d.X] + d.views for d in self.source_data_]


def fit_together(estimators: list[SubsetProbes], X, y=None, n_classes: int | None = None, validation=None,
                 verbose: bool | None = None) -> list[SubsetProbes]:
    """Fit every estimator in one pass of the engine; return them, each fitted as if by its own
    ``fit(X, y, n_classes, validation)``.

    ``X`` (and ``validation``) is the features of every estimator, or a list with each
    estimator's own: several layers of the same images (a sweep's pairings that share rows), one
    fit for all of them. Features given as one object are read once. Every estimator's train rows
    must then hold the same labels (one validation split, one minibatch order per seed for all).

    The estimators must agree on every parameter in :data:`SHARED_PARAMETERS` (the protocol,
    the device, the memory budget); their selections may differ (modes, fractions, seeds, sizes,
    explicit subsets, the full-layer reference). ``verbose`` (default: the first estimator's)
    shows one bar over the joint fit's epochs.
    """
    estimators = list(estimators)
    if not estimators:
        raise IncompatibleParametersError(key="estimators", value="[]", reason="fit_together needs at least one")
    host = estimators[0]
    first = host.get_params()
    for i, est in enumerate(estimators[1:], start=1):
        other = est.get_params()
        for key in SHARED_PARAMETERS:
            if not _same(other[key], first[key]):
                raise IncompatibleParametersError(
                    key=key, value=other[key],
                    reason=f"estimator {i} differs from estimator 0 ({first[key]!r}): one joint fit has one protocol, "
                           f"device and memory budget ({', '.join(SHARED_PARAMETERS)})")
    features = _each(X, estimators, "X")
    validations = _each(validation, estimators, "validation")
    device = host.check_params()
    for est in estimators[1:]:
        est.check_params()
    # each distinct (features, validation) once: the joint fit's sources
    keys, source_of = {}, []
    for x, v in zip(features, validations):
        source_of.append(keys.setdefault((id(x), id(v)), len(keys)))
    if not SOLVERS[host.solver].joint:  # nothing to share: each estimator alone
        for est, x, v in zip(estimators, features, validations):
            est.fit(x, y, n_classes, v)
        return estimators
    if not SOLVERS[host.solver].several_layers and len(keys) > 1:  # a closed form gains nothing from a joint pass
        for src in range(len(keys)):
            mine = [i for i, s in enumerate(source_of) if s == src]
            fit_together([estimators[i] for i in mine], features[mine[0]], y, n_classes, validations[mine[0]], verbose)
        return estimators
    prepared = {}
    for i, src in enumerate(source_of):
        if src not in prepared:
            prepared[src] = host._prepare(features[i], y, n_classes, validations[i])
    data, train_idx, val_idx = prepared[0]
    for src, (d, t, v) in prepared.items():
        problem = "other train rows" if len(d.y) != len(data.y) or not np.array_equal(t, train_idx) else \
            "other labels" if not np.array_equal(d.y, data.y) or d.n_classes != data.n_classes else \
            "another number of augmented views" if len(d.views) != len(data.views) else None
        if problem:
            from featstore.errors import InvalidFeaturesError

            raise InvalidFeaturesError(
                where=f"fit_together: the features of estimator {source_of.index(src)} ({d.source})",
                problem=f"{problem} than estimator 0's ({data.source}): one joint fit trains every estimator on the "
                        f"same rows, labels and validation split; fit them apart")
    for est, src in zip(estimators, source_of):
        est._check_row_file(prepared[src][0])
        est._set_draws(prepared[src][0], train_idx, val_idx)
    joint = _Joint(**{**first, "verbose": host.verbose if verbose is None else verbose})
    joint.n_features_in_, joint.n_classes_ = host.n_features_in_, host.n_classes_
    joint.val_indices_, joint.train_indices_ = val_idx, train_idx
    joint._train_labels = data.y  # few-shot rows are drawn by class, per seed, as each estimator's own
    joint.families_ = [f for est in estimators for f in est.families_]
    joint.draws_ = [dr for est in estimators for dr in est.draws_]
    joint.estimators_ = estimators
    joint.owners_ = [(est, i) for est in estimators for i in range(len(est.draws_))]
    joint.streams_ = sorted({s for est in estimators for s in est.streams_}, key=lambda v: (v is not None, v or 0))
    joint.source_data_ = [prepared[src][0] for src in range(len(keys))]
    joint.family_sources_ = {id(f): src for est, src in zip(estimators, source_of) for f in est.families_}
    joint._train(data, train_idx, val_idx, device)
    _hand_back(joint, estimators, device)
    return estimators


def _each(value, estimators, key: str) -> list:
    """``value`` for every estimator: one object for all, or a list with one per estimator."""
    if not isinstance(value, list):
        return [value] * len(estimators)
    if len(value) != len(estimators):
        raise IncompatibleParametersError(key=key, value=f"a list of {len(value)}",
                                          reason=f"a list gives each of the {len(estimators)} estimators its own; "
                                                 f"give one for all, or one per estimator")
    return value


def _same(a, b) -> bool:
    def norm(v):
        return tuple(v) if isinstance(v, list) else v

    return norm(a) == norm(b)


def _hand_back(joint: _Joint, estimators: list[SubsetProbes], device: str) -> None:
    """Each estimator gets its own batches (as its own fit lays them out) holding the joint
    fit's weights of its draws, and its slice of every per-draw record."""
    import torch

    dtype = torch.bfloat16 if joint.precision == "bf16" else None
    at = 0
    for est in estimators:
        n = len(est.draws_)
        est.batches_ = est._batches(device, dtype)
        est.positions_ = est._draw_positions(est.batches_)
        for g in est.batches_:
            g.to("cpu")
        for di, (bi, fi, pi) in enumerate(est.positions_):
            est.batches_[bi].set_probe(fi, pi, *joint.probe_weights(at + di))
        est.val_accuracy_ = joint.val_accuracy_[at:at + n].copy()
        est.best_epoch_ = joint.best_epoch_[at:at + n].copy()
        est.train_loss_ = joint.train_loss_[at:at + n].copy()
        est.solver_records_ = {k: v[at:at + n].copy() for k, v in joint.solver_records_.items()}
        if "ridge_alpha" in est.solver_records_:
            est.ridge_alpha_ = est.solver_records_["ridge_alpha"]
        for attr in ("laid_out_", "cuda_graphs_"):
            if hasattr(joint, attr):
                setattr(est, attr, getattr(joint, attr))
        est.fit_seconds_ = joint.fit_seconds_  # the joint fit's: its draws trained together
        est.joint_draws_ = len(joint.draws_)  # what the joint fit trained: its draws and batches
        est.joint_batches_ = len(joint.batches_)
        at += n


def fit_bytes(est: SubsetProbes, n_neurons: int, n_classes: int) -> int:
    """What an estimator's draws add to a fit's working memory, estimated from its selection
    (before any data is read): per draw its weights five times over (parameters, gradient,
    momentum, best epoch's copy, initial weights) and its logits, under each pair of an lr x
    weight-decay grid, per family a minibatch of its inputs, per minibatch stream (seed) its minibatch of the layer, and a projection's basis. The
    features themselves are not counted (a joint fit reads them once for every estimator)."""
    d, C, B = n_neurons, n_classes, est.batch_size
    if est.subsets is not None:
        families = [[len(np.atleast_1d(s)) for s in est.subsets]]
    else:
        ks = [subset_size(f, d) for f in est.fractions] + [min(int(k), d) for k in est.sizes or ()]
        families = [ks] * (len(est.seeds) if SELECTION_MODES[est.mode].seeded else 1)
    if est.include_full:
        per_seed = est.subsets is None and SELECTION_MODES[est.mode].seeded and est.minibatch_order == "per-seed"
        families += [[d]] * (len(est.seeds) if per_seed else 1)
    grid = len(est.lrs or (None,)) * len(est.weight_decays or (None,))  # each pair: its own copy of the probes
    floats = 0
    for ks in families:
        width = max(ks)
        floats += grid * (5 * C * (sum(ks) + len(ks)) + B * C * len(ks)) + B * width + B * d
        if est.subsets is None and SELECTION_MODES[est.mode].projection:
            floats += d * width
    return 4 * floats
