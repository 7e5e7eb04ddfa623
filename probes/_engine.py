"""Train thousands of linear probes on neuron subsets at once, from cached features.

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

Training is plain SGD with momentum and weight decay, the same update
``torch.optim.SGD`` applies, on the exact gradient of each probe's own mean
cross-entropy (written out, not autograd, to avoid padded intermediates), so a probe
trained in a batch equals the same probe trained alone with the same initial weights
and minibatch order.
"""

from __future__ import annotations

import math
import time
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from featstore import Device, resolve_device
from featstore.errors import IncompatibleParametersError, InvalidFeaturesError, InvalidParameterError, NotFittedError
from featstore.params import Estimator, Parameters, SeedValue

from ._inputs import RowFile, as_features
from ._selection import SELECTION_MODES, Family, Selection, make_families

INDEX_MODES = tuple(name for name, m in SELECTION_MODES.items() if not m.projection)

__all__ = ["SubsetProbes", "Protocol", "SOLVERS", "load_training_data"]

Solver = Literal["sgd", "ridge"]
SOLVERS = typing.get_args(Solver)
Precision = Literal["fp32", "bf16"]
MinibatchOrder = Literal["per-seed", "shared"]


# Features larger than this (every pass, as float32) stay on disk by default (RowFile)
DEFAULT_MAX_MEMORY_MB = 4096


@dataclass
class TrainingData:
    X: "np.ndarray | RowFile"  # (n, d) float32, clean pass (a RowFile when it is kept on disk)
    y: np.ndarray  # (n,) int64
    views: list[np.ndarray]  # augmented passes, each (n, d)
    n_classes: int
    source: str


def load_training_data(X, y=None, n_classes: int | None = None, where: str = "train",
                       max_memory_mb: int = DEFAULT_MAX_MEMORY_MB) -> TrainingData:
    """Features and labels from an array, a torch tensor or a featstore group.

    A group is verified by the read that loads it (each chunk and the labels checked as
    they stream), so it is read once; its augmented views are loaded too. A group (or zarr
    array) whose passes, as float32, exceed ``max_memory_mb`` stays on disk: each pass is
    written once to a scratch file in its stored dtype (:class:`RowFile`) and read by rows.
    """
    if isinstance(X, TrainingData):
        return X
    features = as_features(X, where=where)
    group = features.group
    passes = [features] + ([as_features(group, v, where) for v in range(1, group.n_views + 1)] if group else [])
    on_disk = (group is not None or hasattr(X, "oindex")) and \
        len(passes) * features.n_samples * features.n_neurons * 4 > (max_memory_mb << 20)
    stored = np.dtype(group.spec.dtype) if group is not None else np.dtype(getattr(X, "dtype", np.float32))
    if group is not None:
        if y is None:
            y = group.labels
        if n_classes is None:
            n_classes = len(group.classes)
    if on_disk:
        X, views = RowFile([features], stored), [RowFile([p], stored) for p in passes[1:]]
    else:
        views = [p.numpy() for p in passes[1:]]
        X = features.numpy()
    if y is None:
        raise InvalidParameterError(key=f"{where} labels y", value=None,
                                    expected="an integer array of shape (n_samples,) for array features")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise InvalidFeaturesError(where=features.where, problem=f"{len(y)} labels for {len(X)} samples")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidFeaturesError(where=features.where, problem=f"labels must be integers, got dtype {y.dtype}")
    if n_classes is None:
        n_classes = int(y.max()) + 1
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise InvalidFeaturesError(
            where=features.where, problem=f"label {int(y[bad][0])} is outside the class range 0..{n_classes - 1} "
                                          f"({int(bad.sum())} such labels)")
    return TrainingData(X, y.astype(np.int64), views, int(n_classes), group.path if group is not None else "array")


def _with_validation(data: TrainingData, validation) -> tuple[TrainingData, np.ndarray, np.ndarray]:
    """(train rows followed by the validation rows, train indices, validation indices). The
    augmented passes get the validation rows' clean features (validation reads the clean pass)."""
    X_val, y_val = validation if isinstance(validation, tuple) else (validation, None)
    val = load_training_data(X_val, y_val, data.n_classes, where="validation")
    if val.X.shape[1] != data.X.shape[1]:
        raise InvalidFeaturesError(where=f"validation ({val.source})",
                                   problem=f"{val.X.shape[1]} neurons, but the train features have {data.X.shape[1]}")
    n, n_val = len(data.X), len(val.X)

    def stack(a, b):
        if isinstance(a, RowFile) or isinstance(b, RowFile):
            return RowFile([a, b], a.dtype if isinstance(a, RowFile) else b.dtype)
        return np.vstack([a, b])

    joined = TrainingData(stack(data.X, val.X), np.concatenate([data.y, val.y]),
                          [stack(v, val.X) for v in data.views], data.n_classes, data.source)
    return joined, np.arange(n), np.arange(n, n + n_val)


class Protocol(Parameters):
    """How each probe is trained: the paper's protocol by default (appendix B). A sweep's
    ``[probe]`` table takes exactly these keys."""

    solver: Solver = "sgd"
    """sgd: the paper's protocol (SGD with momentum, best validation epoch). ridge: closed-form ridge
    regression to one-hot targets from the train Gram, regularisation chosen on the validation split;
    a fast screening solver."""
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 50
    """SGD epochs."""
    lr: Annotated[float, Field(gt=0, le=1000)] = 0.1
    """Initial learning rate."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum."""
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-4
    """L2 weight decay, as torch.optim.SGD applies it."""
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
    minibatch_order: MinibatchOrder = "per-seed"
    """per-seed: each seed's probes see their own minibatch order, as the released code (one run per seed,
    everything seeded); shared: every probe one order (fewer minibatch reads; seeds then share that noise)."""


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


# Narrowest column block on the CPU and CUDA: consecutive segments are merged until a
# block is at least this wide (tiny segments make GEMMs that are all overhead).
MIN_BLOCK_WIDTH = 64
# On CUDA a GEMM costs its latency more than its arithmetic: wider blocks, fewer products. Measured on
# an H200, paper grid with CUDA graphs (benchmarks/bench_probes.py at paper scale, block widths 64 / 256 /
# 1024 / 4096):
# fp32 3.69 / 3.20 / 2.97 / 2.97 s, TF32 3.02 / 2.47 / 2.16 / 2.19 s.
MIN_BLOCK_WIDTH_CUDA = 1024
# bf16 operands on the CPU (oneDNN / AMX): wider blocks pay. Measured on 2 Xeon cores with AMX, paper grid,
# seconds per epoch: 64: 0.95-1.01, 128: 0.83-0.90, 256: 0.86.
MIN_BLOCK_WIDTH_BF16 = 128
# Laying the passes out by column block costs about one epoch of per-minibatch column gathers, so on the
# CPU in float32 it is done only where it pays: for several minibatch streams (per-seed orders) over at
# least this many epochs. Measured on 2 Xeon cores, paper grid (n = 45,000, d = 2048, 22 x 5): per-seed
# 1.31 vs 1.45 s per epoch for +1.3 s once; shared order 0.91-0.92 vs 0.92-0.94 s per epoch (no gain);
# the default benchmark (23 seeds, 3 epochs) 5.07-5.26 vs 4.90-5.11 s (no gain). Projections (one
# projection per pass instead of one per minibatch), bf16 operands (no per-step conversion: 0.85 vs
# 1.75 s per epoch at paper scale) and CUDA always lay out.
LAYOUT_MIN_EPOCHS = 10
# Index probes with k >= DENSE_FRACTION * d are trained in the layer's own neuron order,
# all families together, as one GEMM on the untouched minibatch (zero weights on the
# neurons a probe does not see): no gather, and a wide product instead of many thin ones.
DENSE_FRACTION = 0.75


def _blocks(lengths: tuple[int, ...], min_width: int) -> list[tuple[int, int, int]]:
    """Column blocks (first probe a, lo, hi) covering the prefix cuts ``lengths``.

    Segment j is [lengths[j-1], lengths[j]); consecutive segments merge until a block is
    ``min_width`` wide. Block (a, lo, hi) feeds probes a..m-1; a probe i < last segment of
    the block uses only its columns below lengths[i] (the rest is masked to zero).
    """
    m = len(lengths)
    starts = [0] + list(lengths[:-1])
    out, a = [], 0
    while a < m:
        lo, b = starts[a], a + 1
        while b < m and lengths[b - 1] - lo < min_width:
            b += 1
        if lengths[b - 1] > lo:
            out.append((a, lo, lengths[b - 1]))
        a = b
    return out


class _ProbeBatch:
    """Families with equal prefix lengths, trained as one batch.

    Block inputs are samples first, one contiguous (F, B, hi - lo) tensor per block
    (``inputs``); block weights Wt_k are (F, (m - a) * C, hi - lo) and the logits (F, m * C, B),
    samples last, so that a block's product adds to a contiguous run of rows per family.
    Rows (i - a) * C ... of Wt_k belong to probe i.
    All block weights and the biases are views of one flat tensor, so an optimiser step
    is one fused pass.
    """

    def __init__(self, families: list[Family], lengths: tuple[int, ...], n_classes: int, device, dtype,
                 min_block: int | None = None, dense: list[list[np.ndarray]] | None = None,
                 streams: list[int] | None = None):
        import torch

        self.families = families
        self.lengths = lengths
        self.m = len(lengths)
        self.C = n_classes
        self.F = len(families)
        width = lengths[-1]
        self.width = width
        self.device = device
        self.is_index = all(f.columns is not None for f in families)
        # the minibatch stream each family reads (its seed's order); families of one stream are
        # consecutive, so each stream's inputs fill one contiguous slice of the input buffer
        streams = [0] * self.F if streams is None else list(streams)
        if streams != sorted(streams):
            raise ValueError("internal: families must be sorted by stream")  # pragma: no cover - a bug
        self.family_stream = torch.as_tensor(streams, device=device)
        self.family_offsets = torch.arange(self.F, device=device)
        self.streams_are_all = streams == list(range(len(streams)))  # family f reads stream f
        self.stream_slices = [(sigma, streams.index(sigma), len(streams) - streams[::-1].index(sigma))
                              for sigma in sorted(set(streams))]
        # dense: pseudo-families whose probe i sees neurons dense[f][i] of the raw layer
        self.dense = dense
        if dense is not None:
            self.is_index = False
            self.blocks = [(0, 0, width)]
            seen = np.zeros((self.F, self.m, width), dtype=bool)
            for f, probes_of_f in enumerate(dense):
                for i, idx in enumerate(probes_of_f):
                    seen[f, i, idx] = True
            masks = [np.repeat(seen, self.C, axis=1)]
        else:
            if self.is_index:
                self.columns = torch.as_tensor(np.concatenate([f.columns[:width] for f in families]), device=device)
                self.slice_columns = [self.columns[f0 * width:f1 * width] for _, f0, f1 in self.stream_slices]
            else:
                self.basis_t = torch.as_tensor(np.concatenate([f.basis[:, :width] for f in families], axis=1).T.copy(),
                                               device=device, dtype=torch.float32)
            if min_block is None:
                min_block = MIN_BLOCK_WIDTH_CUDA if str(device).startswith("cuda") else \
                    MIN_BLOCK_WIDTH_BF16 if dtype is not None else MIN_BLOCK_WIDTH
            self.blocks = _blocks(lengths, min_block)
            # a merged block's columns beyond a probe's prefix are not the probe's
            masks = [np.repeat(np.stack([np.arange(lo, hi) < lengths[i] for i in range(a, self.m)]), self.C, axis=0)
                     for a, lo, hi in self.blocks]
        # gradient masks: True where a weight is the probe's, False where it is held at zero
        # as float 0 / 1, not bool: multiplying by a bool tensor converts it on every step
        self.masks = [None if mk.all() else torch.as_tensor(mk, device=device, dtype=torch.float32) for mk in masks]
        self.shapes = [(self.F, (self.m - a) * self.C, hi - lo) for a, lo, hi in self.blocks] + [(self.F, self.m * self.C)]
        self.flat = torch.zeros(self.n_params, device=device)
        self.W, self.b = self.views(self.flat)
        self.compute_dtype = dtype
        # the dtype inputs are held in for the products: bf16 resident with precision="bf16"
        self.operand_dtype = dtype if dtype is not None else torch.float32
        self.laid = None  # each pass laid out by column block while training (lay_out)
        self.source = 0  # which features of a joint fit it reads (probes.fit_together: one per layer)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def views(self, flat):
        """([Wt_k], b) as views of a flat tensor laid out like the parameters."""
        out, at = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(flat[at:at + n].view(s))
            at += n
        return out[:-1], out[-1]

    def set_flat(self, flat):
        self.flat = flat
        self.W, self.b = self.views(flat)

    def input_buffer(self, B: int, device):
        """Work space of ``inputs``: one contiguous (F, B, hi - lo) tensor per column block, in
        the operand dtype (None for a dense batch, which reads the minibatch itself)."""
        import torch

        if self.dense is not None:
            return None
        return [torch.empty((self.F, B, hi - lo), device=device, dtype=self.operand_dtype)
                for _, lo, hi in self.blocks]

    def inputs(self, mb: "_Minibatch | None", out=None, rows=None, pass_index: int = 0):
        """Every family's inputs for the minibatch: one (F, B, hi - lo) tensor per column block,
        samples first, in the operand dtype.

        A dense batch gives the minibatch rows themselves (one block, the raw layer). Otherwise
        each block's tensor is contiguous, so a block's products are plain batched GEMMs (no
        strided batch, no copy inside BLAS/oneDNN). With the passes laid out (``lay_out``), a
        block's inputs are one row gather ``rows[stream]`` from the laid-out pass ``pass_index``
        (``mb`` is not needed); otherwise they come from the minibatch ``mb``: its columns (index
        modes) or its projection. Both fill the same tensors with the same values, so the
        products and the probes are the same either way. ``out`` (``input_buffer``), when given,
        is reused: fresh tensors this large per minibatch cost page faults on every step.
        """
        import torch

        F = self.F
        if self.dense is not None:
            if len(self.stream_slices) == 1:
                Z = mb.r(self.stream_slices[0][0]).unsqueeze(0).expand(F, -1, -1)
            else:
                # family f reads stream f only when the batch holds every stream (a joint fit's dense
                # batch may hold the streams of one draw count only)
                every = self.streams_are_all and mb.streams == F
                Z = mb.stacked() if every else mb.stacked().index_select(0, self.family_stream)
            return [Z if self.compute_dtype is None else Z.to(self.compute_dtype)]
        if self.laid is not None and rows is not None:
            B = rows[0].shape[0]
            out = out if out is not None else self.input_buffer(B, rows[0].device)
            n = self.laid[pass_index][0].shape[1]
            # row f * n + r of a block's (F * n, width) matrix is family f's row r; family f reads its stream's rows
            idx = (self.family_offsets.view(F, 1) * n + torch.stack(rows).index_select(0, self.family_stream)).view(-1)
            for Lk, Zk in zip(self.laid[pass_index], out):
                torch.index_select(Lk.view(F * n, -1), 0, idx, out=Zk.view(F * B, -1))
            return out
        B, w = mb.B, self.width
        out = out if out is not None else self.input_buffer(B, mb.device)
        for j, (sigma, f0, f1) in enumerate(self.stream_slices):
            X = mb.r(sigma)
            if self.is_index:  # (B, F_sigma * width): each family's columns, in its order
                part = torch.index_select(X, 1, self.slice_columns[j])
            else:
                part = torch.mm(X, self.basis_t[f0 * w:f1 * w].t())
            part = part.view(B, f1 - f0, w).transpose(0, 1)
            for (_, lo, hi), Zk in zip(self.blocks, out):
                Zk[f0:f1].copy_(part[:, :, lo:hi])
        return out

    def targets(self, ys):
        """(F, 1, 1, B) class of each family's minibatch rows, from ``ys`` (streams, B)."""
        if len(self.stream_slices) == 1:
            return ys[self.stream_slices[0][0]].view(1, 1, 1, -1).expand(self.F, 1, 1, -1)
        return ys.index_select(0, self.family_stream).view(self.F, 1, 1, -1)

    @property
    def is_projection(self) -> bool:
        return self.dense is None and not self.is_index

    def laid_out_bytes(self, passes) -> int:
        """Memory ``lay_out`` takes for ``passes``: every pass, n x F x width operands."""
        import torch

        if self.dense is not None:
            return 0
        size = torch.empty((), dtype=self.operand_dtype).element_size()
        return sum(p.shape[0] for p in passes) * self.F * self.width * size

    def lay_out(self, passes, rows_per_chunk: int = 8192) -> None:
        """Lay every pass (n, d) out once, by column block, on the batch's device: per block a
        contiguous (F, n, hi - lo) tensor whose row r is family f's inputs of sample r (its
        columns in its own order, or its projection), in the operand dtype. ``inputs`` then
        gathers rows instead of gathering (or projecting) the columns of every minibatch of every
        epoch. The caller checks the room (``laid_out_bytes``). ``lay_out([])`` drops them."""
        import torch

        self.laid = None
        if not passes or self.dense is not None:
            return
        device = self.columns.device if self.is_index else self.basis_t.device
        w = self.width
        laid = []
        for X in passes:
            n = X.shape[0]
            blocks = [torch.empty((self.F, n, hi - lo), device=device, dtype=self.operand_dtype)
                      for _, lo, hi in self.blocks]
            # float32 work space, reused (a fresh tensor per chunk costs its page faults every time)
            tmp = torch.empty((min(n, rows_per_chunk), w), device=device)
            for s in range(0, n, rows_per_chunk):
                Xs = X[s:s + rows_per_chunk].to(device)
                e = s + len(Xs)
                for f in range(self.F):
                    if self.is_index and self.operand_dtype == torch.float32:  # straight into place
                        for (_, lo, hi), Lk in zip(self.blocks, blocks):
                            torch.index_select(Xs, 1, self.columns[f * w + lo:f * w + hi], out=Lk[f, s:e])
                        continue
                    if self.is_index:
                        part = torch.index_select(Xs, 1, self.columns[f * w:(f + 1) * w], out=tmp[:len(Xs)])
                    else:
                        part = torch.mm(Xs, self.basis_t[f * w:(f + 1) * w].t(), out=tmp[:len(Xs)])
                    for (_, lo, hi), Lk in zip(self.blocks, blocks):
                        Lk[f, s:e].copy_(part[:, lo:hi])
            laid.append(blocks)
        self.laid = laid

    def chunk_rows(self, budget: int = 1 << 25) -> int:
        """Rows per inference chunk so that inputs and logit buffers stay near ``budget`` floats."""
        per_row = self.F * (self.width + self.m * self.C)
        return int(max(64, min(4096, budget // per_row)))

    def logit_buffers(self, B: int, device=None):
        """Work space of ``logits``: the (F, m * C, B) logits."""
        import torch

        return torch.empty((self.F, self.m * self.C, B), device=device or self.device)

    def logits(self, zs, out=None):
        """(F, m*C, B) logits of every probe, from the block inputs ``zs`` (``inputs``).

        The logits start at the biases; then each block, from the last (fewest probes) to the
        first, adds its products to the rows of its probes a_k..m-1 in place: one batched GEMM
        per block, no copies between blocks. Every probe's sum is bias + block K-1 + ... +
        block 0, in that order. With bf16 operands the weights are converted once per call and
        each block's bf16 product is added to the float32 sums.
        """
        import torch

        b = self.b
        W = self.W if self.compute_dtype is None else self.views(self.flat.to(self.compute_dtype))[0]
        B = zs[0].shape[1]
        out = out if out is not None else self.logit_buffers(B, zs[0].device)
        C, F = self.C, self.F
        out.copy_(b.unsqueeze(2).expand(F, self.m * C, B))
        for k in range(len(self.blocks) - 1, -1, -1):
            a = self.blocks[k][0]
            part, w, zk = out[:, a * C:, :], W[k], zs[k]
            if zk.stride(0) == 0 and F > 1 and a == 0:  # every family reads the same rows (a dense batch's
                # shared minibatch, validation): one product for all, (F * rows, width) x (width, B)
                flat_out, flat_w = out.view(F * out.shape[1], B), w.reshape(F * w.shape[1], w.shape[2])
                if self.compute_dtype is not None:
                    flat_out += torch.mm(flat_w, zk[0].t())
                else:
                    flat_out.addmm_(flat_w, zk[0].t())
            elif self.compute_dtype is not None:  # oneDNN: (B, width) x (width, rows) is its faster form
                part += torch.bmm(zk, w.transpose(1, 2)).transpose(1, 2)
            else:
                part.baddbmm_(w, zk.transpose(1, 2))
        return out

    def grads(self, zs, dlogits, gW, gb, scale: float):
        """Write ``scale`` x the gradients of every Wt_k and of b into gW, gb, from dlogits
        (F, m*C, B) and the block inputs ``zs``."""
        import torch

        F = self.F
        for (a, lo, hi), zk, g, mask in zip(self.blocks, zs, gW, self.masks):
            dk = dlogits[:, a * self.C:, :]
            if zk.stride(0) == 0 and F > 1 and a == 0:  # the same rows for every family: one product
                rows = F * dk.shape[1]
                if self.compute_dtype is not None:
                    torch.mul(torch.mm(dk.reshape(rows, -1).to(self.compute_dtype), zk[0]), scale,
                              out=g.view(rows, -1))
                else:
                    torch.addmm(g.view(rows, -1), dk.reshape(rows, -1), zk[0], beta=0, alpha=scale,
                                out=g.view(rows, -1))
            elif self.compute_dtype is not None:  # a contiguous bf16 copy: oneDNN's batched GEMM runs on it as is
                torch.mul(torch.bmm(dk.to(self.compute_dtype), zk), scale, out=g)
            else:
                torch.baddbmm(g, dk, zk, beta=0, alpha=scale, out=g)
            if mask is not None:
                g.mul_(mask)
        torch.sum(dlogits, dim=2, out=gb)
        gb.mul_(scale)

    def probe_slices(self, i):
        """Where probe i's weights live: [(block k, row slice of Wt_k, its columns lo..hi_i)] for blocks a <= i."""
        out = []
        for k, (a, lo, hi) in enumerate(self.blocks):
            if a <= i and self.lengths[i] > lo:
                out.append((k, slice((i - a) * self.C, (i - a + 1) * self.C), lo, min(hi, self.lengths[i])))
        return out

    def set_probe(self, fi: int, i: int, w, b) -> None:
        """Write probe i of family fi: weight (k, C) in its own input order, bias (C,)."""
        import torch

        w = torch.as_tensor(w, dtype=torch.float32, device=self.flat.device)
        rows = slice(i * self.C, (i + 1) * self.C)
        if self.dense is not None:
            self.W[0][fi, rows, :] = 0.0
            self.W[0][fi, rows, torch.as_tensor(self.dense[fi][i], device=self.flat.device)] = w.T
        else:
            for k, r, lo, hi in self.probe_slices(i):
                self.W[k][fi, r, :hi - lo] = w[lo:hi].T
        self.b[fi, rows] = torch.as_tensor(b, dtype=torch.float32, device=self.flat.device)

    def probe_weights(self, fi: int, i: int):
        """Probe i of family fi: (weight (k, C) in its own input order, bias (C,)) as numpy arrays."""
        W, b = self.W, self.b
        if self.dense is not None:
            w = W[0][fi, i * self.C:(i + 1) * self.C, :].T.cpu().numpy()[self.dense[fi][i]]
        else:
            w = np.zeros((self.lengths[i], self.C), dtype=np.float32)
            for k, rows, lo, hi in self.probe_slices(i):
                w[lo:hi] = W[k][fi, rows, :hi - lo].T.cpu().numpy()
        return np.ascontiguousarray(w, dtype=np.float32), b[fi, i * self.C:(i + 1) * self.C].cpu().numpy()

    def to(self, device):
        self.family_stream = self.family_stream.to(device)
        self.family_offsets = self.family_offsets.to(device)
        if self.is_index:
            self.columns = self.columns.to(device)
            w = self.width
            self.slice_columns = [self.columns[f0 * w:f1 * w] for _, f0, f1 in self.stream_slices]
        elif self.is_projection:
            self.basis_t = self.basis_t.to(device)
        self.masks = [None if m is None else m.to(device) for m in self.masks]
        self.set_flat(self.flat.to(device))
        self.device = device
        return self


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
        if self.precision == "bf16" and device == "cpu" and not cpu_has_bf16():
            raise IncompatibleParametersError(
                key="precision", value="bf16",
                reason="bf16 on the CPU needs native bf16 matmuls (AVX512-BF16 or AMX), which this CPU lacks; "
                       "use precision='fp32' or a CUDA device")
        return device

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
        if isinstance(data.X, RowFile) and (self.solver != "sgd" or (self.subsets is None and self.mode not in INDEX_MODES)):
            raise IncompatibleParametersError(
                key="mode" if self.solver == "sgd" else "solver", value=self.mode if self.solver == "sgd" else self.solver,
                reason=f"the train features ({data.X.shape[0]} x {data.X.shape[1]}) exceed max_memory_mb="
                       f"{self.max_memory_mb} and are read from disk by minibatch, which serves SGD on neuron subsets "
                       f"({', '.join(INDEX_MODES)}); projections and ridge need d x d work. Raise max_memory_mb or "
                       f"use an index mode")

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

    def _train(self, data: TrainingData, train_idx, val_idx, device) -> None:
        t0 = time.perf_counter()
        if self.solver == "sgd":
            self._fit_sgd(data, train_idx, val_idx, device)
        else:
            self._fit_ridge(data, train_idx, val_idx, device)
        self.fit_seconds_ = time.perf_counter() - t0

    def _validation_split(self, n: int, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(validation rows, train rows), sorted, seeded by ``random_state``."""
        if self.val_split == "random_split":
            # torch.utils.data.random_split(ds, [int((1 - f) n), rest]) after seed_everything(random_state)
            import torch

            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.random_state)).numpy()
            n_val = n - int((1 - self.val_fraction) * n)
            val, train = perm[n - n_val:], perm[:n - n_val]
        else:
            perm = np.random.default_rng(self.random_state).permutation(n)
            n_val = max(1, int(round(self.val_fraction * n)))
            val, train = perm[:n_val], perm[n_val:]
        if len(train) < 1 or len(val) < 1:
            raise InvalidFeaturesError(where=source, problem=f"train split has {n} samples: too few for a "
                                                             f"{self.val_fraction:.0%} validation split")
        return np.sort(val), np.sort(train)

    def epoch_order(self, epoch: int, seed: int | None = None) -> np.ndarray:
        """The train rows of ``epoch`` in minibatch order for the probes of draw seed ``seed``
        (with ``minibatch_order="per-seed"``; unseeded draws, and every draw under "shared",
        use ``seed=None``)."""
        key = [self.random_state, 11, epoch] if seed is None else [self.random_state, 11, epoch, 1, seed]
        return np.random.default_rng(key).permutation(self.train_indices_)

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
                cut = sum(1 for k in f.lengths if k < DENSE_FRACTION * self._n_features(src))
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

    def _fit_sgd(self, data: TrainingData, train_idx, val_idx, device):
        import torch

        dtype = torch.bfloat16 if self.precision == "bf16" else None
        batches = self._batches(device, dtype)
        positions = self._draw_positions(batches)
        for di, (bi, fi, pi) in enumerate(positions):  # per-draw seeded init
            batches[bi].set_probe(fi, pi, *self.initial_weights(di))
        ctx = {"sources": [[_to_device(p, device) for p in passes] for passes in self._source_passes(data)],
               "y": torch.as_tensor(data.y, device=device),
               "val": torch.as_tensor(val_idx, device=device), "device": device,
               # each epoch's orders made when it starts (all of them at once would be epochs x n rows)
               "orders": lambda e: [torch.as_tensor(self.epoch_order(e, seed), device=device) for seed in self.streams_],
               "positions": positions}
        from tqdm.auto import tqdm

        bar = tqdm(total=self.epochs, desc=f"probes ({len(self.draws_)})", unit="epoch", disable=not self.verbose)
        best_acc, best_epoch, last_loss = self._train_batches(batches, ctx, bar)
        bar.close()
        for g in batches:  # the best epoch's weights are in place; keep them on the CPU (picklable)
            g.to("cpu")
        self.batches_ = batches
        self.val_accuracy_ = np.array([float(best_acc[bi][fi, pi]) for bi, fi, pi in positions])
        self.best_epoch_ = np.array([int(best_epoch[bi][fi, pi]) for bi, fi, pi in positions])
        self.train_loss_ = np.array([float(last_loss[bi][fi, pi]) for bi, fi, pi in positions])
        self.positions_ = positions

    def _train_batches(self, batches: list["_ProbeBatch"], ctx: dict, bar):
        """The SGD epochs; leaves each batch's best epoch's weights in place and returns
        per batch (best validation accuracy, best epoch, last epoch's train loss)."""
        import torch

        device, y_all, val_t = ctx["device"], ctx["y"], ctx["val"]
        sources = ctx["sources"]  # per set of features (one, or a joint fit's layers): its passes
        on_device = sources[0]
        C = self.n_classes_
        grad = [torch.zeros_like(g.flat) for g in batches]  # flat, laid out like the parameters
        grad_views = [g.views(f) for g, f in zip(batches, grad)]
        buf = [torch.zeros_like(g.flat) for g in batches]
        best = [g.flat.clone() for g in batches]
        best_acc = [torch.full((g.F, g.m), -1.0, device=device) for g in batches]
        best_epoch = [torch.zeros((g.F, g.m), dtype=torch.long, device=device) for g in batches]
        last_loss = [torch.zeros((g.F, g.m), device=device) for g in batches]
        # buffers for full minibatches: none is larger than the train rows (a batch_size beyond them never fills)
        full_rows = min(self.batch_size, len(self.train_indices_))
        logit_bufs = [g.logit_buffers(full_rows) for g in batches]
        input_bufs = [g.input_buffer(full_rows, device) for g in batches]
        self.laid_out_ = self._lay_out(batches, sources, str(device))
        # what minibatches are read from: the passes, or their resident bf16 copies (bf16 operands)
        read_passes = self._read_passes(batches, sources, str(device))
        # the features each step reads a minibatch of: those of dense batches, or of passes not laid out
        readers = sorted({g.source for g in batches if g.laid is None})
        # the full minibatches are gathered into one buffer each, reused every step, where the passes are on the device
        read_buf = {}
        for src in readers:
            first = read_passes[src][0]
            if isinstance(first, torch.Tensor) and first.device.type == torch.device(device).type:
                read_buf[src] = torch.empty((len(self.streams_) * full_rows, first.shape[1]), device=first.device,
                                            dtype=first.dtype)
        classes = torch.arange(C, device=device).view(1, 1, C, 1)
        on_cuda = str(device).startswith("cuda")
        minus_one = torch.tensor(-1.0, device=device)
        train_passes = list(range(len(on_device))) if self.train_passes == "all" else \
            (list(range(1, len(on_device))) or [0])
        loss_sum = [torch.zeros((g.F, g.m), device=device) for g in batches]  # in place: graphs write them

        def step(rows, lr):
            """One SGD step of every batch on the minibatch ``rows[stream]`` of pass ``pass_index``."""
            B = rows[0].shape[0]
            full = B == full_rows
            mbs = {src: _Minibatch.gather(read_passes[src][pass_index], rows, device,
                                          out=read_buf.get(src) if full else None) for src in readers}
            ys = _Minibatch.labels(y_all, rows)
            for bi, g in enumerate(batches):
                zs = g.inputs(mbs.get(g.source), out=input_bufs[bi] if full else None, rows=rows,
                              pass_index=pass_index)
                logits = g.logits(zs, out=logit_bufs[bi] if full else None).view(g.F, g.m, C, B)
                p = _softmax_gradient(logits, g.targets(ys), loss_sum[bi], classes, minus_one if on_cuda else None)
                gW, gb = grad_views[bi]
                g.grads(zs, p.view(g.F, g.m * C, B), gW, gb, 1.0 / B)  # of the mean loss
                _sgd_step(g.flat, grad[bi], buf[bi], lr, self.momentum, self.weight_decay)

        # CUDA graphs: a full step reads its rows from one static buffer; one graph per (lr, pass)
        use_graphs = self.cuda_graphs and str(device).startswith("cuda") and \
            all(p.is_cuda for passes in sources for p in passes)
        graphs: dict = {}
        pool = None
        eager_full_steps = 0  # warm-up before the first capture (cuBLAS handles, workspaces, allocator)
        rows_buf = torch.empty((len(self.streams_), full_rows), dtype=torch.long, device=device) \
            if use_graphs else None
        for epoch in range(self.epochs):
            lr = self.lr * self.lr_gamma ** (epoch // self.lr_step)
            pass_index = train_passes[epoch % len(train_passes)]
            orders = ctx["orders"](epoch)  # one per minibatch stream
            n_rows = len(orders[0])
            for ls in loss_sum:
                ls.zero_()
            orders_t = torch.stack(orders) if use_graphs else None  # (streams, n_rows)
            for start in range(0, n_rows, self.batch_size):
                B = min(self.batch_size, n_rows - start)
                if not use_graphs or B < full_rows:
                    step([order[start:start + B] for order in orders], lr)
                    continue
                rows_buf.copy_(orders_t[:, start:start + B])
                key = (lr, pass_index)
                if key in graphs:
                    graphs[key].replay()
                elif eager_full_steps < 2:  # real steps, on a side stream as torch's graph docs ask of warm-ups
                    side = torch.cuda.Stream(device=device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):
                        step(list(rows_buf), lr)
                    torch.cuda.current_stream(device).wait_stream(side)
                    eager_full_steps += 1
                else:  # capture records without running: replay to take this step
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: a sweep's other tasks may use the GPU from other threads meanwhile
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        step(list(rows_buf), lr)
                    pool = graph.pool()
                    graphs[key] = graph
                    graph.replay()
            for bi in range(len(batches)):
                last_loss[bi] = loss_sum[bi] / n_rows
            self._check_loss(last_loss, ctx["positions"], epoch)
            # validate every val_every epochs (the last epoch too when no validation came before)
            if (epoch + 1) % self.val_every and not (epoch + 1 == self.epochs and self.epochs < self.val_every):
                bar.update(1)
                continue  # no validation this epoch: it cannot be a probe's best
            # validation picks each probe's best epoch: on the clean pass, or on the pass this epoch trained on
            # (val_transform="augmented"; a separate validation group's rows hold their clean features there)
            val_pass = pass_index if self.val_transform == "augmented" else 0
            for bi, g in enumerate(batches):
                acc = self._accuracy(g, read_passes[g.source][val_pass], y_all, val_t, device, input_bufs[bi],
                                     logit_bufs[bi], pass_index=val_pass)
                better = acc > best_acc[bi] if self.select_epoch == "best" else torch.ones_like(acc, dtype=torch.bool)
                best_acc[bi] = torch.where(better, acc, best_acc[bi])  # with "last": the last epoch's
                best_epoch[bi] = torch.where(better, torch.full_like(best_epoch[bi], epoch + 1), best_epoch[bi])
                bw, bb = g.views(best[bi])
                for (a, _, _), w, keep in zip(g.blocks, g.W, bw):
                    mask = better[:, a:].repeat_interleave(C, dim=1).unsqueeze(2)
                    keep.copy_(torch.where(mask, w, keep))
                bb.copy_(torch.where(better.repeat_interleave(C, dim=1), g.b, bb))
            bar.update(1)
        self.cuda_graphs_ = len(graphs)  # graphs captured (0: every step ran eagerly)
        for bi, g in enumerate(batches):
            g.set_flat(best[bi])
            g.lay_out([])  # not kept with the fitted estimator
        return best_acc, best_epoch, last_loss

    def _check_loss(self, losses, positions, epoch: int) -> None:
        """Stop when SGD diverged, so that a diverged probe's accuracy (chance) never passes for a
        measurement (a DR "maximally redundant" from lr = inf): any probe's epoch loss NaN or inf.
        (A finite loss above a uniform guess's is an unconverged probe: its rows keep train_loss,
        and the report warns.)"""
        import torch

        if all(bool(torch.isfinite(loss).all()) for loss in losses):
            return
        bad = [di for di, (bi, fi, pi) in enumerate(positions) if not bool(torch.isfinite(losses[bi][fi, pi]))]
        from featstore.errors import ProbeDivergedError

        examples = ", ".join(f"{self.draws_[di].mode} k={self.draws_[di].k}"
                             + (f" seed {self.draws_[di].seed}" if self.draws_[di].seed is not None else "")
                             for di in bad[:4])
        raise ProbeDivergedError(count=len(bad), total=len(positions), epoch=epoch + 1, examples=examples,
                                 lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum,
                                 batch_size=self.batch_size)

    def _lay_out(self, batches: list["_ProbeBatch"], sources, device: str) -> int:
        """Lay each batch's passes (those of its features: ``sources[g.source]``) out by column
        block (``_ProbeBatch.lay_out``) where it pays (``LAYOUT_MIN_EPOCHS``) and while they fit:
        on the CPU, within max_memory_mb less the passes themselves; on a GPU, a quarter of its free
        memory. Passes on disk (RowFile) are not laid out. Returns the bytes laid out."""
        every = [p for passes in sources for p in passes]
        if any(isinstance(p, RowFile) for p in every):
            return 0
        budget = self._memory_left(every, device)
        used = 0
        for g in batches:
            pays = _layout_pays(g, device, self.epochs)
            need = g.laid_out_bytes(sources[g.source])
            if pays and need and _room_for(need, budget - used, device):
                g.lay_out(sources[g.source])
                used += need
        return used

    def _read_passes(self, batches: list["_ProbeBatch"], sources, device: str) -> list:
        """Per set of features, the passes minibatches are read from. With bf16 operands, resident
        bf16 copies when every batch that reads minibatches of them takes them as they are (index
        and dense batches: the same rounding as converting each minibatch; a projection projects
        float32 rows) and they fit what ``_lay_out`` left of the budget: half the reads, and no
        conversion per step."""
        import torch

        every = [p for passes in sources for p in passes]
        if any(isinstance(p, RowFile) for p in every):  # on disk: read by rows as they are
            return sources
        room = self._memory_left(every, device) - self.laid_out_
        out = []
        for src, passes in enumerate(sources):
            readers = [g for g in batches if g.laid is None and g.source == src]
            if not readers or any(g.compute_dtype is None or g.is_projection for g in readers) or \
                    any(not isinstance(p, torch.Tensor) or p.device.type != torch.device(device).type for p in passes):
                out.append(passes)
                continue
            dtype = readers[0].compute_dtype
            need = sum(p.numel() for p in passes) * torch.empty((), dtype=dtype).element_size()
            if not _room_for(need, room, device):
                out.append(passes)
                continue
            out.append([p.to(dtype=dtype) for p in passes])
            room -= need
        return out

    def _memory_left(self, passes, device: str) -> int:
        """Bytes of max_memory_mb the passes (on the CPU) leave for working copies of them; on a
        GPU the room is checked against its free memory instead (``_room_for``)."""
        if device != "cpu":
            return 1 << 62
        return (self.max_memory_mb << 20) - sum(p.numel() * p.element_size() for p in passes if p.device.type == "cpu")

    def _accuracy(self, g: _ProbeBatch, X, y_all, rows, device, input_buf, logit_buf, pass_index: int = 0):
        """(F, m) accuracy of every probe of g on X[rows] (pass ``pass_index``: the clean pass
        unless validation is augmented), in minibatches that reuse the training buffers."""
        import torch

        correct = torch.zeros((g.F, g.m), device=device)
        # on a GPU, few large chunks (launches cost more than the arithmetic); on the CPU, the training buffers
        buffer_rows = min(self.batch_size, len(self.train_indices_))  # the training buffers' rows
        step = max(buffer_rows, g.chunk_rows()) if str(device).startswith("cuda") else buffer_rows
        for start in range(0, len(rows), step):
            r = rows[start:start + step]
            full = len(r) == buffer_rows
            mb = None if g.laid is not None else \
                _Minibatch(X.index_select(0, r.to(X.device)).to(device), len(self.streams_))  # every stream: r
            zs = g.inputs(mb, out=input_buf if full else None, rows=[r] * len(self.streams_), pass_index=pass_index)
            logits = g.logits(zs, out=logit_buf if full else None).view(g.F, g.m, g.C, len(r))
            # the true class holds the maximum (argmax over a strided axis is slow on CPU)
            true = logits.gather(2, y_all[r].view(1, 1, 1, -1).expand(g.F, g.m, 1, len(r)))
            correct += (true >= logits.amax(dim=2, keepdim=True)).squeeze(2).sum(2)
        return correct / len(rows)

    def _fit_ridge(self, data: TrainingData, train_idx, val_idx, device):
        """Closed-form ridge to centred one-hot targets, alpha chosen per probe on validation."""
        import torch

        dtype = torch.float64
        X = torch.as_tensor(data.X, device=device, dtype=dtype)
        C = self.n_classes_
        Y = torch.nn.functional.one_hot(torch.as_tensor(data.y, device=device), C).to(dtype)
        tr = torch.as_tensor(train_idx, device=device)
        Xt, Yt = X[tr], Y[tr]
        mx, my = Xt.mean(0), Yt.mean(0)
        Xc, Yc = Xt - mx, Yt - my
        G, XY = Xc.T @ Xc, Xc.T @ Yc
        batches = self._batches(device, None)
        positions = self._draw_positions(batches)
        val_t = torch.as_tensor(val_idx, device=device)
        y_all = torch.as_tensor(data.y, device=device)
        val_acc, alphas = [], []
        family_of = {id(dr): f for f in self.families_ for dr in f.draws}
        for di, (bi, fi, pi) in enumerate(positions):
            g, draw = batches[bi], self.draws_[di]
            fam, k = family_of[id(draw)], draw.k
            if fam.columns is not None:
                idx = torch.as_tensor(fam.columns[:k], device=device)
                Gs, Bs = G[idx][:, idx], XY[idx]
                proj = None
            else:
                P = torch.as_tensor(fam.basis[:, :k], device=device, dtype=dtype)
                Gs, Bs = P.T @ G @ P, P.T @ XY
                proj = P
            scale = torch.diagonal(Gs).mean().clamp_min(1e-12)
            Xv = X[val_t][:, idx] if proj is None else X[val_t] @ proj
            mxs = mx[idx] if proj is None else mx @ proj
            best = (-1.0, None, None)
            for a in self.ridge_alphas:
                W = torch.linalg.solve(Gs + a * scale * torch.eye(k, device=device, dtype=dtype), Bs)
                b = my - mxs @ W
                acc = ((Xv @ W + b).argmax(1) == y_all[val_t]).double().mean().item()
                if acc > best[0]:
                    best = (acc, W, b, a)
            acc, W, b, a = best
            val_acc.append(acc)
            alphas.append(a)
            g.set_probe(fi, pi, W.float(), b.float())
        for g in batches:
            g.to("cpu")
        self.batches_ = batches
        self.positions_ = positions
        self.val_accuracy_ = np.array(val_acc)
        self.best_epoch_ = np.zeros(len(positions), dtype=int)
        self.ridge_alpha_ = np.array(alphas)
        self.train_loss_ = np.full(len(positions), np.nan)  # no iterative loss for a closed form

    # ------------------------------------------------------------------ inference
    def decision_function(self, X) -> np.ndarray:
        """Logits of every probe, array of shape (n_samples, n_draws, n_classes)."""
        import torch

        self._check_fitted()
        features = X if isinstance(X, RowFile) else as_features(X)
        if features.n_neurons != self.n_features_in_:
            raise InvalidFeaturesError(where=features.where, problem=f"{features.n_neurons} neurons; the probes were "
                                                                     f"fitted on {self.n_features_in_}")
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

        Columns: draw, mode, fraction, k, seed, test_accuracy, per_class_accuracy (list; NaN for
        a class absent from the split), test_correct (bool array of shape (n_test,): which test
        samples the probe classifies right, for paired bootstraps over test images),
        val_accuracy, best_epoch, train_loss, solver, neurons / projection / rank (the draw's record).
        """
        import pandas as pd

        self._check_fitted()
        data = load_training_data(X, y, self.n_classes_, where="test", max_memory_mb=self.max_memory_mb)
        pred = self.predict(data.X)
        correct = pred == data.y[:, None]
        counts = np.bincount(data.y, minlength=self.n_classes_)
        rows = []
        for di, dr in enumerate(self.draws_):
            # a class with no test sample has no accuracy: NaN, not 0 (it would inflate Gini / CoV)
            per_class = np.where(counts > 0, np.bincount(data.y[correct[:, di]], minlength=self.n_classes_)
                                 / np.maximum(counts, 1), np.nan)
            rec = dr.record()
            rows.append({"draw": di, "mode": dr.mode, "fraction": dr.fraction, "k": dr.k, "seed": dr.seed,
                         "test_accuracy": float(correct[:, di].mean()), "per_class_accuracy": per_class.tolist(),
                         "test_correct": correct[:, di].copy(),
                         "val_accuracy": float(self.val_accuracy_[di]), "best_epoch": int(self.best_epoch_[di]),
                         "train_loss": float(self.train_loss_[di]), "solver": self.solver,
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


class _Minibatch:
    """One step's rows for every minibatch stream (each seed's order, or one shared).

    ``rows_major`` is (streams, B, d), or (B, d) when every stream reads the same rows
    (one stream, validation, inference). ``r(stream)`` is a stream's (B, d) rows,
    ``stacked()`` the (streams, B, d) view of all of them.
    """

    def __init__(self, rows_major, n_streams: int):
        self._rows = rows_major
        self.streams = n_streams
        self.shared = rows_major.dim() == 2
        self.B = rows_major.shape[-2]
        self.device = rows_major.device

    @classmethod
    def gather(cls, Xp, rows, device, out=None):
        """The minibatch of ``rows[stream]`` of pass Xp, one gather; into ``out`` ((streams * B, d),
        reused every step: a fresh tensor this large per step costs page faults) when it fits."""
        import torch

        every = rows[0] if len(rows) == 1 else torch.cat(rows)
        if out is not None and isinstance(Xp, torch.Tensor) and Xp.device == out.device and \
                Xp.dtype == out.dtype and every.shape[0] == out.shape[0]:
            X = torch.index_select(Xp, 0, every, out=out)
        else:
            X = Xp.index_select(0, every.to(Xp.device)).to(device, non_blocking=True)
        return cls(X if len(rows) == 1 else X.view(len(rows), len(rows[0]), -1), len(rows))

    @staticmethod
    def labels(y_all, rows):
        """(streams, B) labels of ``rows[stream]``."""
        import torch

        return y_all[rows[0]].view(1, -1) if len(rows) == 1 else y_all[torch.cat(rows)].view(len(rows), -1)

    def r(self, stream: int):
        return self._rows if self.shared else self._rows[stream]

    def stacked(self):
        return self._rows.unsqueeze(0).expand(self.streams, -1, -1) if self.shared else self._rows


def _positions_within(draws) -> np.ndarray:
    """Each draw's position among the draws of its (mode, seed), in order."""
    seen: dict = {}
    out = np.empty(len(draws), dtype=np.int64)
    for i, dr in enumerate(draws):
        key = (dr.mode, dr.seed)
        out[i] = seen.get(key, 0)
        seen[key] = out[i] + 1
    return out


def _softmax_gradient(logits, targets, loss_sum, classes, minus_one=None):
    """softmax(logits) - onehot(targets) over the class axis (2; not last: samples are), in place
    of the logits, and each probe's summed cross-entropy subtracted from ``loss_sum`` (F, m).

    ``logits`` (F, m, C, B), ``targets`` (F, 1, 1, B), ``classes`` arange(C) as (1, 1, C, 1).
    Without ``minus_one`` (the CPU) the one-hot targets are broadcast over the probes: a multiply and a subtraction cost less than a gather and a
    scatter along the strided class axis (paper grid, bf16: 0.77-0.80 vs 0.83-0.85 s per
    epoch). With ``minus_one`` (a -1 scalar tensor; CUDA) a gather and a scatter, fewer kernels:
    a step's time there is its kernel count (H200, TF32: 1.98-2.02 s vs 2.11 s). Both give the
    same gradient.
    """
    import torch

    logp = torch.log_softmax(logits, dim=2)
    if minus_one is not None:
        F, m, _, B = logits.shape
        idx = targets.expand(F, m, 1, B)
        loss_sum.sub_(logp.gather(2, idx).sum((2, 3)))
        return logp.exp_().scatter_add_(2, idx, minus_one.expand(F, m, 1, B))
    onehot = torch.eq(classes, targets).to(logits.dtype)
    loss_sum.sub_((logp * onehot).sum((2, 3)))
    return logp.exp_().sub_(onehot)


def _layout_pays(g: _ProbeBatch, device: str, epochs: int) -> bool:
    """Whether laying g's passes out by column block pays (``LAYOUT_MIN_EPOCHS``)."""
    if g.dense is not None:
        return False
    return g.is_projection or device != "cpu" or g.compute_dtype is not None or \
        (len(g.stream_slices) > 1 and epochs >= LAYOUT_MIN_EPOCHS)


def _room_for(need: int, budget: int, device: str) -> bool:
    """Whether ``need`` more bytes of laid-out inputs fit: within ``budget`` (what is left of
    max_memory_mb on the CPU) and, on a GPU, under a quarter of its free memory."""
    import torch

    if need > budget:
        return False
    if device.startswith("cuda"):
        return need < 0.25 * torch.cuda.mem_get_info(device)[0]
    return True


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (otherwise torch emulates them, slowly)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _sgd_step(p, g, buf, lr, momentum, weight_decay):
    """torch.optim.SGD's update (dampening 0, no nesterov) on flat tensors, in place.

    One fused pass (``torch._fused_sgd_``, what ``SGD(fused=True)`` runs) where torch has
    it; the same arithmetic op by op otherwise. ``buf`` starts at zero, so the first step
    stores the gradient, as SGD's first step does. Overwrites ``g``.
    """
    import torch

    fused = getattr(torch, "_fused_sgd_", None)
    if fused is not None and momentum:
        fused([p], [g], [buf], weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=0.0,
              nesterov=False, maximize=False, is_first_step=False)
        return
    if weight_decay:
        g.add_(p, alpha=weight_decay)
    if momentum:
        buf.mul_(momentum).add_(g)
        g = buf
    p.add_(g, alpha=-lr)


def _to_device(X: np.ndarray, device: str):
    """The whole pass on the device when it fits comfortably, else pinned host memory
    from which each minibatch is copied (features larger than device memory)."""
    import torch

    if isinstance(X, RowFile):  # on disk: each minibatch reads its rows and is copied over
        return X
    t = torch.from_numpy(X)
    if device == "cpu":
        return t
    free, _ = torch.cuda.mem_get_info()
    if t.numel() * 4 < 0.5 * free:
        return t.to(device)
    return t.pin_memory()
