"""The ridge solver: closed-form ridge regression to centred one-hot targets from the train
Gram, its regularisation chosen per probe on the validation split (a fast screening solver)."""

from __future__ import annotations

import numpy as np

from ._data import TrainingData

__all__ = ["fit_ridge"]


def fit_ridge(est, data: TrainingData, train_idx, val_idx, device):
    """Closed-form ridge to centred one-hot targets, alpha chosen per probe on validation."""
    import torch

    dtype = torch.float64
    X = torch.as_tensor(data.X, device=device, dtype=dtype)
    C = est.n_classes_
    Y = torch.nn.functional.one_hot(torch.as_tensor(data.y, device=device), C).to(dtype)
    tr = torch.as_tensor(train_idx, device=device)
    Xt, Yt = X[tr], Y[tr]
    mx, my = Xt.mean(0), Yt.mean(0)
    Xc, Yc = Xt - mx, Yt - my
    G, XY = Xc.T @ Xc, Xc.T @ Yc
    batches = est._batches(device, None)
    positions = est._draw_positions(batches)
    val_t = torch.as_tensor(val_idx, device=device)
    y_all = torch.as_tensor(data.y, device=device)
    val_acc, alphas = [], []
    family_of = {id(dr): f for f in est.families_ for dr in f.draws}
    for di, (bi, fi, pi) in enumerate(positions):
        g, draw = batches[bi], est.draws_[di]
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
        for a in est.ridge_alphas:
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
    est.batches_ = batches
    est.positions_ = positions
    est.val_accuracy_ = np.array(val_acc)
    est.best_epoch_ = np.zeros(len(positions), dtype=int)
    est.ridge_alpha_ = np.array(alphas)
    est.solver_records_ = {"ridge_alpha": est.ridge_alpha_}
    est.train_loss_ = np.full(len(positions), np.nan)  # no iterative loss for a closed form
