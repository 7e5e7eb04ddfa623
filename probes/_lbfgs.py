"""The L-BFGS solver: multinomial logistic regression with an L2 penalty, full batch, every
probe of a fit at once (CLIP's and DINOv2's linear-probe protocol).

Each probe minimises scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` objective, in
its scaling: the mean cross-entropy over the train rows plus ``||W||^2 / (2 C n)`` (the bias
is not penalised). Every probe has its own L-BFGS state (the last ``LBFGS_HISTORY`` steps),
its own backtracking line search (Armijo) and its own convergence test (the largest gradient
entry at most ``tol``, as scipy's ``gtol``): one probe's step never depends on another's. The
value and gradient of every probe come from the engine's batched products (``_ProbeBatch``),
over the train rows in chunks.

For each C of ``Cs`` (ascending, each warm-started from the last) every probe is trained and
scored on the validation rows; each probe keeps the C that scores best there (the first of a
tie: the strongest penalty), recorded with its iterations and whether it converged. With
``refit``, each probe is then trained again, from there, on the train and validation rows with
its chosen C (CLIP's protocol).
"""

from __future__ import annotations

import numpy as np

from ._batch import _Minibatch, _ProbeBatch

__all__ = ["fit_lbfgs", "LBFGS_HISTORY"]

LBFGS_HISTORY = 10  # scipy's L-BFGS-B default (maxcor)
ARMIJO = 1e-4  # sufficient decrease
MAX_HALVINGS = 20
# A probe stops (converged or not: ``tol`` decides which it is recorded as) once a step lowers
# its objective by less than this, relative (scipy's ftol is 64 x float64's epsilon).
FTOL = 64 * float(np.finfo(np.float64).eps)
CHUNK_ROWS = 8192  # train rows per product while a value and gradient are summed


class _Probes:
    """Per-probe arithmetic on a batch's flat parameter vectors: each probe's rows of every
    column block and of the bias, as (F, m) reductions and (F, m) scalings."""

    def __init__(self, g: _ProbeBatch):
        self.g = g
        self.F, self.m, self.C = g.F, g.m, g.C

    def _parts(self, flat):
        W, b = self.g.views(flat)
        for (a, lo, hi), w in zip(self.g.blocks, W):
            yield a, w.view(self.F, self.m - a, self.C, hi - lo)
        yield 0, b.view(self.F, self.m, self.C, 1)

    def dot(self, u, v):
        import torch

        out = torch.zeros((self.F, self.m), dtype=torch.float64, device=u.device)
        for (a, pu), (_, pv) in zip(self._parts(u), self._parts(v)):
            out[:, a:] += (pu.double() * pv.double()).sum((2, 3))
        return out

    def weight_sq(self, u):
        """Each probe's squared weight norm (the bias left out)."""
        import torch

        out = torch.zeros((self.F, self.m), dtype=torch.float64, device=u.device)
        parts = list(self._parts(u))[:-1]
        for a, pu in parts:
            out[:, a:] += (pu.double() ** 2).sum((2, 3))
        return out

    def max_abs(self, u):
        import torch

        out = torch.zeros((self.F, self.m), device=u.device, dtype=u.dtype)
        for a, pu in self._parts(u):
            out[:, a:] = torch.maximum(out[:, a:], pu.abs().amax((2, 3)))
        return out

    def scaled(self, u, s):
        """u with probe (f, i)'s entries times s[f, i]."""
        import torch

        out = torch.empty_like(u)
        s = s.to(u.dtype)
        for (a, pu), (_, po) in zip(self._parts(u), self._parts(out)):
            torch.mul(pu, s[:, a:, None, None], out=po)
        return out

    def where(self, mask, u, v):
        """u where mask[f, i], else v, probe by probe."""
        import torch

        out = torch.empty_like(u)
        for (a, pu), (_, pv), (_, po) in zip(self._parts(u), self._parts(v), self._parts(out)):
            po.copy_(torch.where(mask[:, a:, None, None], pu, pv))
        return out


def _value_grad(g: _ProbeBatch, flat, X, y, rows, n_streams, C_reg, classes):
    """Every probe's objective (F, m) float64 and its gradient (flat), at ``flat``. ``C_reg``: one
    C for every probe, or an (F, m) tensor of each probe's own."""
    import torch

    from ._sgd import _softmax_gradient

    g.set_flat(flat)
    n = len(rows)
    loss = torch.zeros((g.F, g.m), device=flat.device, dtype=flat.dtype)
    grad = torch.zeros_like(flat)
    part = torch.zeros_like(flat)
    gW, gb = g.views(part)
    for s in range(0, n, CHUNK_ROWS):
        r = rows[s:s + CHUNK_ROWS]
        mb = _Minibatch(X.index_select(0, r), n_streams)  # every stream: the same rows (full batch)
        zs = g.inputs(mb)
        logits = g.logits(zs).view(g.F, g.m, g.C, len(r))
        ys = y[r].view(1, -1).expand(n_streams, -1)
        p = _softmax_gradient(logits, g.targets(ys), loss, classes)
        g.grads(zs, p.view(g.F, g.m * g.C, len(r)), gW, gb, 1.0 / n)
        grad += part
    probes = _Probes(g)
    inv = 1.0 / (C_reg * n)
    # the L2 term's gradient, on the weights (masked entries stay zero; the bias, last, is not penalised)
    for (a, gw), (_, w) in list(zip(probes._parts(grad), probes._parts(flat)))[:-1]:
        if isinstance(inv, float):
            gw.add_(w, alpha=inv)
        else:
            gw.add_(w * inv[:, a:, None, None].to(w.dtype))
    value = loss.double() / n + probes.weight_sq(flat) * (inv / 2)
    return value, grad


def _minimise(g: _ProbeBatch, flat, X, y, rows, n_streams, C_reg, classes, tol, max_iter):
    """L-BFGS from ``flat`` for every probe of g; returns (flat, value (F, m), iterations (F, m),
    converged (F, m))."""
    import torch

    probes = _Probes(g)
    f, grad = _value_grad(g, flat, X, y, rows, n_streams, C_reg, classes)
    S, Y, R = [], [], []
    iters = torch.zeros((g.F, g.m), dtype=torch.long, device=flat.device)
    done = probes.max_abs(grad) <= tol
    for _ in range(max_iter):
        if bool(done.all()):
            break
        # two-loop recursion, per probe (a pair with s.y <= 0 has rho 0: it does not act)
        q = grad.clone()
        alphas = []
        for s, yv, rho in zip(reversed(S), reversed(Y), reversed(R)):
            alpha = rho * probes.dot(s, q)
            q -= probes.scaled(yv, alpha)
            alphas.append(alpha)
        if S:
            sy, yy = probes.dot(S[-1], Y[-1]), probes.dot(Y[-1], Y[-1])
            gamma = torch.where(sy > 0, sy / yy.clamp_min(1e-300), torch.ones_like(sy))
        else:  # the first step: a unit-size steepest descent
            gamma = 1.0 / probes.max_abs(grad).double().clamp_min(1e-12)
        r = probes.scaled(q, gamma)
        for (s, yv, rho), alpha in zip(zip(S, Y, R), reversed(alphas)):
            beta = rho * probes.dot(yv, r)
            r += probes.scaled(s, alpha - beta)
        direction = -r
        slope = probes.dot(grad, direction)
        uphill = slope >= 0  # not a descent direction: steepest descent instead
        if bool(uphill.any()):
            direction = probes.where(uphill, -grad, direction)
            slope = torch.where(uphill, -probes.dot(grad, grad), slope)
        direction = probes.scaled(direction, (~done).double())  # converged probes stay
        # backtracking: each probe halves its own step until its objective falls enough
        t = torch.ones((g.F, g.m), dtype=torch.float64, device=flat.device)
        accepted = done.clone()
        new_flat, new_f, new_grad = flat, f, grad
        for _ in range(MAX_HALVINGS):
            trial = flat + probes.scaled(direction, t)
            f_t, grad_t = _value_grad(g, trial, X, y, rows, n_streams, C_reg, classes)
            ok = (~accepted) & (f_t <= f + ARMIJO * t * slope)
            if bool(ok.any()):
                new_flat = probes.where(ok, trial, new_flat)
                new_grad = probes.where(ok, grad_t, new_grad)
                new_f = torch.where(ok, f_t, new_f)
                accepted |= ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, t / 2)
        stalled = ~accepted  # no step decreased it: at the precision's floor
        s_new, y_new = new_flat - flat, new_grad - grad
        sy = probes.dot(s_new, y_new)
        S.append(s_new)
        Y.append(y_new)
        R.append(torch.where(sy > 1e-12, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy)))
        if len(S) > LBFGS_HISTORY:
            S.pop(0), Y.pop(0), R.pop(0)
        iters += (~done).long()
        flat_progress = (f - new_f) <= FTOL * torch.maximum(torch.maximum(f.abs(), new_f.abs()), torch.ones_like(f))
        flat, f, grad = new_flat, new_f, new_grad
        done = done | (probes.max_abs(grad) <= tol) | stalled | flat_progress
    converged = probes.max_abs(grad) <= tol
    g.set_flat(flat)
    return flat, f, iters, converged


def fit_lbfgs(est, data, train_idx, val_idx, device):
    """Every draw of ``est`` by L-BFGS, for each C of ``est.Cs``, the best C per draw on validation."""
    import torch

    from ._sgd import _accuracy

    batches = est._batches(device, None)
    positions = est._draw_positions(batches)
    # the clean pass of each set of features (a joint fit's layers), in float64 as scikit-learn's: L-BFGS
    # converges past float32's resolution of the objective; augmented views are not used
    Xs = [torch.as_tensor(np.asarray(passes[0]), device=device, dtype=torch.float64)
          for passes in est._source_passes(data)]
    y_all = torch.as_tensor(data.y, device=device)
    rows = torch.as_tensor(train_idx, device=device)
    val_t = torch.as_tensor(val_idx, device=device)
    n_streams = len(est.streams_)
    classes = torch.arange(est.n_classes_, device=device).view(1, 1, -1, 1)
    full_rows = min(est.batch_size, len(train_idx))
    per_batch = []
    for g in batches:
        g.in_dtype(torch.float64)
        flat = torch.zeros_like(g.flat)  # scikit-learn starts from zero
        best = (torch.full((g.F, g.m), -1.0, device=device), flat.clone(), None, None, None, None)
        probes = _Probes(g)
        input_buf, logit_buf = g.input_buffer(full_rows, device), g.logit_buffers(full_rows)
        X = Xs[g.source]
        for ci, C_reg in enumerate(sorted(est.Cs)):
            flat, f, iters, conv = _minimise(g, flat, X, y_all, rows, n_streams, C_reg, classes, est.tol,
                                             est.max_iter)
            acc = _accuracy(est, g, X, y_all, val_t, device, input_buf, logit_buf)
            better = acc > best[0]
            keep = probes.where(better, flat, best[1])
            chose = torch.full((g.F, g.m), ci, device=device)
            best = (torch.where(better, acc, best[0]), keep,
                    chose if best[2] is None else torch.where(better, chose, best[2]),
                    f if best[3] is None else torch.where(better, f, best[3]),
                    iters if best[4] is None else torch.where(better, iters, best[4]),
                    conv if best[5] is None else torch.where(better, conv, best[5]))
        if est.refit:  # CLIP's protocol: each probe trained again on train + validation rows with its chosen C
            chosen_C = torch.as_tensor(np.array(sorted(est.Cs)), device=device)[best[2]]
            flat, f, iters, conv = _minimise(g, best[1], X, y_all, torch.cat([rows, val_t]), n_streams, chosen_C,
                                             classes, est.tol, est.max_iter)
            best = (best[0], flat, best[2], f, best[4] + iters, conv)
        g.set_flat(best[1])
        g.in_dtype(torch.float32).to("cpu")
        per_batch.append(best)
    grid = np.array(sorted(est.Cs))
    est.batches_ = batches
    est.positions_ = positions

    def per_draw(i, cast):
        return np.array([cast(per_batch[bi][i][fi, pi]) for bi, fi, pi in positions])

    est.val_accuracy_ = per_draw(0, float)
    est.train_loss_ = per_draw(3, float)  # the chosen C's objective (mean cross-entropy + penalty)
    est.best_epoch_ = np.zeros(len(positions), dtype=int)  # no epochs
    # per draw: the chosen C, its L-BFGS iterations, and whether its gradient reached tol
    est.solver_records_ = {"C": grid[per_draw(2, int)], "n_iter": per_draw(4, int), "converged": per_draw(5, bool)}
