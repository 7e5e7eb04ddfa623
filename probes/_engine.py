"""Train thousands of linear probes on neuron subsets at once, from cached features.

Layout. Draws are grouped into *families* (one ordering of the layer cut at increasing
prefix lengths k_1 <= ... <= k_m; see ``_selection``), and families with the same
lengths are trained together. The inputs of a family are split into *segments*
[k_{j-1}, k_j); probe i sees segments 0..i. Segment j's weights for all probes that use
it form one tensor of shape (families, |seg_j|, (m - j) * classes), so a minibatch's
logits are ``bias + sum_j bmm(Z[:, :, seg_j], W_j)`` written into the column block of
probes >= j. Every multiply-add is one a lone probe would do (no masked zeros), and
one read of each minibatch serves every probe.

Training is plain SGD with momentum and weight decay, the same update
``torch.optim.SGD`` applies, on the exact gradient of each probe's own mean
cross-entropy (written out, not autograd, to avoid padded intermediates), so a probe
trained in a batch equals the same probe trained alone with the same initial weights
and minibatch order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from featstore._device import resolve_device
from featstore.errors import InvalidFeaturesError, InvalidParameterError, UnknownNameError

from ._selection import PAPER_FRACTIONS, Family, make_families

__all__ = ["SubsetProbes", "SOLVERS", "load_training_data"]

SOLVERS = ("sgd", "ridge")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainingData:
    X: np.ndarray  # (n, d) float32, clean pass
    y: np.ndarray  # (n,) int64
    views: list[np.ndarray]  # augmented passes, each (n, d)
    n_classes: int
    source: str


def _check_features(X: np.ndarray, where: str) -> None:
    if X.ndim != 2:
        raise InvalidFeaturesError(f"{where}: features must be 2-D (n_samples, n_neurons); got shape {X.shape}")
    if X.shape[0] == 0:
        raise InvalidFeaturesError(f"{where}: 0 samples (empty split)")
    if X.shape[1] == 0:
        raise InvalidFeaturesError(f"{where}: 0 neurons")
    finite = np.isfinite(X)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise InvalidFeaturesError(f"{where}: features hold NaN/Inf (first at row {r}, neuron {c})")


def load_training_data(X, y=None, n_classes: int | None = None, where: str = "train") -> TrainingData:
    """Features and labels from an array, a torch tensor or a featstore group (verified)."""
    if isinstance(X, TrainingData):
        return X
    views: list[np.ndarray] = []
    source = "array"
    if hasattr(X, "spec") and hasattr(X, "check_readable"):  # featstore.Group
        group = X
        group.check_readable()
        source = group.path
        if y is None:
            y = group.labels
        if n_classes is None:
            n_classes = len(group.classes)
        views = [group.numpy(v, dtype=np.float32) for v in range(1, group.n_views + 1)]
        X = group.numpy(0, dtype=np.float32)
    elif hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    _check_features(X, f"{where} ({source})")
    for v in views:
        _check_features(v, f"{where} view ({source})")
    if y is None:
        raise InvalidParameterError(f"{where}: labels y are required for array features")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise InvalidFeaturesError(f"{where}: {len(y)} labels for {len(X)} samples")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidFeaturesError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if n_classes is None:
        n_classes = int(y.max()) + 1
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise InvalidFeaturesError(
            f"{where}: label {int(y[bad][0])} is outside the class range 0..{n_classes - 1} "
            f"({int(bad.sum())} such labels)")
    return TrainingData(X, y.astype(np.int64), views, int(n_classes), source)


class _Group:
    """Families with equal prefix lengths, trained as one batch.

    Everything is kept transposed, samples last, so that each segment's product writes
    a contiguous block of rows: inputs Zt (F, width, B), weights Wt_j (F, (m - j) * C,
    |seg_j|), logits (F, m * C, B). Rows (i - j) * C ... of Wt_j belong to probe i.
    """

    def __init__(self, families: list[Family], lengths: tuple[int, ...], n_classes: int, device, dtype):
        import torch

        self.families = families
        self.lengths = lengths
        self.m = len(lengths)
        self.C = n_classes
        self.F = len(families)
        self.starts = [0] + list(lengths[:-1])
        width = lengths[-1]
        self.width = width
        self.device = device
        self.is_index = all(f.columns is not None for f in families)
        if self.is_index:
            self.columns = torch.as_tensor(np.concatenate([f.columns[:width] for f in families]), device=device)
        else:
            self.basis_t = torch.as_tensor(np.concatenate([f.basis[:, :width] for f in families], axis=1).T.copy(),
                                           device=device, dtype=torch.float32)
        self.W = [torch.zeros((self.F, (self.m - j) * self.C, lengths[j] - self.starts[j]), device=device)
                  for j in range(self.m)]
        self.b = torch.zeros((self.F, self.m * self.C), device=device)
        self.compute_dtype = dtype

    def inputs(self, Xb):
        """Zt (F, width, B): every family's inputs for a minibatch Xb (B, d), samples last."""
        B = Xb.shape[0]
        if self.is_index:
            # gather whole rows of Xbᵀ: contiguous runs of B floats, not a strided column gather
            Zt = Xb.t().contiguous().index_select(0, self.columns)
        else:
            Zt = self.basis_t @ Xb.t()
        return Zt.view(self.F, self.width, B)

    def logits(self, Zt, W=None, b=None):
        """(F, m*C, B) logits of every probe."""
        import torch

        W = W if W is not None else self.W
        b = b if b is not None else self.b
        B = Zt.shape[2]
        out = b.unsqueeze(2).expand(self.F, self.m * self.C, B).contiguous()
        for j in range(self.m):
            lo, hi = self.starts[j], self.lengths[j]
            if hi == lo:
                continue
            if self.compute_dtype is not None:
                out[:, j * self.C:, :] += torch.bmm(W[j].to(self.compute_dtype), Zt[:, lo:hi, :].to(self.compute_dtype)).float()
            else:
                out[:, j * self.C:, :] += torch.bmm(W[j], Zt[:, lo:hi, :])
        return out

    def grads(self, Zt, dlogits):
        """Gradients of every Wt_j and of b from dlogits (F, m*C, B)."""
        import torch

        gW = []
        for j in range(self.m):
            lo, hi = self.starts[j], self.lengths[j]
            dj = dlogits[:, j * self.C:, :]
            zj = Zt[:, lo:hi, :].transpose(1, 2)
            if self.compute_dtype is not None:
                gW.append(torch.bmm(dj.to(self.compute_dtype), zj.to(self.compute_dtype)).float())
            else:
                gW.append(torch.bmm(dj, zj))
        return gW, dlogits.sum(dim=2)

    def probe_slices(self, i):
        """Where probe i's weights live: [(segment j, row slice of Wt_j)] for j <= i."""
        return [(j, slice((i - j) * self.C, (i - j + 1) * self.C)) for j in range(i + 1)]

    def to(self, device):
        if self.is_index:
            self.columns = self.columns.to(device)
        else:
            self.basis_t = self.basis_t.to(device)
        self.device = device
        return self


class SubsetProbes:
    """Linear probes on many neuron subsets of one layer, trained together.

    Parameters
    ----------
    mode : str
        Selection mode: ``random``, ``prefix``, ``pca``, ``pca-least``, ``randproj``
        (ignored when ``subsets`` is given).
    fractions : sequence of float in (0, 1]
        Fractions of the layer; k = max(1, int(f * d)). Default: the paper's 22.
    seeds : sequence of int
        One draw family per seed (random, randproj).
    subsets : sequence of index arrays, optional
        Explicit neuron lists instead of (mode, fractions, seeds).
    solver : {"sgd", "ridge"}
        ``sgd``: the paper's protocol (below). ``ridge``: closed-form ridge regression
        to one-hot targets from the train Gram, regularisation chosen on the validation
        split; a fast screening solver.
    epochs, lr, momentum, weight_decay, batch_size, lr_step, lr_gamma
        SGD protocol (default: the paper's: 50 epochs, lr 0.1 x0.1 every 10, momentum
        0.9, wd 1e-4, batch 256).
    val_fraction : float
        Seeded validation share of train used to pick each probe's best epoch.
    random_state : int
        Seeds the validation split, the minibatch order and the initial weights.
    device : {"auto", "cpu", "cuda"}
    precision : {"fp32", "bf16"}
        bf16 matmuls with fp32 master weights (CUDA only).
    include_full : bool
        Train the full layer (f = 1) alongside as the reference.
    randproj_distribution : {"uniform", "gaussian"}
    ridge_alphas : sequence of float
        Regularisation grid of the ridge solver (relative to the mean Gram diagonal).
    select_epoch : {"best", "last"}
        Keep each probe's weights from its best validation epoch (the paper) or the last.
    verbose : bool
        Progress bar over epochs.
    """

    def __init__(self, mode: str = "random", fractions: Sequence[float] = PAPER_FRACTIONS,
                 seeds: Sequence[int] = (0, 1, 2, 3, 4), subsets=None, solver: str = "sgd", epochs: int = 50,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, batch_size: int = 256,
                 lr_step: int = 10, lr_gamma: float = 0.1, val_fraction: float = 0.1, random_state: int = 0,
                 device: str = "auto", precision: str = "fp32", include_full: bool = True,
                 randproj_distribution: str = "uniform", ridge_alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                 select_epoch: str = "best", verbose: bool = False):
        self.mode = mode
        self.fractions = fractions
        self.seeds = seeds
        self.subsets = subsets
        self.solver = solver
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.lr_step = lr_step
        self.lr_gamma = lr_gamma
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.device = device
        self.precision = precision
        self.include_full = include_full
        self.randproj_distribution = randproj_distribution
        self.ridge_alphas = ridge_alphas
        self.select_epoch = select_epoch
        self.verbose = verbose

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if self.solver not in SOLVERS:
            raise UnknownNameError("solver", self.solver, SOLVERS)
        if self.select_epoch not in ("best", "last"):
            raise UnknownNameError("select_epoch", self.select_epoch, ("best", "last"))
        if self.precision not in PRECISIONS:
            raise UnknownNameError("precision", self.precision, PRECISIONS)
        for name, low in (("epochs", 1), ("batch_size", 1), ("lr_step", 1)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
                raise InvalidParameterError(f"{name}={v!r} must be an integer >= {low}")
        if not isinstance(self.random_state, (int, np.integer)) or self.random_state < 0:
            raise InvalidParameterError(f"random_state={self.random_state!r} must be a non-negative integer")
        for name in ("lr", "lr_gamma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise InvalidParameterError(f"{name}={v!r} must be > 0")
        if not 0 <= self.momentum < 1:
            raise InvalidParameterError(f"momentum={self.momentum!r} must be in [0, 1)")
        if self.weight_decay < 0:
            raise InvalidParameterError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not 0 < self.val_fraction < 1:
            raise InvalidParameterError(f"val_fraction={self.val_fraction!r} must be in (0, 1)")

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, n_classes: int | None = None) -> "SubsetProbes":
        """Train every probe.

        Parameters
        ----------
        X : array of shape (n_samples, n_neurons), torch tensor or featstore.Group
            Train features; a group's augmented views, if any, are read one per epoch
            (epoch e uses pass e mod (1 + views)).
        y : array of shape (n_samples,), optional
            Labels (default for a group: its labels).
        n_classes : int, optional
            Default: the group's classes, or max(y) + 1.
        """

        self._validate()
        device = resolve_device(self.device)
        if self.precision == "bf16" and not device.startswith("cuda"):
            raise InvalidParameterError("precision='bf16' needs a CUDA device; use precision='fp32' on CPU")
        data = load_training_data(X, y, n_classes)
        n, d = data.X.shape
        rng = np.random.default_rng(self.random_state)
        perm = rng.permutation(n)
        n_val = max(1, int(round(self.val_fraction * n)))
        if n - n_val < 1:
            raise InvalidFeaturesError(f"train split has {n} samples: too few for a {self.val_fraction:.0%} validation split")
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        fams = make_families(d, self.mode, self.fractions, self.seeds, X_train=data.X[train_idx],
                             subsets=self.subsets, randproj_distribution=self.randproj_distribution)
        if self.include_full:
            from ._selection import Draw

            full = Draw("full", 1.0, d, None, neurons=np.arange(d))
            fams.append(Family("full", None, (d,), [full], columns=np.arange(d)))
        self.n_features_in_ = d
        self.n_classes_ = data.n_classes
        self.families_ = fams
        self.draws_ = [dr for f in fams for dr in f.draws]
        self.val_indices_ = val_idx
        self.train_indices_ = train_idx
        t0 = time.perf_counter()
        if self.solver == "sgd":
            self._fit_sgd(data, train_idx, val_idx, device)
        else:
            self._fit_ridge(data, train_idx, val_idx, device)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The train rows of ``epoch`` in minibatch order (shared by every probe)."""
        return np.random.default_rng([self.random_state, 11, epoch]).permutation(self.train_indices_)

    def _groups(self, device, dtype):
        by_len: dict[tuple, list[Family]] = {}
        # index families and projection families cannot share one gather
        for f in self.families_:
            by_len.setdefault((f.lengths, f.columns is not None), []).append(f)
        return [_Group(fs, key[0], self.n_classes_, device, dtype) for key, fs in by_len.items()]

    def initial_weights(self, draw: int):
        """The initial (weight (k, C), bias (C,)) of a draw: nn.Linear's default uniform init, seeded per draw."""
        k = self.draws_[draw].k
        g = np.random.default_rng([self.random_state, 7, draw])
        bound = 1.0 / math.sqrt(k)
        return (g.uniform(-bound, bound, size=(k, self.n_classes_)).astype(np.float32),
                g.uniform(-bound, bound, size=self.n_classes_).astype(np.float32))

    def _draw_positions(self, groups):
        """For each draw: (group index, family index in group, probe index in family)."""
        pos = {}
        for gi, g in enumerate(groups):
            for fi, fam in enumerate(g.families):
                for pi, dr in enumerate(fam.draws):
                    pos[id(dr)] = (gi, fi, pi)
        return [pos[id(dr)] for dr in self.draws_]

    def _fit_sgd(self, data: TrainingData, train_idx, val_idx, device):
        import torch

        dtype = torch.bfloat16 if self.precision == "bf16" else None
        groups = self._groups(device, dtype)
        positions = self._draw_positions(groups)
        for di, (gi, fi, pi) in enumerate(positions):  # per-draw seeded init
            w0, b0 = self.initial_weights(di)
            g = groups[gi]
            for j, cols in g.probe_slices(pi):
                lo, hi = g.starts[j], g.lengths[j]
                g.W[j][fi, cols, :] = torch.from_numpy(w0[lo:hi].T)
            g.b[fi, pi * g.C:(pi + 1) * g.C] = torch.from_numpy(b0)
        passes = [data.X] + data.views
        on_device = [_to_device(p, device) for p in passes]
        y_all = torch.as_tensor(data.y, device=device)
        val_t = torch.as_tensor(val_idx, device=device)
        C = self.n_classes_
        bufW = [[torch.zeros_like(w) for w in g.W] for g in groups]
        bufb = [torch.zeros_like(g.b) for g in groups]
        best = [([w.clone() for w in g.W], g.b.clone()) for g in groups]
        best_acc = [torch.full((g.F, g.m), -1.0, device=device) for g in groups]
        best_epoch = [torch.zeros((g.F, g.m), dtype=torch.long, device=device) for g in groups]
        last_loss = [torch.zeros((g.F, g.m), device=device) for g in groups]
        from tqdm.auto import tqdm

        bar = tqdm(range(self.epochs), desc=f"probes ({len(self.draws_)})", unit="epoch", disable=not self.verbose)
        for epoch in bar:
            lr = self.lr * self.lr_gamma ** (epoch // self.lr_step)
            Xp = on_device[epoch % len(on_device)]
            order = torch.as_tensor(self.epoch_order(epoch), device=device)
            loss_sum = [torch.zeros((g.F, g.m), device=device) for g in groups]
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                Xb = Xp.index_select(0, rows.to(Xp.device)).to(device, non_blocking=True)
                yb = y_all[rows]
                B = len(rows)
                onehot = torch.nn.functional.one_hot(yb, C).to(torch.float32).t().reshape(1, 1, C, B)
                y_index = yb.view(1, 1, 1, B)
                for gi, g in enumerate(groups):
                    Zt = g.inputs(Xb)
                    logits = g.logits(Zt).view(g.F, g.m, C, B)
                    # softmax cross-entropy over the class axis, written out (the class axis is not last)
                    top = logits.amax(dim=2, keepdim=True)
                    p = (logits - top).exp_()
                    norm = p.sum(dim=2, keepdim=True)
                    true = logits.gather(2, y_index.expand(g.F, g.m, 1, B)).squeeze(2)
                    loss_sum[gi] += ((norm.log() + top).squeeze(2) - true).sum(2)
                    p.div_(norm).sub_(onehot).div_(B)  # d(mean loss)/d(logits)
                    gW, gb = g.grads(Zt, p.view(g.F, g.m * C, B))
                    _sgd_step(g.W, gW, bufW[gi], lr, self.momentum, self.weight_decay)
                    _sgd_step([g.b], [gb], [bufb[gi]], lr, self.momentum, self.weight_decay)
            # validation on the clean pass picks each probe's best epoch
            for gi, g in enumerate(groups):
                last_loss[gi] = loss_sum[gi] / len(order)
                acc = self._accuracy(g, on_device[0], y_all, val_t, device)
                better = acc > best_acc[gi] if self.select_epoch == "best" else torch.ones_like(acc, dtype=torch.bool)
                best_acc[gi] = torch.where(better, acc, best_acc[gi])  # with "last": the last epoch's
                best_epoch[gi] = torch.where(better, torch.full_like(best_epoch[gi], epoch + 1), best_epoch[gi])
                bw, bb = best[gi]
                for j in range(g.m):
                    mask = better[:, j:].repeat_interleave(C, dim=1).unsqueeze(2)
                    bw[j] = torch.where(mask, g.W[j], bw[j])
                bb.copy_(torch.where(better.repeat_interleave(C, dim=1), g.b, bb))
        bar.close()
        for gi, g in enumerate(groups):  # keep the best epoch's weights, on the CPU (picklable)
            g.W = [w.cpu() for w in best[gi][0]]
            g.b = best[gi][1].cpu()
            g.to("cpu")
        self.groups_ = groups
        self.val_accuracy_ = np.array([float(best_acc[gi][fi, pi]) for gi, fi, pi in positions])
        self.best_epoch_ = np.array([int(best_epoch[gi][fi, pi]) for gi, fi, pi in positions])
        self.train_loss_ = np.array([float(last_loss[gi][fi, pi]) for gi, fi, pi in positions])
        self.positions_ = positions

    def _accuracy(self, g: _Group, X, y_all, rows, device, W=None, b=None):
        import torch

        correct = torch.zeros((g.F, g.m), device=device)
        for start in range(0, len(rows), 4096):
            r = rows[start:start + 4096]
            Xb = X.index_select(0, r.to(X.device)).to(device)
            logits = g.logits(g.inputs(Xb), W, b).view(g.F, g.m, g.C, len(r))
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
        groups = self._groups(device, None)
        positions = self._draw_positions(groups)
        val_t = torch.as_tensor(val_idx, device=device)
        y_all = torch.as_tensor(data.y, device=device)
        val_acc, alphas = [], []
        for di, (gi, fi, pi) in enumerate(positions):
            g, fam = groups[gi], groups[gi].families[fi]
            k = fam.lengths[pi]
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
            for j, cols in g.probe_slices(pi):
                lo, hi = g.starts[j], g.lengths[j]
                g.W[j][fi, cols, :] = W[lo:hi].T.float()
            g.b[fi, pi * C:(pi + 1) * C] = b.float()
        for g in groups:
            g.W = [w.cpu() for w in g.W]
            g.b = g.b.cpu()
            g.to("cpu")
        self.groups_ = groups
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
        X = np.ascontiguousarray(np.asarray(X.numpy(0, dtype=np.float32) if hasattr(X, "spec") else X, dtype=np.float32))
        _check_features(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise InvalidFeaturesError(f"X has {X.shape[1]} neurons; the probes were fitted on {self.n_features_in_}")
        out = np.empty((len(X), len(self.draws_), self.n_classes_), dtype=np.float32)
        Xt = torch.from_numpy(X)
        with torch.no_grad():
            for start in range(0, len(X), 4096):
                Xb = Xt[start:start + 4096]
                per_group = [g.logits(g.inputs(Xb)).view(g.F, g.m, g.C, len(Xb)) for g in self.groups_]
                for di, (gi, fi, pi) in enumerate(self.positions_):
                    out[start:start + len(Xb), di] = per_group[gi][fi, pi].T.numpy()
        return out

    def predict(self, X) -> np.ndarray:
        """Predicted classes, array of shape (n_samples, n_draws)."""
        return self.decision_function(X).argmax(-1)

    def evaluate(self, X, y=None):
        """Per-probe results on a test split, as a pandas DataFrame (one row per draw).

        Columns: draw, mode, fraction, k, seed, test_accuracy, per_class_accuracy (list),
        val_accuracy, best_epoch, train_loss, solver, neurons / projection (the draw's record).
        """
        import pandas as pd

        data = load_training_data(X, y, self.n_classes_, where="test")
        pred = self.predict(data.X)
        correct = pred == data.y[:, None]
        counts = np.bincount(data.y, minlength=self.n_classes_)
        rows = []
        for di, dr in enumerate(self.draws_):
            per_class = np.bincount(data.y[correct[:, di]], minlength=self.n_classes_) / np.maximum(counts, 1)
            rec = dr.record()
            rows.append({"draw": di, "mode": dr.mode, "fraction": dr.fraction, "k": dr.k, "seed": dr.seed,
                         "test_accuracy": float(correct[:, di].mean()), "per_class_accuracy": per_class.tolist(),
                         "val_accuracy": float(self.val_accuracy_[di]), "best_epoch": int(self.best_epoch_[di]),
                         "train_loss": float(self.train_loss_[di]), "solver": self.solver,
                         "neurons": rec["neurons"], "projection": rec["projection"]})
        self.results_ = pd.DataFrame(rows)
        return self.results_

    def _check_fitted(self):
        if not hasattr(self, "groups_"):
            raise InvalidParameterError("this SubsetProbes is not fitted yet; call fit(X, y) first")

    def get_params(self, deep: bool = True) -> dict:
        import inspect

        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters if p != "self"}

    def __repr__(self) -> str:
        return f"SubsetProbes(mode={self.mode!r}, solver={self.solver!r}, epochs={self.epochs}, device={self.device!r})"


def _sgd_step(params, grads, bufs, lr, momentum, weight_decay):
    """torch.optim.SGD's update (dampening 0, no nesterov), in place."""
    for p, g, buf in zip(params, grads, bufs):
        if weight_decay:
            g = g.add(p, alpha=weight_decay)
        buf.mul_(momentum).add_(g)
        p.add_(buf, alpha=-lr)


def _to_device(X: np.ndarray, device: str):
    """The whole pass on the device when it fits comfortably, else pinned host memory
    from which each minibatch is copied (features larger than device memory)."""
    import torch

    t = torch.from_numpy(X)
    if device == "cpu":
        return t
    free, _ = torch.cuda.mem_get_info()
    if t.numel() * 4 < 0.5 * free:
        return t.to(device)
    return t.pin_memory()
