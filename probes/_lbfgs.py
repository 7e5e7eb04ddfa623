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

from . import _batch
from ._batch import _Minibatch, _ProbeBatch

__all__ = ["fit_lbfgs", "LBFGS_HISTORY"]

LBFGS_HISTORY = 10  # scipy's L-BFGS-B default (maxcor)
ARMIJO = 1e-4  # sufficient decrease
MAX_HALVINGS = 20
# A probe stops (converged or not: ``tol`` decides which it is recorded as) once a step lowers
# its objective by less than this, relative (scipy's ftol is 64 x float64's epsilon).
FTOL = 64 * float(np.finfo(np.float64).eps)
# With float32 products the objective is known to ~1e-7 relative: a probe stops there (or after fewer
# halvings) and, unless its gradient is at tol already, goes on with float64 products.
FTOL_FLOAT32 = 1e-6
HALVINGS_FLOAT32 = 6
# A batch whose running probes fall to this share of its probes hands them to a batch of their own.
COMPACT_BELOW = 0.5
CHUNK_ROWS = 8192  # train rows per product while a value and gradient are summed


class _Probes:
    """Per-probe arithmetic on a batch's flat parameter vectors (weights of every column block,
    then the biases), each entry tagged once with its probe (``probe_of``): (F, m) reductions and
    (F, m) scalings in one or two kernels each, whatever the number of blocks."""

    def __init__(self, g: _ProbeBatch):
        import torch

        self.g = g
        self.F, self.m, self.C = g.F, g.m, g.C
        tags = torch.empty(g.n_params, dtype=torch.long)
        W, b = g.views(tags)
        probe = torch.arange(self.F * self.m).view(self.F, self.m)
        for (a, lo, hi), w in zip(g.blocks, W):
            w.view(self.F, self.m - a, self.C, hi - lo).copy_(probe[:, a:, None, None])
        b.view(self.F, self.m, self.C).copy_(probe[:, :, None])
        self.probe_of = tags.to(g.flat.device)
        self.weights = torch.ones(g.n_params, dtype=torch.bool)
        self.weights[-b.numel():] = False  # the biases, last, are not penalised
        self.weights = self.weights.to(g.flat.device)

    def _sum(self, x):
        import torch

        out = torch.zeros(self.F * self.m, dtype=x.dtype, device=x.device)
        return out.index_add_(0, self.probe_of, x).view(self.F, self.m)

    def dot(self, u, v):
        return self._sum(u.double() * v.double())

    def weight_sq(self, u):
        """Each probe's squared weight norm (the bias left out)."""
        u = u.double()
        return self._sum(u * u * self.weights)

    def max_abs(self, u):
        import torch

        out = torch.zeros(self.F * self.m, dtype=u.dtype, device=u.device)
        return out.scatter_reduce_(0, self.probe_of, u.abs(), reduce="amax").view(self.F, self.m)

    def spread(self, s):
        """An (F, m) value per probe as a flat vector: each entry its probe's."""
        return s.reshape(-1).index_select(0, self.probe_of)

    def scaled(self, u, s):
        """u with probe (f, i)'s entries times s[f, i]."""
        return u * self.spread(s.to(u.dtype))

    def where(self, mask, u, v):
        """u where mask[f, i], else v, probe by probe."""
        import torch

        return torch.where(self.spread(mask), u, v)


class _TrainRows:
    """A batch's inputs and targets for the train rows, chunk by chunk: gathered on the first
    pass and kept for the next ones while they fit ``room`` bytes (full batch: every value and
    gradient reads the same rows, so their gathers are done once, not per evaluation)."""

    def __init__(self, g: _ProbeBatch, X, y, rows, n_streams: int, room: list, device: str):
        import torch

        self.g, self.X, self.y, self.rows, self.n_streams = g, X, y, rows, n_streams
        width = X.shape[1] if g.dense is not None else g.F * g.width
        need = len(rows) * width * torch.empty((), dtype=X.dtype).element_size()
        self.keep = _batch._room_for(need, room[0], device)
        self.need = need if self.keep else 0
        room[0] -= self.need  # ``room``: [bytes left], shared by every batch's
        self.kept = None

    def __iter__(self):
        if self.kept is not None:
            yield from self.kept
            return
        kept = []
        for s in range(0, len(self.rows), CHUNK_ROWS):
            r = self.rows[s:s + CHUNK_ROWS]
            mb = _Minibatch(self.X.index_select(0, r), self.n_streams)  # every stream: the same rows
            ys = self.y[r].view(1, -1).expand(self.n_streams, -1)
            item = (len(r), self.g.inputs(mb), self.g.targets(ys))
            if self.keep:
                kept.append(item)
            yield item
        if self.keep:
            self.kept = kept


def _value_grad(g: _ProbeBatch, probes: _Probes, flat, data: _TrainRows, C_reg, classes):
    """Every probe's objective (F, m) and its gradient (flat), float64, at ``flat`` (float64).
    The products run in the batch's dtype (float32, on a CPU twice float64's rate), each chunk's
    sums accumulated in float64. ``C_reg``: one C for every probe, or an (F, m) tensor of each
    probe's own."""
    import torch

    from ._sgd import _softmax_gradient

    g.set_flat(flat.to(g.flat.dtype))
    n = len(data.rows)
    loss = torch.zeros((g.F, g.m), device=flat.device, dtype=torch.float64)
    chunk_loss = torch.zeros((g.F, g.m), device=flat.device, dtype=g.flat.dtype)
    grad = torch.zeros_like(flat)
    part = torch.zeros_like(g.flat)
    gW, gb = g.views(part)
    for B, zs, targets in data:
        logits = g.logits(zs).view(g.F, g.m, g.C, B)
        chunk_loss.zero_()
        p = _softmax_gradient(logits, targets, chunk_loss, classes)
        loss += chunk_loss
        g.grads(zs, p.view(g.F, g.m * g.C, B), gW, gb, 1.0 / n)
        grad += part
    inv = 1.0 / (C_reg * n)
    # the L2 term's gradient, on the weights (masked entries are zero; the biases are not penalised)
    w = flat * probes.weights
    grad += w * inv if isinstance(inv, float) else probes.scaled(w, inv)
    value = loss / n + probes.weight_sq(flat) * (inv / 2)
    return value, grad


def _minimise(g: _ProbeBatch, probes: _Probes, flat, data: _TrainRows, C_reg, classes, tol, budget, ftol=FTOL,
              halvings=MAX_HALVINGS, compact: bool = False):
    """L-BFGS from ``flat`` for every probe of g; returns (flat, value (F, m), iterations (F, m),
    converged (F, m), running (F, m)). A probe stops at ``tol``, after ``budget`` iterations (an
    (F, m) tensor of each probe's), once a step lowers its objective by less than ``ftol``
    (relative), or when ``halvings`` halvings of its step find no decrease. With ``compact``, it
    returns early once at most ``COMPACT_BELOW`` of the probes still run (``running``)."""
    import torch

    f, grad = _value_grad(g, probes, flat, data, C_reg, classes)
    S, Y, R = [], [], []
    iters = torch.zeros((g.F, g.m), dtype=torch.long, device=flat.device)
    done = (probes.max_abs(grad) <= tol) | (budget <= 0)
    for _ in range(int(budget.max())):
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
        for _ in range(halvings):
            trial = flat + probes.scaled(direction, t)
            f_t, grad_t = _value_grad(g, probes, trial, data, C_reg, classes)
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
        flat_progress = (f - new_f) <= ftol * torch.maximum(torch.maximum(f.abs(), new_f.abs()), torch.ones_like(f))
        flat, f, grad = new_flat, new_f, new_grad
        done = done | (probes.max_abs(grad) <= tol) | stalled | flat_progress | (iters >= budget)
        if compact and int((~done).sum()) <= COMPACT_BELOW * done.numel() and bool((~done).any()):
            break
    converged = probes.max_abs(grad) <= tol
    g.set_flat(flat.to(g.flat.dtype))
    return flat, f, iters, converged, ~done


def _solve(g: _ProbeBatch, probes: _Probes, flat, data: _TrainRows, C_reg, classes, tol, budget, room: list,
           device: str, **phase):
    """``_minimise`` on every probe of g, the probes still running handed to batches of their own
    whenever they are at most ``COMPACT_BELOW`` of g's (a batch's products cost as much for its
    converged probes as for its running ones; the slowest probe often takes 5x the median's
    iterations). A moved probe restarts its L-BFGS history where it was. Returns (flat, value,
    iterations, converged), each (F, m) but flat."""
    import torch

    flat, f, iters, conv, running = _minimise(g, probes, flat, data, C_reg, classes, tol, budget, compact=True,
                                              **phase)
    if not bool(running.any()):
        return flat, f, iters, conv
    for sub, members in _compacted(g, running):
        fi = torch.as_tensor([a for a, _ in members], device=flat.device)
        pi = torch.as_tensor([b for _, b in members], device=flat.device)

        def pick(t):
            return t[fi, pi].view(sub.F, sub.m)

        sub_flat = torch.zeros(sub.n_params, dtype=flat.dtype, device=flat.device)
        at = [(a, b) for a in range(sub.F) for b in range(sub.m)]
        for (sa, sb), (a, b) in zip(at, members):
            sub.write_probe(sub_flat, sa, sb, *g.read_probe(flat, a, b))
        sub_data = _TrainRows(sub, data.X, data.y, data.rows, 1, room, device)  # one stream: every row, every probe
        sub_flat, sub_f, sub_iters, sub_conv = _solve(
            sub, _Probes(sub), sub_flat, sub_data, C_reg if isinstance(C_reg, float) else pick(C_reg), classes, tol,
            pick(budget - iters), room, device, **phase)
        room[0] += sub_data.need
        for (sa, sb), (a, b) in zip(at, members):
            g.write_probe(flat, a, b, *sub.read_probe(sub_flat, sa, sb))
        f[fi, pi] = sub_f.reshape(-1)
        iters[fi, pi] += sub_iters.reshape(-1)
        conv[fi, pi] = sub_conv.reshape(-1)
    g.set_flat(flat.to(g.flat.dtype))
    return flat, f, iters, conv


def _compacted(g: _ProbeBatch, running) -> list:
    """The probes of g that ``running`` marks, as new batches (families of equal remaining prefix
    lengths together; dense pseudo-families of equal probe counts), each with its members' (family,
    probe) positions in g, in the new batch's row-major order."""
    from dataclasses import replace

    run = running.cpu().numpy()
    groups: dict = {}
    for fi, fam in enumerate(g.families):
        act = [i for i in range(g.m) if run[fi, i]]
        if act:
            key = len(act) if g.dense is not None else tuple(fam.lengths[i] for i in act)
            groups.setdefault(key, []).append((fi, act))
    out = []
    for members in groups.values():
        fams = [replace(g.families[fi], lengths=tuple(g.families[fi].lengths[i] for i in act),
                        draws=[g.families[fi].draws[i] for i in act]) for fi, act in members]
        dense = [[g.dense[fi][i] for i in act] for fi, act in members] if g.dense is not None else None
        sub = _ProbeBatch(fams, fams[0].lengths, g.C, g.device, None, dense=dense, streams=[0] * len(fams))
        if sub.flat.dtype != g.flat.dtype:
            sub.in_dtype(g.flat.dtype)
        sub.source = g.source
        out.append((sub, [(fi, i) for fi, act in members for i in act]))
    return out


def fit_lbfgs(est, data, train_idx, val_idx, device):
    """Every draw of ``est`` by L-BFGS, for each C of ``est.Cs``, the best C per draw on validation."""
    import torch

    from ._sgd import _accuracy

    batches = est._batches(device, None)
    positions = est._draw_positions(batches)
    # the clean pass of each set of features (a joint fit's layers); augmented views are not used. Products in
    # float32, sums and the L-BFGS state in float64 (it converges past float32's resolution of the objective)
    Xs = [torch.as_tensor(np.asarray(passes[0]), device=device, dtype=torch.float32)
          for passes in est._source_passes(data)]
    y_all = torch.as_tensor(data.y, device=device)
    rows = torch.as_tensor(train_idx, device=device)
    val_t = torch.as_tensor(val_idx, device=device)
    n_streams = len(est.streams_)
    classes = torch.arange(est.n_classes_, device=device).view(1, 1, -1, 1)
    full_rows = min(est.batch_size, len(train_idx))
    X64 = {}  # float64 copies of the features, made for the probes float32 products leave short of tol
    from ._sgd import _memory_left

    room = [_memory_left(est, Xs, str(device))]  # for each batch's train inputs, gathered once and kept
    per_batch = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(batches) * (len(est.Cs) + est.refit), desc=f"L-BFGS ({len(est.draws_)} probes)",
               unit="C", disable=not est.verbose)
    for g in batches:
        flat = torch.zeros_like(g.flat, dtype=torch.float64)  # scikit-learn starts from zero
        best = (torch.full((g.F, g.m), -1.0, device=device), flat.clone(), None, None, None, None)
        probes = _Probes(g)
        input_buf, logit_buf = g.input_buffer(full_rows, device), g.logit_buffers(full_rows)
        X = Xs[g.source]
        inputs = {}  # (rows, dtype) -> the batch's _TrainRows

        def train_rows(which, dtype):
            key = (which, dtype)
            if key not in inputs:
                Xd = X if dtype == torch.float32 else X64.setdefault(g.source, X.to(torch.float64))
                r = rows if which == "train" else torch.cat([rows, val_t])
                inputs[key] = _TrainRows(g, Xd, y_all, r, n_streams, room, str(device))
            return inputs[key]

        def minimise(start, which, C_reg):
            """L-BFGS with float32 products; the probes that float32's rounding stalls short of tol go on
            from there with float64 products (the converged ones stay where they are)."""
            budget = torch.full((g.F, g.m), est.max_iter, dtype=torch.long, device=device)
            data = train_rows(which, torch.float32)
            flat, f, iters, conv = _solve(g, probes, start, data, C_reg, classes, est.tol, budget, room, str(device),
                                          ftol=FTOL_FLOAT32, halvings=HALVINGS_FLOAT32)
            if not bool(conv.all()) and bool((iters < budget).any()):
                g.in_dtype(torch.float64)
                data = train_rows(which, torch.float64)
                flat, f, more, conv = _solve(g, probes, flat, data, C_reg, classes, est.tol, budget - iters, room,
                                             str(device))
                iters = iters + more
                g.in_dtype(torch.float32)
                room[0] += inputs.pop((which, torch.float64)).need  # float64 copies are not kept past their use
            return flat, f, iters, conv

        for ci, C_reg in enumerate(sorted(est.Cs)):
            flat, f, iters, conv = minimise(flat, "train", C_reg)
            bar.update(1)
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
            flat, f, iters, conv = minimise(best[1], "train+val", chosen_C)
            bar.update(1)
            best = (best[0], flat, best[2], f, best[4] + iters, conv)
        g.set_flat(best[1].to(torch.float32))
        g.to("cpu")
        per_batch.append(best)
    bar.close()
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
