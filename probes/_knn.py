"""The kNN solver: a weighted k-nearest-neighbour vote on cosine similarity, every draw at once.

A probe "fitted" by kNN keeps the train rows; a query's class is the weighted vote of its k
most cosine-similar train rows on the draw's own inputs (its neurons, or its projection).
Weights (``knn_weights``): ``temperature``, DINOv2's (``eval/knn.py``: a softmax of the
similarities over ``max(ks)`` neighbours at temperature T, summed per class over the first
k), ``distance`` (scikit-learn's ``weights="distance"`` with ``metric="cosine"``: 1 / (1 -
cos), a neighbour at distance 0 outvoting the rest) or ``uniform``. Each draw keeps the k of
``ks`` its validation split scores best.

All subsets at once, via the Gram blocks: the draws of a family are prefixes of one ordering
(or of one projection), so a query's dot products with every train row, and the squared
norms of both, accumulate segment by segment; each prefix length then normalises, ranks and
votes. One product per segment serves every draw of the family.
"""

from __future__ import annotations

import numpy as np

from ._data import TrainingData

__all__ = ["fit_knn", "knn_scores", "check_ks"]

# query rows per product: each holds a (rows, train rows) float32 similarity matrix
_CHUNK_ELEMENTS = 1 << 24
_DISK_ROWS = 65536  # query rows read at once from features on disk


def fit_knn(est, data: TrainingData, train_idx, val_idx, device):
    """Keep the train rows; choose each draw's k from ``ks`` on the validation rows."""
    import torch

    check_ks(est, min(len(est.train_rows(seed)) for seed in est.streams_))
    est._knn_X = torch.as_tensor(np.asarray(data.X, dtype=np.float32), device=device)
    est._knn_y = torch.as_tensor(data.y, device=device)
    ks = sorted(est.ks)
    Q = est._knn_X.index_select(0, torch.as_tensor(val_idx, device=device))
    y_val = est._knn_y.index_select(0, torch.as_tensor(val_idx, device=device))
    correct = np.zeros((len(est.draws_), len(ks)))
    for di, rows, scores in _votes(est, Q, lambda di: ks, "kNN validation"):
        truth = y_val[rows]
        for j, s in enumerate(scores):
            correct[di, j] += _right(s, truth)
    acc = correct / max(len(val_idx), 1)
    choice = acc.argmax(1)  # the first best: the smallest k on a tie, with ks ascending
    est.knn_k_ = np.array([ks[j] for j in choice])
    est.val_accuracy_ = acc[np.arange(len(choice)), choice]
    est.best_epoch_ = np.zeros(len(est.draws_), dtype=int)
    est.train_loss_ = np.full(len(est.draws_), np.nan)  # no loss: a vote
    est.solver_records_ = {"knn_k": est.knn_k_}
    est.batches_, est.positions_ = [], []


def check_ks(est, train_rows: int) -> None:
    """A vote over k neighbours needs k train rows: every k of ``ks`` at most ``train_rows``."""
    from featstore.errors import IncompatibleParametersError

    if max(est.ks) > train_rows:
        raise IncompatibleParametersError(
            key="ks", value=list(est.ks),
            reason=f"a vote over k neighbours needs k train rows; the smallest train split of these probes has "
                   f"{train_rows}")


def knn_scores(est, features) -> np.ndarray:
    """Every draw's class votes (n_samples, n_draws, n_classes) at its chosen k: the weights
    summed per class (``temperature``: DINOv2's class probabilities)."""
    import torch

    from ._inputs import RowFile

    if isinstance(features, RowFile):  # on disk: in row blocks
        n = features.shape[0]
        blocks = ((a, features.rows(a, min(a + _DISK_ROWS, n))) for a in range(0, n, _DISK_ROWS))
    else:
        n = features.n_samples
        blocks = iter([(0, features.numpy())])
    out = np.zeros((n, len(est.draws_), est.n_classes_), dtype=np.float32)
    for at, block in blocks:
        Q = torch.as_tensor(np.asarray(block, dtype=np.float32), device=est._knn_X.device)
        for di, rows, scores in _votes(est, Q, lambda di: [int(est.knn_k_[di])], "kNN votes"):
            out[at + rows.start:at + rows.stop, di] = scores[0].cpu().numpy()
    return out


def _right(scores, truth) -> int:
    """Queries whose largest vote is their class (the first largest on a tie, as argmax)."""
    return int((scores.argmax(1) == truth).sum())


def _votes(est, Q, ks_of, what: str):
    """Yield (draw, query rows slice, [votes (rows, C) for each k of ``ks_of(draw)``]) for every
    draw of ``est`` and chunk of the queries ``Q`` (n, d); a progress bar over the families
    (``what``) when the estimator is verbose."""
    import torch
    from tqdm.auto import tqdm

    index = {id(dr): di for di, dr in enumerate(est.draws_)}
    C = est.n_classes_
    for fam in tqdm(est.families_, desc=f"{what} ({len(est.draws_)} probes)", unit="family",
                    disable=not est.verbose):
        seed = est.streams_[est._stream(fam)]
        cand = torch.as_tensor(est.train_rows(seed), device=Q.device)
        T = est._knn_X.index_select(0, cand)
        labels = est._knn_y.index_select(0, cand)
        inputs = _family_inputs(fam, Q.device)
        Tf = inputs(T)
        cuts = [0] + list(fam.lengths)
        t_sq = torch.zeros(len(T), device=Q.device)
        t_inv = []  # per draw: 1 / the train rows' norms on its inputs (0 for a zero row, as sklearn's normalize)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            t_sq = t_sq + (Tf[:, lo:hi] ** 2).sum(1)
            t_inv.append(_inverse_norm(t_sq))
        draws = [index[id(dr)] for dr in fam.draws]
        ks = {di: ks_of(di) for di in draws}
        kmax = max(est.ks)  # the temperature vote's softmax runs over max(ks) neighbours whatever k votes
        step = max(1, _CHUNK_ELEMENTS // max(len(T), 1))
        for start in range(0, len(Q), step):
            rows = slice(start, min(start + step, len(Q)))
            Qf = inputs(Q[rows])
            dots = torch.zeros((len(Qf), len(T)), device=Q.device)
            q_sq = torch.zeros(len(Qf), device=Q.device)
            for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
                if hi > lo:
                    dots.addmm_(Qf[:, lo:hi], Tf[:, lo:hi].T)
                    q_sq = q_sq + (Qf[:, lo:hi] ** 2).sum(1)
                sims = dots * _inverse_norm(q_sq)[:, None] * t_inv[i][None, :]
                top, at = sims.topk(kmax, dim=1)  # sorted, most similar first
                yield draws[i], rows, _weighted(est, top, labels[at], ks[draws[i]], C)


def _family_inputs(fam, device):
    """rows (n, d) -> the family's inputs (n, its widest k): its neurons in its own order, or its
    projection."""
    import torch

    width = fam.lengths[-1]
    if fam.columns is not None:
        cols = torch.as_tensor(np.asarray(fam.columns[:width]), device=device)
        return lambda A: A.index_select(1, cols)
    basis = torch.as_tensor(np.asarray(fam.basis[:, :width], dtype=np.float32), device=device)
    return lambda A: A @ basis


def _inverse_norm(sq):
    import torch

    norm = sq.sqrt()
    return torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))


def _weighted(est, top, neighbours, ks, C):
    """Class votes (rows, C) of the first k neighbours, for each k of ``ks``."""
    import torch

    if est.knn_weights == "temperature":  # DINOv2: softmax over the max_k neighbours, summed over the first k
        w = torch.softmax(top / est.knn_temperature, dim=1)
    elif est.knn_weights == "distance":  # scikit-learn: 1 / cosine distance (clipped to [0, 2] as it does)
        dist = (1.0 - top).clamp(0.0, 2.0)
        w = None
    else:
        w = torch.ones_like(top)
    out = []
    for k in ks:
        if w is None:  # a row with a neighbour at distance 0: those neighbours alone, weight 1 each
            d = dist[:, :k]
            zero = d == 0
            wk = torch.where(zero.any(1, keepdim=True), zero.to(d.dtype), 1.0 / d.clamp_min(torch.finfo(d.dtype).tiny))
        else:
            wk = w[:, :k]
        votes = torch.zeros((len(top), C), device=top.device, dtype=top.dtype)
        out.append(votes.scatter_add_(1, neighbours[:, :k], wk))
    return out
