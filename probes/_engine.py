"""Train thousands of linear probes on neuron subsets at once, from cached features.

This module holds the estimator (``SubsetProbes``: its parameters, the draws, the validation
split, initial weights and minibatch orders, inference); ``_data`` the training data,
``_batch`` the layout below, ``_solvers`` the solver registry (``_sgd``, ``_ridge``: one
module each) and ``_together`` the joint fit of several estimators.

Layout. Draws are grouped into *families* (one ordering of the layer cut at increasing
prefix lengths k_1 <= ... <= k_m; see ``_selection``), and families with the same
lengths are trained together as one *batch* (``_ProbeBatch``). A family's ordered inputs are split into
*segments* [k_{j-1}, k_j); probe i sees segments 0..i. Consecutive segments are merged
into *column blocks* at least ``MIN_BLOCK_WIDTH`` wide (a product a few columns wide is
all overhead); block (a, lo, hi) holds the weights of probes a..m-1 on columns lo..hi
as one tensor (families, (m - a) * classes, hi - lo), and the corner of a probe shorter
than hi is held at zero by masking its gradient. A minibatch's logits are the bias plus
one batched product per block, and one read of the minibatch serves every probe.

Inputs. A block's inputs for a minibatch are one contiguous (families, B, hi - lo) tensor,
so each product is a plain batched GEMM. They are filled by a row gather from the pass laid
out once per fit by column block (``_ProbeBatch.lay_out``: each family's columns in its own
order, or its projection; in bf16 with ``precision="bf16"``) while that fits
``max_memory_mb``; otherwise from the minibatch's columns. Both give the same values, so the
same probes.

Index probes that see at least ``DENSE_FRACTION`` of the layer go to one *dense* batch
instead: weights in the layer's own neuron order (zero off the probe's subset), all
families together, so their logits are one wide product with the raw minibatch, with
no gather; at k close to d that costs a few wasted multiply-adds and is far cheaper
than thin per-family products.

Training (``_sgd``) is plain SGD with momentum and weight decay, the same update
``torch.optim.SGD`` applies, on the exact gradient of each probe's own mean
cross-entropy (written out, not autograd, to avoid padded intermediates), so a probe
trained in a batch equals the same probe trained alone with the same initial weights
and minibatch order.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from featstore import Device, resolve_device
from featstore.errors import IncompatibleParametersError, InvalidFeaturesError, InvalidParameterError, NotFittedError
from featstore.params import Estimator, OneOf, Parameters, SeedValue, Unique

from . import _batch
from ._batch import _Minibatch, _ProbeBatch, cpu_has_bf16
from ._data import DEFAULT_MAX_MEMORY_MB, TrainingData, _with_validation, load_training_data
from ._inputs import RowFile, as_features
from ._selection import SELECTION_MODES, Family, Selection, make_families
from ._metrics import METRICS
from ._solvers import SOLVERS

INDEX_MODES = tuple(name for name, m in SELECTION_MODES.items() if not m.projection)

__all__ = ["SubsetProbes", "Protocol", "SOLVERS", "load_training_data"]

Precision = Literal["fp32", "bf16"]
MinibatchOrder = Literal["per-seed", "shared"]


class Protocol(Parameters):
    """How each probe is trained: the paper's protocol by default (appendix B). A sweep's
    ``[probe]`` table takes exactly these keys."""

    solver: Annotated[str, OneOf(SOLVERS, "solver")] = "sgd"
    """How every probe is trained (probes.SOLVERS): sgd, the paper's protocol (SGD with momentum, the best
    validation epoch); ridge, closed-form ridge regression to one-hot targets, regularisation chosen on the
    validation split (a fast screening solver); lbfgs, L2-penalised multinomial logistic regression by
    L-BFGS, C chosen per probe from Cs on the validation split (CLIP's and DINOv2's protocol); knn, a weighted
    vote of the k most cosine-similar train rows, k chosen per probe from ks on the validation split (DINOv2's
    kNN evaluation)."""
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 50
    """SGD epochs."""
    lr: Annotated[float, Field(gt=0, le=1000)] = 0.1
    """Initial learning rate (lrs: a grid of them instead)."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum."""
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-4
    """L2 weight decay, as torch.optim.SGD applies it."""
    lrs: Annotated[tuple[Annotated[float, Field(gt=0, le=1000)], ...], Field(min_length=1, strict=False),
                   Unique()] | None = None
    """sgd: a grid of initial learning rates in place of lr: every probe trained under each (times each of
    weight_decays) in the same pass, keeping the one its validation split scores best (DINOv2's linear.py
    grid); rows record the chosen lr. None: lr alone."""
    weight_decays: Annotated[tuple[Annotated[float, Field(ge=0, le=1)], ...], Field(min_length=1, strict=False),
                             Unique()] | None = None
    """sgd: a grid of weight decays in place of weight_decay, crossed with lrs (or lr); rows record the
    chosen weight_decay. None: weight_decay alone."""
    batch_size: Annotated[int, Field(ge=1, le=1 << 20)] = 256
    """Minibatch size."""
    lr_step: Annotated[int, Field(ge=1, le=10_000)] = 10
    """Epochs between learning-rate decays."""
    lr_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Learning-rate decay factor."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Seeded validation share of train used to pick each probe's best epoch (and ridge's alpha)."""
    random_state: SeedValue = 0
    """Seeds the validation split, the minibatch order and the initial weights."""
    val_split: Literal["numpy", "random_split"] = "numpy"
    """How the validation rows are drawn: numpy (a seeded permutation, round(val_fraction * n) rows) or
    random_split (exactly torch.utils.data.random_split after seed_everything(random_state), as the released
    code: train = the first int((1 - val_fraction) * n) of torch.randperm(n))."""
    precision: Precision = "fp32"
    """bf16: bf16 matmuls with fp32 master weights, on CUDA or on CPUs with native bf16 (AVX512-BF16 / AMX)."""
    ridge_alphas: Annotated[tuple[Annotated[float, Field(gt=0, le=1e6)], ...], Field(min_length=1, strict=False)] = (
        1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """Regularisation grid of the ridge solver (relative to the mean Gram diagonal)."""
    select_epoch: Literal["best", "last"] = "best"
    """Keep each probe's weights from its best validation epoch (the paper) or the last."""
    val_every: Annotated[int, Field(ge=1, le=10_000)] = 1
    """Validate (and so allow a best epoch) every this many epochs (the released code: 5, as Lightning's
    check_val_every_n_epoch); with fewer epochs than that, after the last."""
    val_transform: Literal["clean", "augmented"] = "clean"
    """Which images validation scores: clean (the clean pass, the paper's text) or augmented (with cached views,
    the pass each validating epoch trained on, as the released code's random_split validation rows kept the train
    transform). Rows of a separate validation group (Flowers' official split) are scored clean either way."""
    train_passes: Literal["all", "views"] = "all"
    """Which passes of a group with augmented views the epochs train on: all (epoch e reads pass e mod (1 + K)),
    or views (the augmented ones only, as the released code augments every epoch; the clean pass then only
    validates, and PCA directions are fitted on the first view). Without views, the clean pass."""
    Cs: Annotated[tuple[Annotated[float, Field(gt=0, le=1e12)], ...], Field(min_length=1, strict=False),
                  Unique()] = tuple(float(10.0 ** p) for p in range(-6, 6))
    """lbfgs: the inverse regularisation strengths tried (scikit-learn's C: the penalty is ||W||^2 / (2 C) on the
    summed cross-entropy), each probe keeping the one its validation split scores best; default DINOv2's range,
    1e-6 ... 1e5, one per decade."""
    max_iter: Annotated[int, Field(ge=1, le=100_000)] = 1000
    """lbfgs: iterations per C at most (scikit-learn's default is 100; a probe that stops there is recorded
    as not converged)."""
    tol: Annotated[float, Field(gt=0, le=1)] = 1e-4
    """lbfgs: a probe has converged when its objective's largest gradient entry is at most this (scipy's gtol;
    scikit-learn's default tol)."""
    refit: bool = False
    """lbfgs: after each probe's C is chosen on the validation rows, train it again on the train and
    validation rows with that C (CLIP's protocol); its val_accuracy stays the selection's."""
    ks: Annotated[tuple[Annotated[int, Field(ge=1, le=100_000)], ...], Field(min_length=1, strict=False),
                  Unique()] = (10, 20, 100, 200)
    """knn: the neighbour counts tried, each probe keeping the one its validation split scores best (the
    smallest on a tie); default DINOv2's nb_knn."""
    knn_weights: Literal["temperature", "distance", "uniform"] = "temperature"
    """knn: how neighbours vote: temperature (DINOv2: a softmax of the cosine similarities over max(ks)
    neighbours at knn_temperature), distance (scikit-learn's weights="distance", metric="cosine": 1 / (1 -
    cos)) or uniform."""
    knn_temperature: Annotated[float, Field(gt=0, le=100)] = 0.07
    """knn: the temperature of the temperature vote (DINOv2's T)."""
    minibatch_order: MinibatchOrder = "per-seed"
    """per-seed: each seed's probes see their own minibatch order, as the released code (one run per seed,
    everything seeded); shared: every probe one order (fewer minibatch reads; seeds then share that noise)."""
    shots: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Few-shot probes: each seed's probes train on K images per class of the train rows (all of a class with
    fewer), drawn by that seed (CLIP_benchmark's --fewshot_k; unseeded draws, and every draw under a shared
    order, one draw of their own); validation keeps its rows. None: every train row. The sgd solver."""


class _Runtime(Parameters):
    subsets: Any = None
    """Explicit neuron lists (index arrays) instead of (mode, fractions, seeds)."""
    device: Device = "auto"
    """auto (cuda when present), cpu, cuda or cuda:N."""
    include_full: bool = True
    """Train the full layer (f = 1) alongside as the reference."""
    verbose: bool = True
    """Progress bar over epochs (a fit can take minutes; sweeps turn it off for their own bar)."""
    max_memory_mb: Annotated[int, Field(ge=16)] = DEFAULT_MAX_MEMORY_MB
    """Train features (a featstore group or zarr array) larger than this, as float32 over every pass, stay on
    disk: written once to a scratch file in their stored dtype, each minibatch reads its rows (index modes
    and SGD only). In memory, each pass is also laid out once by column block (n x width per family) while
    that fits beside the features, so minibatches gather rows, not columns. The result does not depend on it."""
    cuda_graphs: bool = True
    """On CUDA, with the features on the GPU: capture each full training step once as a CUDA graph and replay
    it (one launch per step instead of ~75 kernel launches from Python). The same kernels and arithmetic as
    the eager path (False), which the last partial minibatch and the CPU always use."""


class SubsetProbesParameters(_Runtime, Protocol, Selection):
    """Every parameter of :class:`SubsetProbes`: the selection, the protocol, the runtime."""


class SubsetProbes(Estimator):
    """Linear probes on many neuron subsets of one layer, trained together.

    Parameters are declared once, in :class:`SubsetProbesParameters` (the selection, the
    training :class:`Protocol` and the runtime); ``help(SubsetProbes.__init__)`` lists them
    with their types, ranges and defaults. The estimator follows scikit-learn's contract:
    keyword-only ``__init__`` that stores the arguments, ``get_params`` / ``set_params``,
    validation in :meth:`fit`, learned state in attributes ending in ``_``.

    Training is plain SGD with momentum and weight decay, the update ``torch.optim.SGD``
    applies, on each probe's own mean cross-entropy; a probe trained in a batch equals the
    same probe trained alone with the same initial weights and minibatch order.
    """

    _parameters = SubsetProbesParameters

    # ------------------------------------------------------------------ validation
    def check_params(self) -> str:
        """Validate every parameter against its declaration, and the precision against the
        device; return the resolved device. ``fit`` calls it; a sweep calls it before any work.
        """
        self._validated_params()
        device = resolve_device(self.device)
        if self.precision not in SOLVERS[self.solver].precisions:
            raise IncompatibleParametersError(
                key="precision", value=self.precision,
                reason=f"solver {self.solver!r} runs at {', '.join(SOLVERS[self.solver].precisions)}")
        for key in ("lrs", "weight_decays"):
            if getattr(self, key) is not None and not SOLVERS[self.solver].sgd_grid:
                raise IncompatibleParametersError(
                    key=key, value=list(getattr(self, key)),
                    reason=f"a grid of SGD hyperparameters is trained by "
                           f"{', '.join(n for n, e in SOLVERS.items() if e.sgd_grid)}, not by solver {self.solver!r}")
        if self.shots is not None and not SOLVERS[self.solver].few_shot:
            raise IncompatibleParametersError(
                key="shots", value=self.shots,
                reason=f"few-shot rows per seed are trained by {', '.join(n for n, e in SOLVERS.items() if e.few_shot)}"
                       f", not by solver {self.solver!r}")
        if self.precision == "bf16" and device == "cpu" and not cpu_has_bf16():
            raise IncompatibleParametersError(
                key="precision", value="bf16",
                reason="bf16 on the CPU needs native bf16 matmuls (AVX512-BF16 or AMX), which this CPU lacks; "
                       "use precision='fp32' or a CUDA device")
        return device

    def check_rows(self, n_samples: int, n_classes: int, validation: bool = False) -> None:
        """Refuse, before any data is read, a protocol that ``n_samples`` rows of ``n_classes``
        classes cannot serve (a solver's own check, on the most train rows the probes can have:
        all of them beside a separate ``validation`` group, else those the validation split
        leaves, at most ``shots`` per class). ``fit`` checks the rows it really has too."""
        check = SOLVERS[self.solver].check_rows
        if check is None:
            return
        n_train = n_samples if validation else n_samples - self._n_validation(n_samples)
        if self.shots is not None:
            n_train = min(n_train, self.shots * n_classes)
        check(self, n_train)

    def _n_validation(self, n: int) -> int:
        """How many of n rows the validation split takes (``val_split``'s rule)."""
        if self.val_split == "random_split":
            return n - int((1 - self.val_fraction) * n)
        return max(1, int(round(self.val_fraction * n)))

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, n_classes: int | None = None, validation=None) -> "SubsetProbes":
        """Train every probe.

        Parameters
        ----------
        X : array of shape (n_samples, n_neurons), torch tensor or featstore.Group
            Train features; a group's augmented views, if any, are read one per epoch
            (epoch e uses pass e mod (1 + views); with ``train_passes="views"`` only the views).
        y : array of shape (n_samples,), optional
            Labels (default for a group: its labels).
        n_classes : int, optional
            Default: the group's classes, or max(y) + 1.
        validation : featstore.Group, TrainingData or (X_val, y_val), optional
            The rows that pick each probe's best epoch (an official validation split, say
            Flowers102's); then every row of X trains. Default: a seeded ``val_fraction`` of X.
        """

        device = self.check_params()
        data, train_idx, val_idx = self._prepare(X, y, n_classes, validation)
        self._set_draws(data, train_idx, val_idx)
        self._train(data, train_idx, val_idx, device)
        return self

    def _prepare(self, X, y, n_classes, validation) -> tuple[TrainingData, np.ndarray, np.ndarray]:
        """The training data and its (train rows, validation rows); checked."""
        data = load_training_data(X, y, n_classes, max_memory_mb=self.max_memory_mb)
        self._check_row_file(data)
        if validation is not None:
            data, train_idx, val_idx = _with_validation(data, validation)
        else:
            val_idx, train_idx = self._validation_split(len(data.X), data.source)
        trained = np.unique(data.y[train_idx])
        if len(trained) < 2:
            raise InvalidFeaturesError(
                where=data.source, problem=f"the train rows hold {len(trained)} class"
                                           f"{'' if len(trained) == 1 else 'es'} ({data.n_classes} declared): a probe "
                                           f"needs at least 2 to separate, and would score 1.0 on one")
        return data, train_idx, val_idx

    def _check_row_file(self, data: TrainingData) -> None:
        """Features read from disk by minibatch serve SGD on index modes only."""
        streams = SOLVERS[self.solver].reads_from_disk
        if isinstance(data.X, RowFile) and (not streams or (self.subsets is None and self.mode not in INDEX_MODES)):
            raise IncompatibleParametersError(
                key="mode" if streams else "solver", value=self.mode if streams else self.solver,
                reason=f"the train features ({data.X.shape[0]} x {data.X.shape[1]}) exceed max_memory_mb="
                       f"{self.max_memory_mb} and are read from disk by minibatch, which serves the solver"
                       f" {', '.join(n for n, e in SOLVERS.items() if e.reads_from_disk)} on neuron subsets "
                       f"({', '.join(INDEX_MODES)}); projections and the other solvers need them in memory. Raise "
                       f"max_memory_mb or use an index mode")

    def _set_draws(self, data: TrainingData, train_idx, val_idx) -> None:
        """The estimator's families and draws (and its full-layer references), from its selection."""
        n, d = data.X.shape
        # PCA directions come from what the probes train on: with train_passes="views", the first
        # augmented view (as the released code fits them on augmented train features)
        fitted_on = data.views[0] if self.train_passes == "views" and data.views else data.X
        fams = make_families(d, self.mode, self.fractions, self.seeds,
                             X_train=None if isinstance(fitted_on, RowFile) else fitted_on[train_idx],
                             subsets=self.subsets, randproj_distribution=self.randproj_distribution,
                             sizes=self.sizes)
        per_seed = self.minibatch_order == "per-seed"
        self.streams_ = sorted({f.seed for f in fams} if per_seed else {None}, key=lambda v: (v is not None, v or 0))
        if self.include_full:  # the reference, under each stream's order (each seed's run has its own)
            from ._selection import Draw

            for seed in self.streams_:
                full = Draw("full", 1.0, d, seed, neurons=np.arange(d))
                fams.append(Family("full", seed, (d,), [full], columns=np.arange(d)))
        self.n_features_in_ = d
        self.n_classes_ = data.n_classes
        self.families_ = fams
        self.draws_ = [dr for f in fams for dr in f.draws]
        self.init_positions_ = _positions_within(self.draws_)
        self.val_indices_ = val_idx
        self.train_indices_ = train_idx
        self._train_labels = data.y  # the classes few-shot rows are drawn from
        self.__dict__.pop("_shot_rows", None)

    def _train(self, data: TrainingData, train_idx, val_idx, device) -> None:
        t0 = time.perf_counter()
        SOLVERS[self.solver].fit(self, data, train_idx, val_idx, device)
        self.fit_seconds_ = time.perf_counter() - t0

    def _validation_split(self, n: int, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(validation rows, train rows), sorted, seeded by ``random_state``."""
        if self.val_split == "random_split":
            # torch.utils.data.random_split(ds, [int((1 - f) n), rest]) after seed_everything(random_state)
            import torch

            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.random_state)).numpy()
            n_val = self._n_validation(n)
            val, train = perm[n - n_val:], perm[:n - n_val]
        else:
            perm = np.random.default_rng(self.random_state).permutation(n)
            n_val = self._n_validation(n)
            val, train = perm[:n_val], perm[n_val:]
        if len(train) < 1 or len(val) < 1:
            raise InvalidFeaturesError(where=source, problem=f"train split has {n} samples: too few for a "
                                                             f"{self.val_fraction:.0%} validation split")
        return np.sort(val), np.sort(train)

    def epoch_order(self, epoch: int, seed: int | None = None) -> np.ndarray:
        """The train rows of ``epoch`` in minibatch order for the probes of draw seed ``seed``
        (with ``minibatch_order="per-seed"``; unseeded draws, and every draw under "shared",
        use ``seed=None``): a permutation of that seed's train rows (:meth:`train_rows`)."""
        key = [self.random_state, 11, epoch] if seed is None else [self.random_state, 11, epoch, 1, seed]
        return np.random.default_rng(key).permutation(self.train_rows(seed))

    def train_rows(self, seed: int | None = None) -> np.ndarray:
        """The train rows the probes of draw seed ``seed`` train on, sorted: every train row, or
        with ``shots = K`` the first K of each class in an order seeded by the seed (every row of a
        class with fewer), so every seed trains on as many rows."""
        if self.shots is None:
            return self.train_indices_
        cache = self.__dict__.setdefault("_shot_rows", {})
        if seed not in cache:
            rng = np.random.default_rng([self.random_state, 13] + ([] if seed is None else [1, int(seed)]))
            rows = rng.permutation(self.train_indices_)
            y = self._train_labels[rows]
            cache[seed] = np.sort(np.concatenate([rows[y == c][:self.shots] for c in np.unique(y)]))
        return cache[seed]

    def _stream(self, family: Family) -> int:
        return self.streams_.index(family.seed if self.minibatch_order == "per-seed" else None)

    def _batches(self, device, dtype, families: list[Family] | None = None):
        """The training batches of ``families`` (default: every family): index probes with
        k >= DENSE_FRACTION * d in dense batches (the raw layer; one pseudo-family per minibatch
        stream); the rest grouped by prefix lengths. Within a batch, families are sorted by stream.
        Families of different features (``_source``: a joint fit's layers) never share a batch."""
        from dataclasses import replace

        by_len: dict[tuple, list[Family]] = {}
        dense: dict[tuple, list] = {}  # (source, stream) -> its dense draws
        for f in self.families_ if families is None else families:
            src = self._source(f)
            if f.columns is not None:
                cut = sum(1 for k in f.lengths if k < _batch.DENSE_FRACTION * self._n_features(src))
                dense.setdefault((src, self._stream(f)), []).extend(f.draws[cut:])
                if cut == 0:
                    continue
                f = replace(f, lengths=f.lengths[:cut], draws=f.draws[:cut])
            # index families and projection families cannot share one gather
            by_len.setdefault((src, f.lengths, f.columns is not None), []).append(f)
        batches = []
        for (src, lengths, _), fs in by_len.items():
            fs = sorted(fs, key=self._stream)
            batches.append(_ProbeBatch(fs, lengths, self.n_classes_, device, dtype,
                                       streams=[self._stream(f) for f in fs]))
            batches[-1].source = src
        by_count: dict[tuple, list] = {}  # a batch's pseudo-families need equal probe counts
        for (src, stream), draws in sorted(dense.items()):
            if draws:
                by_count.setdefault((src, len(draws)), []).append((stream, draws))
        for (src, m), members in by_count.items():
            d = self._n_features(src)
            fams = [Family("dense", None, (d,) * m, draws) for _, draws in members]
            batches.append(_ProbeBatch(fams, (d,) * m, self.n_classes_, device, dtype,
                                       dense=[[np.asarray(dr.neurons) for dr in draws] for _, draws in members],
                                       streams=[stream for stream, _ in members]))
            batches[-1].source = src
        return batches

    # one set of features (a joint fit of several layers overrides these three)
    def _source(self, family: Family) -> int:
        """Which of the fit's features a family reads (0: the one X of a plain fit)."""
        return 0

    def _n_features(self, source: int) -> int:
        return self.n_features_in_

    def _source_passes(self, data: TrainingData) -> list[list]:
        """Per set of features, its passes (the clean pass, then the augmented views)."""
        return [[data.X] + data.views]

    def initial_weights(self, draw: int):
        """The initial (weight (k, C), bias (C,)) of a draw: nn.Linear's default uniform init.

        Seeded by the draw's position among the draws of its own (mode, seed)
        (``init_positions_``), so a seed's probes start alike whatever else the fit trains (other
        seeds, modes, a sweep's other tasks): a fit of seeds 0..4 gives each seed the probes a fit
        of that seed alone gives. The full-layer reference of each stream (``include_full``) is
        seeded by that stream's seed, so the references of different seeds start apart.
        """
        dr = self.draws_[draw]
        k = dr.k
        key = [self.random_state, 7, int(self.init_positions_[draw])] if dr.mode != "full" else \
            [self.random_state, 8] + ([] if dr.seed is None else [int(dr.seed)])
        g = np.random.default_rng(key)
        bound = 1.0 / math.sqrt(k)
        return (g.uniform(-bound, bound, size=(k, self.n_classes_)).astype(np.float32),
                g.uniform(-bound, bound, size=self.n_classes_).astype(np.float32))

    def _draw_positions(self, batches):
        """For each draw: (batch index, family index in the batch, probe index in the family)."""
        pos = {}
        for bi, g in enumerate(batches):
            for fi, fam in enumerate(g.families):
                for pi, dr in enumerate(fam.draws):
                    pos[id(dr)] = (bi, fi, pi)
        return [pos[id(dr)] for dr in self.draws_]

    # ------------------------------------------------------------------ inference
    def decision_function(self, X) -> np.ndarray:
        """Logits of every probe, array of shape (n_samples, n_draws, n_classes) (solver knn: each
        class's weighted vote)."""
        import torch

        self._check_fitted()
        features = X if isinstance(X, RowFile) else as_features(X)
        if features.n_neurons != self.n_features_in_:
            raise InvalidFeaturesError(where=features.where, problem=f"{features.n_neurons} neurons; the probes were "
                                                                     f"fitted on {self.n_features_in_}")
        if SOLVERS[self.solver].scores is not None:  # no linear layer: the solver's own scores
            return SOLVERS[self.solver].scores(self, features)
        if isinstance(features, RowFile):  # on disk: read in row chunks
            n, rows = features.n_samples, lambda a, b: torch.from_numpy(features.rows(a, b))
        else:
            Xt = torch.from_numpy(features.numpy())
            n, rows = len(Xt), lambda a, b: Xt[a:b]
        out = np.empty((n, len(self.draws_), self.n_classes_), dtype=np.float32)
        with torch.no_grad():
            for bi, g in enumerate(self.batches_):
                mine = [(di, fi, pi) for di, (bj, fi, pi) in enumerate(self.positions_) if bj == bi]
                step = g.chunk_rows()
                for start in range(0, n, step):
                    Xb = rows(start, start + step)
                    logits = g.logits(g.inputs(_Minibatch(Xb, len(self.streams_)))).view(g.F, g.m, g.C, len(Xb))
                    for di, fi, pi in mine:
                        out[start:start + len(Xb), di] = logits[fi, pi].T.numpy()
        return out

    def probe_weights(self, draw: int) -> tuple[np.ndarray, np.ndarray]:
        """The learned (weight (k, n_classes), bias (n_classes,)) of one draw.

        Rows follow the draw's own inputs: ``draws_[draw].neurons`` for index modes, the
        projection's directions otherwise. ``X[:, neurons] @ weight + bias`` are its logits.
        """
        self._check_fitted()
        if SOLVERS[self.solver].scores is not None:
            raise IncompatibleParametersError(key="solver", value=self.solver,
                                              reason="its probes hold no weights (decision_function gives its scores)")
        if not 0 <= draw < len(self.draws_):
            raise InvalidParameterError(key="draw", value=draw,
                                        expected=f"an integer in 0..{len(self.draws_) - 1} (the estimator's draws)")
        bi, fi, pi = self.positions_[draw]
        return self.batches_[bi].probe_weights(fi, pi)

    def predict(self, X) -> np.ndarray:
        """Predicted classes, array of shape (n_samples, n_draws)."""
        return self.decision_function(X).argmax(-1)

    def score(self, X, y=None) -> float:
        """Mean test accuracy, as scikit-learn's classifiers define ``score``: that of the full-layer
        probe (averaged over its per-seed runs), or, fitted with ``include_full=False``, the mean
        over every draw. Per-draw accuracies: :meth:`evaluate`."""
        res = self.evaluate(X, y)
        full = res[res["mode"] == "full"]
        return float((full if len(full) else res)["test_accuracy"].mean())

    def evaluate(self, X, y=None):
        """Per-probe results on a test split, as a pandas DataFrame (one row per draw).

        Columns: draw, mode, fraction, k, seed, each metric of ``probes.METRICS`` (test_accuracy,
        test_top5_accuracy, test_balanced_accuracy, test_macro_f1), per_class_accuracy (list; NaN
        for a class absent from the split), test_correct (bool array of shape (n_test,): which test
        samples the probe classifies right, for paired bootstraps over test images),
        val_accuracy, best_epoch, train_loss, solver, the solver's own records (lbfgs: C, n_iter,
        converged; ridge: ridge_alpha), neurons / projection / rank (the draw's record).
        """
        import pandas as pd

        self._check_fitted()
        data = load_training_data(X, y, self.n_classes_, where="test", max_memory_mb=self.max_memory_mb)
        logits = self.decision_function(data.X)
        pred = logits.argmax(-1)
        correct = pred == data.y[:, None]
        scores = {m.column: m.compute(logits, pred, data.y, self.n_classes_) for m in METRICS.values()}
        counts = np.bincount(data.y, minlength=self.n_classes_)
        rows = []
        for di, dr in enumerate(self.draws_):
            # a class with no test sample has no accuracy: NaN, not 0 (it would inflate Gini / CoV)
            per_class = np.where(counts > 0, np.bincount(data.y[correct[:, di]], minlength=self.n_classes_)
                                 / np.maximum(counts, 1), np.nan)
            rec = dr.record()
            rows.append({"draw": di, "mode": dr.mode, "fraction": dr.fraction, "k": dr.k, "seed": dr.seed,
                         **{column: float(v[di]) for column, v in scores.items()},
                         "per_class_accuracy": per_class.tolist(),
                         "test_correct": correct[:, di].copy(),
                         "val_accuracy": float(self.val_accuracy_[di]), "best_epoch": int(self.best_epoch_[di]),
                         "train_loss": float(self.train_loss_[di]), "solver": self.solver,
                         **{k: v[di].item() for k, v in getattr(self, "solver_records_", {}).items()},
                         "neurons": rec["neurons"], "projection": rec["projection"], "rank": rec["rank"]})
        self.results_ = pd.DataFrame(rows)
        return self.results_

    @classmethod
    def from_preset(cls, name: str, dataset: str | None = None, **params) -> "SubsetProbes":
        """An estimator with every Selection and Protocol parameter of preset ``name`` (see
        ``probes.PRESETS``) for ``dataset``; ``params`` set the rest or override it."""
        from ._presets import preset

        protocol_keys = set(Selection.model_fields) | set(Protocol.model_fields)
        chosen = preset(name, dataset, **{k: v for k, v in params.items() if k in protocol_keys})
        return cls(**chosen, **{k: v for k, v in params.items() if k not in protocol_keys})

    def _check_fitted(self):
        if not hasattr(self, "batches_"):
            raise NotFittedError(estimator=type(self).__name__)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "batches_")


def _positions_within(draws) -> np.ndarray:
    """Each draw's position among the draws of its (mode, seed), in order."""
    seen: dict = {}
    out = np.empty(len(draws), dtype=np.int64)
    for i, dr in enumerate(draws):
        key = (dr.mode, dr.seed)
        out[i] = seen.get(key, 0)
        seen[key] = out[i] + 1
    return out

