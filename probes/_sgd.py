"""The SGD solver: every probe of a fit trained together by minibatch SGD with momentum and
weight decay (``torch.optim.SGD``'s update) on its own mean cross-entropy, its best
validation epoch kept; CUDA graphs replay each full step on a GPU."""

from __future__ import annotations

import numpy as np

from . import _batch
from ._batch import _Minibatch, _ProbeBatch, _to_device
from ._data import TrainingData
from ._inputs import RowFile

__all__ = ["fit_sgd", "sgd_grid"]


def sgd_grid(est) -> list[tuple[float, float]]:
    """The (lr, weight_decay) pairs every draw trains under: ``lrs`` x ``weight_decays`` where
    given (each in its order, the learning rates outer), else the one ``lr`` / ``weight_decay``."""
    return [(lr, wd) for lr in (est.lrs or (est.lr,)) for wd in (est.weight_decays or (est.weight_decay,))]


def fit_sgd(est, data: TrainingData, train_idx, val_idx, device):
    """Train every draw by SGD; with an lr x weight-decay grid, every draw under every pair in the
    same pass (each pair's copy of the batches reads the same minibatch inputs), each draw keeping
    the pair its validation scores best (the first such pair on a tie)."""
    import torch

    dtype = torch.bfloat16 if est.precision == "bf16" else None
    grid = sgd_grid(est)
    base = est._batches(device, dtype)
    positions = est._draw_positions(base)
    batches, nb = [], len(base)
    for gi, (lr, wd) in enumerate(grid):
        copies = base if gi == 0 else est._batches(device, dtype)  # the same layout: one copy per pair
        for bi, g in enumerate(copies):
            g.lr, g.weight_decay, g.shares = lr, wd, None if gi == 0 else bi
        for di, (bi, fi, pi) in enumerate(positions):  # per-draw seeded init, the same under every pair
            copies[bi].set_probe(fi, pi, *est.initial_weights(di))
        batches += copies
    ctx = {"sources": [[_to_device(p, device) for p in passes] for passes in est._source_passes(data)],
           "y": torch.as_tensor(data.y, device=device),
           "val": torch.as_tensor(val_idx, device=device), "device": device,
           # each epoch's orders made when it starts (all of them at once would be epochs x n rows)
           "orders": lambda e: [torch.as_tensor(est.epoch_order(e, seed), device=device) for seed in est.streams_],
           "positions": positions, "grid": grid}
    from tqdm.auto import tqdm

    n_probes = len(est.draws_) * len(grid)
    bar = tqdm(total=est.epochs, desc=f"probes ({n_probes})", unit="epoch", disable=not est.verbose)
    best_acc, best_epoch, last_loss = _train_batches(est, batches, ctx, bar)
    bar.close()
    # each draw's pair: the best validation accuracy among the pairs it did not diverge under (its
    # parameters NaN from then on, so its last epoch's loss is not finite; a fit where one diverged
    # under every pair has stopped)
    choice = np.array([np.argmax([float(best_acc[gi * nb + bi][fi, pi])
                                  if np.isfinite(float(last_loss[gi * nb + bi][fi, pi])) else -np.inf
                                  for gi in range(len(grid))]) for bi, fi, pi in positions])
    for di, (bi, fi, pi) in enumerate(positions):
        if choice[di]:
            base[bi].set_probe(fi, pi, *batches[choice[di] * nb + bi].probe_weights(fi, pi))
    for g in base:  # the best epoch's weights are in place; keep them on the CPU (picklable)
        g.to("cpu")
    at = [(choice[di] * nb + bi, fi, pi) for di, (bi, fi, pi) in enumerate(positions)]
    est.batches_ = base
    est.val_accuracy_ = np.array([float(best_acc[bi][fi, pi]) for bi, fi, pi in at])
    est.best_epoch_ = np.array([int(best_epoch[bi][fi, pi]) for bi, fi, pi in at])
    est.train_loss_ = np.array([float(last_loss[bi][fi, pi]) for bi, fi, pi in at])
    est.positions_ = positions
    est.solver_records_ = {}
    if est.lrs:
        est.solver_records_["lr"] = np.array([grid[gi][0] for gi in choice])
    if est.weight_decays:
        est.solver_records_["weight_decay"] = np.array([grid[gi][1] for gi in choice])


def _train_batches(est, batches: list["_ProbeBatch"], ctx: dict, bar):
    """The SGD epochs; leaves each batch's best epoch's weights in place and returns
    per batch (best validation accuracy, best epoch, last epoch's train loss)."""
    import torch

    device, y_all, val_t = ctx["device"], ctx["y"], ctx["val"]
    sources = ctx["sources"]  # per set of features (one, or a joint fit's layers): its passes
    on_device = sources[0]
    C = est.n_classes_
    grad = [torch.zeros_like(g.flat) for g in batches]  # flat, laid out like the parameters
    grad_views = [g.views(f) for g, f in zip(batches, grad)]
    buf = [torch.zeros_like(g.flat) for g in batches]
    best = [g.flat.clone() for g in batches]
    best_acc = [torch.full((g.F, g.m), -1.0, device=device) for g in batches]
    best_epoch = [torch.zeros((g.F, g.m), dtype=torch.long, device=device) for g in batches]
    last_loss = [torch.zeros((g.F, g.m), device=device) for g in batches]
    # buffers for full minibatches: none is larger than the train rows (a batch_size beyond them never fills)
    full_rows = min(est.batch_size, len(est.train_rows(est.streams_[0])))  # every stream has as many rows
    logit_bufs = [g.logit_buffers(full_rows) for g in batches]
    # a grid pair's copy of a batch (``shares``: the batch whose inputs it reads) needs no inputs of its own
    input_bufs = []
    for g in batches:  # the copies come after the batches they share
        input_bufs.append(g.input_buffer(full_rows, device) if g.shares is None else input_bufs[g.shares])
    est.laid_out_ = _lay_out(est, [g for g in batches if g.shares is None], sources, str(device))
    for g in batches:
        if g.shares is not None:
            g.laid = batches[g.shares].laid
    # what minibatches are read from: the passes, or their resident bf16 copies (bf16 operands)
    read_passes = _read_passes(est, batches, sources, str(device))
    # the features each step reads a minibatch of: those of dense batches, or of passes not laid out
    readers = sorted({g.source for g in batches if g.laid is None})
    # the full minibatches are gathered into one buffer each, reused every step, where the passes are on the device
    read_buf = {}
    for src in readers:
        first = read_passes[src][0]
        if isinstance(first, torch.Tensor) and first.device.type == torch.device(device).type:
            read_buf[src] = torch.empty((len(est.streams_) * full_rows, first.shape[1]), device=first.device,
                                        dtype=first.dtype)
    classes = torch.arange(C, device=device).view(1, 1, C, 1)
    on_cuda = str(device).startswith("cuda")
    minus_one = torch.tensor(-1.0, device=device)
    train_passes = list(range(len(on_device))) if est.train_passes == "all" else \
        (list(range(1, len(on_device))) or [0])
    loss_sum = [torch.zeros((g.F, g.m), device=device) for g in batches]  # in place: graphs write them

    def step(rows, decay):
        """One SGD step of every batch on the minibatch ``rows[stream]`` of pass ``pass_index``, each
        batch at its learning rate times ``decay`` (the schedule's factor)."""
        B = rows[0].shape[0]
        full = B == full_rows
        mbs = {src: _Minibatch.gather(read_passes[src][pass_index], rows, device,
                                      out=read_buf.get(src) if full else None) for src in readers}
        ys = _Minibatch.labels(y_all, rows)
        inputs = {}
        for bi, g in enumerate(batches):
            if g.shares is not None:  # another grid pair of the same batch: the same inputs
                zs = inputs[g.shares]
            else:
                zs = inputs[bi] = g.inputs(mbs.get(g.source), out=input_bufs[bi] if full else None, rows=rows,
                                           pass_index=pass_index)
            logits = g.logits(zs, out=logit_bufs[bi] if full else None).view(g.F, g.m, C, B)
            p = _softmax_gradient(logits, g.targets(ys), loss_sum[bi], classes, minus_one if on_cuda else None)
            gW, gb = grad_views[bi]
            g.grads(zs, p.view(g.F, g.m * C, B), gW, gb, 1.0 / B)  # of the mean loss
            _sgd_step(g.flat, grad[bi], buf[bi], g.lr * decay, est.momentum, g.weight_decay)

    # CUDA graphs: a full step reads its rows from one static buffer; one graph per (lr, pass)
    use_graphs = est.cuda_graphs and str(device).startswith("cuda") and \
        all(p.is_cuda for passes in sources for p in passes)
    graphs: dict = {}
    pool = None
    eager_full_steps = 0  # warm-up before the first capture (cuBLAS handles, workspaces, allocator)
    rows_buf = torch.empty((len(est.streams_), full_rows), dtype=torch.long, device=device) \
        if use_graphs else None
    for epoch in range(est.epochs):
        decay = est.lr_gamma ** (epoch // est.lr_step)
        pass_index = train_passes[epoch % len(train_passes)]
        orders = ctx["orders"](epoch)  # one per minibatch stream
        n_rows = len(orders[0])
        for ls in loss_sum:
            ls.zero_()
        orders_t = torch.stack(orders) if use_graphs else None  # (streams, n_rows)
        for start in range(0, n_rows, est.batch_size):
            B = min(est.batch_size, n_rows - start)
            if not use_graphs or B < full_rows:
                step([order[start:start + B] for order in orders], decay)
                continue
            rows_buf.copy_(orders_t[:, start:start + B])
            key = (decay, pass_index)
            if key in graphs:
                graphs[key].replay()
            elif eager_full_steps < 2:  # real steps, on a side stream as torch's graph docs ask of warm-ups
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    step(list(rows_buf), decay)
                torch.cuda.current_stream(device).wait_stream(side)
                eager_full_steps += 1
            else:  # capture records without running: replay to take this step
                graph = torch.cuda.CUDAGraph()
                # thread_local: a sweep's other tasks may use the GPU from other threads meanwhile
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    step(list(rows_buf), decay)
                pool = graph.pool()
                graphs[key] = graph
                graph.replay()
        for bi in range(len(batches)):
            last_loss[bi] = loss_sum[bi] / n_rows
        _check_loss(est, last_loss, ctx["positions"], epoch, ctx["grid"])
        # validate every val_every epochs (the last epoch too when no validation came before)
        if (epoch + 1) % est.val_every and not (epoch + 1 == est.epochs and est.epochs < est.val_every):
            bar.update(1)
            continue  # no validation this epoch: it cannot be a probe's best
        # validation picks each probe's best epoch: on the clean pass, or on the pass this epoch trained on
        # (val_transform="augmented"; a separate validation group's rows hold their clean features there)
        val_pass = pass_index if est.val_transform == "augmented" else 0
        for bi, g in enumerate(batches):
            acc = _accuracy(est, g, read_passes[g.source][val_pass], y_all, val_t, device, input_bufs[bi],
                                 logit_bufs[bi], pass_index=val_pass)
            better = acc > best_acc[bi] if est.select_epoch == "best" else torch.ones_like(acc, dtype=torch.bool)
            best_acc[bi] = torch.where(better, acc, best_acc[bi])  # with "last": the last epoch's
            best_epoch[bi] = torch.where(better, torch.full_like(best_epoch[bi], epoch + 1), best_epoch[bi])
            bw, bb = g.views(best[bi])
            for (a, _, _), w, keep in zip(g.blocks, g.W, bw):
                mask = better[:, a:].repeat_interleave(C, dim=1).unsqueeze(2)
                keep.copy_(torch.where(mask, w, keep))
            bb.copy_(torch.where(better.repeat_interleave(C, dim=1), g.b, bb))
        bar.update(1)
    est.cuda_graphs_ = len(graphs)  # graphs captured (0: every step ran eagerly)
    for bi, g in enumerate(batches):
        g.set_flat(best[bi])
        g.lay_out([])  # not kept with the fitted estimator
    return best_acc, best_epoch, last_loss

def _check_loss(est, losses, positions, epoch: int, grid) -> None:
    """Stop when SGD diverged, so that a diverged probe's accuracy (chance) never passes for a
    measurement (a DR "maximally redundant" from lr = inf): any probe's epoch loss NaN or inf;
    with an lr x weight-decay grid, a draw's loss under every pair (a pair that diverged is never
    a draw's choice while another trains). (A finite loss above a uniform guess's is an
    unconverged probe: its rows keep train_loss, and the report warns.)"""
    import torch

    if all(bool(torch.isfinite(loss).all()) for loss in losses):
        return
    nb = len(losses) // len(grid)
    bad = [di for di, (bi, fi, pi) in enumerate(positions)
           if not any(bool(torch.isfinite(losses[gi * nb + bi][fi, pi])) for gi in range(len(grid)))]
    if not bad:
        return
    lrs, wds = zip(*grid)
    from featstore.errors import ProbeDivergedError

    examples = ", ".join(f"{est.draws_[di].mode} k={est.draws_[di].k}"
                         + (f" seed {est.draws_[di].seed}" if est.draws_[di].seed is not None else "")
                         for di in bad[:4])
    raise ProbeDivergedError(count=len(bad), total=len(positions), epoch=epoch + 1, examples=examples,
                             lr=min(lrs), weight_decay=min(wds), momentum=est.momentum,
                             batch_size=est.batch_size)

def _lay_out(est, batches: list["_ProbeBatch"], sources, device: str) -> int:
    """Lay each batch's passes (those of its features: ``sources[g.source]``) out by column
    block (``_ProbeBatch.lay_out``) where it pays (``LAYOUT_MIN_EPOCHS``) and while they fit:
    on the CPU, within max_memory_mb less the passes themselves; on a GPU, a quarter of its free
    memory. Passes on disk (RowFile) are not laid out. Returns the bytes laid out."""
    every = [p for passes in sources for p in passes]
    if any(isinstance(p, RowFile) for p in every):
        return 0
    budget = _memory_left(est, every, device)
    used = 0
    for g in batches:
        pays = _batch._layout_pays(g, device, est.epochs)
        need = g.laid_out_bytes(sources[g.source])
        if pays and need and _batch._room_for(need, budget - used, device):
            g.lay_out(sources[g.source])
            used += need
    return used

def _read_passes(est, batches: list["_ProbeBatch"], sources, device: str) -> list:
    """Per set of features, the passes minibatches are read from. With bf16 operands, resident
    bf16 copies when every batch that reads minibatches of them takes them as they are (index
    and dense batches: the same rounding as converting each minibatch; a projection projects
    float32 rows) and they fit what ``_lay_out`` left of the budget: half the reads, and no
    conversion per step."""
    import torch

    every = [p for passes in sources for p in passes]
    if any(isinstance(p, RowFile) for p in every):  # on disk: read by rows as they are
        return sources
    room = _memory_left(est, every, device) - est.laid_out_
    out = []
    for src, passes in enumerate(sources):
        readers = [g for g in batches if g.laid is None and g.source == src]
        if not readers or any(g.compute_dtype is None or g.is_projection for g in readers) or \
                any(not isinstance(p, torch.Tensor) or p.device.type != torch.device(device).type for p in passes):
            out.append(passes)
            continue
        dtype = readers[0].compute_dtype
        need = sum(p.numel() for p in passes) * torch.empty((), dtype=dtype).element_size()
        if not _batch._room_for(need, room, device):
            out.append(passes)
            continue
        out.append([p.to(dtype=dtype) for p in passes])
        room -= need
    return out

def _memory_left(est, passes, device: str) -> int:
    """Bytes of max_memory_mb the passes (on the CPU) leave for working copies of them; on a
    GPU the room is checked against its free memory instead (``_room_for``)."""
    if device != "cpu":
        return 1 << 62
    return (est.max_memory_mb << 20) - sum(p.numel() * p.element_size() for p in passes if p.device.type == "cpu")

def _accuracy(est, g: _ProbeBatch, X, y_all, rows, device, input_buf, logit_buf, pass_index: int = 0):
    """(F, m) accuracy of every probe of g on X[rows] (pass ``pass_index``: the clean pass
    unless validation is augmented), in minibatches that reuse the training buffers."""
    import torch

    correct = torch.zeros((g.F, g.m), device=device)
    # on a GPU, few large chunks (launches cost more than the arithmetic); on the CPU, the training buffers
    buffer_rows = min(est.batch_size, len(est.train_rows(est.streams_[0])))  # the training buffers' rows
    step = max(buffer_rows, g.chunk_rows()) if str(device).startswith("cuda") else buffer_rows
    for start in range(0, len(rows), step):
        r = rows[start:start + step]
        full = len(r) == buffer_rows
        mb = None if g.laid is not None else \
            _Minibatch(X.index_select(0, r.to(X.device)).to(device), len(est.streams_))  # every stream: r
        zs = g.inputs(mb, out=input_buf if full else None, rows=[r] * len(est.streams_), pass_index=pass_index)
        logits = g.logits(zs, out=logit_buf if full else None).view(g.F, g.m, g.C, len(r))
        # the true class holds the maximum (argmax over a strided axis is slow on CPU)
        true = logits.gather(2, y_all[r].view(1, 1, 1, -1).expand(g.F, g.m, 1, len(r)))
        correct += (true >= logits.amax(dim=2, keepdim=True)).squeeze(2).sum(2)
    return correct / len(rows)


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
