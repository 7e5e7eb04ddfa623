"""Batched probe engine vs one probe at a time (torch) and vs scikit-learn, in one run.

    python benchmarks/bench_probes.py [--n 20000] [--d 1280] [--seeds 23] [--epochs 3] [--device auto] [--precision fp32]
    python benchmarks/bench_probes.py --paper-scale        # GPU: n=50,000, d=2048, 22 x 5, 50 epochs
    python benchmarks/bench_probes.py --paper-scale --no-baselines --repeats 1   # the engine alone
    python benchmarks/bench_probes.py --paper-scale --solver lbfgs [--cs 1,8]       # L-BFGS vs scikit-learn

Workload: draws over the paper's 22 fractions x seeds (23 seeds = 506 draws + the full
layer, K ~ 512), 10 classes, synthetic features with class structure, the paper's SGD
protocol (batch 256, momentum 0.9, wd 1e-4, lr 0.1) for --epochs epochs (the same for
every method). Prints, measured side by side:

* probes/s of the engine and of two one-probe-at-a-time torch loops, each timed on a sample
  of draws spread over the fractions and scaled to all: the *competent* loop a user with
  cached features writes (the probe's columns gathered once, minibatches indexed straight
  from tensors, nn.Linear + optim.SGD) and the *DataLoader* loop of the original scripts
  (a TensorDataset collating 256 single rows per step); off paper scale also scikit-learn's
  LogisticRegression per draw; and the ratios;
* the engine's useful GFLOP/s, 4 * n_train * C * epochs * sum(k) / time (forward plus
  weight gradient over the selected neurons only), as a fraction of torch's matmul
  GFLOP/s measured now on the same device and dtype;
* what bounds it: the engine's products alone at its own block shapes (the rate BLAS /
  oneDNN reach on them), and the time these FLOPs take at 100% of the matmul rate, hence
  the largest ratio to the loop that any engine could show in this dtype.
"""

from __future__ import annotations

import argparse
import time
import typing

import numpy as np
import torch

from featstore import resolve_device
from probes import PAPER_FRACTIONS, Protocol, SubsetProbes


def synthetic(n, d, C, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(C, 64))
    mix = rng.normal(size=(64, d)) / 8
    y = rng.integers(0, C, n)
    # weak class signal spread over many neurons, so small subsets lose accuracy
    X = np.maximum((0.35 * latent[y] + rng.normal(size=(n, 64))) @ mix + 0.5 * rng.normal(size=(n, d)), 0)
    return X.astype(np.float32), y


def timed(fn, device, repeats, warmup=2):
    """Seconds per call of ``fn`` on ``device`` (after ``warmup`` calls; CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def matmul_gflops(device, n=None, repeats=10, dtype=torch.float32):
    n = n or (8192 if device.startswith("cuda") else 2048)  # large enough to reach the device's rate
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats) / 1e9


def one_probe_competent(X, y, neurons, epochs, device, C, batch_size=256):
    """What a user with cached features writes: the probe's columns gathered once, minibatches
    indexed straight from tensors (no DataLoader), nn.Linear + SGD + StepLR, validation each
    epoch on the held-out tenth."""
    Xs = torch.from_numpy(np.ascontiguousarray(X[:, neurons])).to(device)
    yt = torch.from_numpy(y).to(device)
    n_val = len(X) // 10
    Xtr, ytr, Xval, yval = Xs[n_val:], yt[n_val:], Xs[:n_val], yt[:n_val]
    lin = torch.nn.Linear(len(neurons), C).to(device)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.1)
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(Xtr), generator=g).to(device)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(lin(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            (lin(Xval).argmax(1) == yval).float().mean().item()


def one_probe_torch(X, y, neurons, epochs, device, C):
    """The original scripts' way: a fresh nn.Linear, DataLoader(shuffle) over a TensorDataset
    (collating 256 single rows per step), SGD + StepLR, val each epoch."""
    from torch.utils.data import DataLoader, TensorDataset

    Xs = torch.from_numpy(X[:, neurons]).to(device)
    yt = torch.from_numpy(y).to(device)
    n_val = len(X) // 10
    train = TensorDataset(Xs[n_val:], yt[n_val:])
    loader = DataLoader(train, batch_size=256, shuffle=True)
    lin = torch.nn.Linear(len(neurons), C).to(device)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.1)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(xb), yb).backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            (lin(Xs[:n_val]).argmax(1) == yt[:n_val]).float().mean().item()


def products_alone(est, device, dtype, repeats=20):
    """Seconds the engine's products alone take over the whole fit: every batch's block
    products (logits and weight gradients) at the engine's own shapes and operand layout,
    operands already in place, nothing else (no gathers, softmax, update or copies), times
    the fit's training steps, plus the validation forwards. A floor for the engine at these
    shapes: what its products cost at the rate BLAS / oneDNN reach on them."""
    B = est.batch_size
    ops = []
    for g in est.batches_:
        for a, lo, hi in g.blocks:
            rows, w = (g.m - a) * g.C, hi - lo
            W = torch.randn(g.F, rows, w, device=device, dtype=dtype)
            Z = torch.randn(g.F, B, w, device=device, dtype=dtype)
            dl = torch.randn(g.F, rows, B, device=device, dtype=dtype)
            ops.append((W, Z, dl))

    def forward():
        for W, Z, _ in ops:
            torch.bmm(Z, W.transpose(1, 2)) if dtype == torch.bfloat16 else torch.bmm(W, Z.transpose(1, 2))

    def backward():
        for W, Z, dl in ops:
            torch.bmm(dl, Z)

    t_fwd, t_bwd = timed(forward, device, repeats, warmup=3), timed(backward, device, repeats, warmup=3)
    steps = est.epochs * -(-len(est.train_indices_) // B)
    val_chunks = (est.epochs // est.val_every or 1) * -(-len(est.val_indices_) // B)
    flops = sum(2 * W.numel() * B for W, _, _ in ops)  # per product
    return steps * (t_fwd + t_bwd) + val_chunks * t_fwd, flops / t_fwd / 1e9, flops / t_bwd / 1e9


def profile_fit(est, Xtr, ytr, device):
    """A 2-epoch fit under torch.profiler: how much of the wall time the device computes,
    the kernels per step, and the operators that cost most (host and device)."""
    from sklearn.base import clone
    from torch.profiler import ProfilerActivity, profile

    short = clone(est).set_params(epochs=2, val_every=1)
    short.fit(Xtr[:4096], ytr[:4096])  # warm-up (allocator, kernels, caches)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        short.fit(Xtr, ytr)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    steps = 2 * -(-len(short.train_indices_) // short.batch_size)
    events = prof.key_averages()
    if device.startswith("cuda"):
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6
        print(f"profile (2 epochs, {steps} steps): wall {wall:.2f} s, device kernels {busy:.2f} s "
              f"({busy / wall:.0%} busy), {len(kernels) / steps:.1f} kernels per step, "
              f"{wall / steps * 1e6:.0f} us per step")
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    else:
        print(f"profile (2 epochs, {steps} steps): wall {wall:.2f} s, {wall / steps * 1e6:.0f} us per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seeds", type=int, default=23)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                   help="engine matmul precision (tf32: fp32 with TF32 tensor-core matmuls allowed, CUDA); the "
                        "matmul rate is measured in the same precision")
    p.add_argument("--orders", default="per-seed,shared",
                   help="minibatch orders to time (comma-separated; the first listed is reported)")
    p.add_argument("--min-blocks", default=None,
                   help="comma-separated narrowest column blocks to compare (the engine's MIN_BLOCK_WIDTH[_CUDA|_BF16]); "
                        "each is fitted and timed, the first is reported")
    p.add_argument("--eager", action="store_true", help="CUDA: every kernel launched from Python (cuda_graphs=False)")
    p.add_argument("--profile", action="store_true",
                   help="also profile a 2-epoch fit: kernel time vs wall time, and the costliest operators")
    p.add_argument("--no-baselines", action="store_true", help="time the engine and the matmul rate only")
    p.add_argument("--repeats", type=int, default=2, help="engine fits; the fastest counts")
    p.add_argument("--baseline-draws", type=int, default=12, help="draws the competent loop is timed on")
    p.add_argument("--dataloader-draws", type=int, default=4, help="draws the DataLoader loop is timed on")
    p.add_argument("--sklearn-draws", type=int, default=4,
                   help="draws scikit-learn fits one at a time (its time scaled to every draw; 0: none)")
    p.add_argument("--solver", default="sgd", choices=("sgd", "lbfgs"),
                   help="lbfgs: the lbfgs solver with one C and with a grid, against scikit-learn per draw")
    p.add_argument("--cs", default="1,8", help="lbfgs: grid sizes to time (1: C = 1; 8: 1e-3 ... 1e4)")
    p.add_argument("--paper-scale", action="store_true", help="n=50,000, d=2048, 22 fractions x 5 seeds, 50 epochs")
    a = p.parse_args()
    if a.paper_scale:
        a.n, a.d, a.seeds, a.epochs = 50_000, 2048, 5, 50
    device = resolve_device(a.device)
    engine_precision = "fp32" if a.precision == "tf32" else a.precision
    if device.startswith("cuda"):  # fp32 means fp32: TF32 only when asked for
        torch.backends.cuda.matmul.allow_tf32 = a.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = a.precision == "tf32"
    X, y = synthetic(a.n + 5000, a.d, a.classes)
    Xtr, ytr, Xte, yte = X[:a.n], y[:a.n], X[a.n:], y[a.n:]
    if a.solver == "lbfgs":
        return bench_lbfgs(a, Xtr, ytr, Xte, yte, device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"device={device} ({name}) n={a.n} d={a.d} C={a.classes} fractions=22 seeds={a.seeds} epochs={a.epochs} "
          f"precision={a.precision}{' eager' if a.eager else ''}")

    def fit_time(order):
        est = SubsetProbes(fractions=PAPER_FRACTIONS, seeds=tuple(range(a.seeds)), epochs=a.epochs, device=device,
                           precision=engine_precision, minibatch_order=order, cuda_graphs=not a.eager)
        times = []
        for _ in range(a.repeats):  # best of: the same fair treatment as the matmul rate
            t0 = time.perf_counter()
            est.fit(Xtr, ytr)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return est, times

    # each seed's own minibatch order (the default, as the released code) and one shared order, side by side
    known = typing.get_args(Protocol.model_fields["minibatch_order"].annotation)
    orders = [o for o in a.orders.split(",") if o]
    if not orders or any(o not in known for o in orders):
        p.error(f"--orders: expected a comma-separated list of {', '.join(known)}; got {a.orders!r}")
    if a.min_blocks:
        import probes._batch as engine

        attr = "MIN_BLOCK_WIDTH_CUDA" if device.startswith("cuda") else \
            "MIN_BLOCK_WIDTH_BF16" if engine_precision == "bf16" else "MIN_BLOCK_WIDTH"
        for width in [int(v) for v in a.min_blocks.split(",")][::-1]:  # the first listed is fitted last, and kept
            setattr(engine, attr, width)
            est_w, times_w = fit_time(orders[0])
            n_blocks = sum(len(g.blocks) for g in est_w.batches_)
            print(f"{attr}={width}: {min(times_w):.2f} s ({n_blocks} column blocks; fits: "
                  f"{', '.join(f'{t:.2f}' for t in times_w)})")
    fits = {order: fit_time(order) for order in orders}
    for order, (_, times) in fits.items():
        print(f"minibatch_order={order!r}: {min(times):.2f} s (fits: {', '.join(f'{t:.2f}' for t in times)})")
    if len(orders) > 1:
        print(f"{orders[0]} / {orders[1]}: {min(fits[orders[0]][1]) / min(fits[orders[1]][1]):.2f}x the time")
    est, times = fits[orders[0]]
    t_engine = min(times)
    res = est.evaluate(Xte, yte)
    K = len(est.draws_)
    n_train = len(est.train_indices_)
    sum_k = sum(dr.k for dr in est.draws_)
    useful = 4 * n_train * a.classes * a.epochs * sum_k / 1e9
    print(f"engine: {K} probes in {t_engine:.2f} s = {K / t_engine:.1f} probes/s; full-layer test acc "
          f"{res['test_accuracy'].iloc[-1]:.3f}, 10% fraction mean {res[res.fraction == 0.1].test_accuracy.mean():.3f} "
          f"(fits: {', '.join(f'{t:.2f}' for t in times)} s)")
    print(f"inputs laid out by column block: {est.laid_out_ / 2**20:.0f} MiB "
          f"({'none: each minibatch gathers its columns' if not est.laid_out_ else 'each minibatch gathers rows'})")
    if a.paper_scale:
        goal = "<= 2 s on one H100" if device.startswith("cuda") else "<= 10 s on 2 CPU cores"
        print(f"paper scale: {t_engine:.2f} s (goal {goal})")
    if a.profile:
        profile_fit(est, Xtr, ytr, device)

    mm_dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    peak = max(matmul_gflops(device, dtype=mm_dtype) for _ in range(3))  # best of 3: a fair (high) denominator
    t_alone, r_fwd, r_bwd = products_alone(est, device, mm_dtype)
    print(f"the engine's products alone (its block shapes, operands in place, nothing else): {t_alone:.2f} s = "
          f"{t_alone / t_engine:.0%} of its time; forward {r_fwd:.0f}, gradient {r_bwd:.0f} GFLOP/s = "
          f"{r_fwd / peak:.0%} / {r_bwd / peak:.0%} of the square matmul's rate")
    ceiling = useful / peak  # seconds at 100% of the matmul rate: no engine can beat it in this dtype
    print(f"at 100% of the matmul rate these FLOPs take {ceiling:.2f} s")
    if a.no_baselines:
        print(f"useful GFLOP/s: {useful / t_engine:.1f} of matmul {peak:.1f} GFLOP/s = "
              f"{useful / t_engine / peak:.1%}  (goal >= 50%)")
        return

    # one probe at a time: a sample of draws spread over the fractions, scaled to K. The competent
    # loop is timed on a sample of one seed's draws (and the full layer); the DataLoader loop on fewer.
    def loop_time(fn, n_draws):
        sample = np.linspace(0, K - 1, min(n_draws, K)).astype(int)
        t0 = time.perf_counter()
        for di in sample:
            fn(Xtr, ytr, est.draws_[di].neurons, a.epochs, device, a.classes)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / len(sample) * K, len(sample)

    t_comp, n_comp = loop_time(one_probe_competent, a.baseline_draws)
    t_loop, n_loop = loop_time(one_probe_torch, a.dataloader_draws)
    print(f"competent one-probe loop (columns gathered once, tensors indexed, no DataLoader): {K / t_comp:8.2f} "
          f"probes/s (scaled from {n_comp} draws)")
    print(f"DataLoader one-probe loop (the original scripts' way)                         : {K / t_loop:8.2f} "
          f"probes/s (scaled from {n_loop} draws)")
    with_sklearn = not a.paper_scale and a.sklearn_draws > 0
    if with_sklearn:
        from sklearn.linear_model import LogisticRegression

        sk_sample = np.linspace(0, K - 1, a.sklearn_draws).astype(int)
        t0 = time.perf_counter()
        for di in sk_sample:
            LogisticRegression(max_iter=100).fit(Xtr[:, est.draws_[di].neurons], ytr)
        t_sk = (time.perf_counter() - t0) / len(sk_sample) * K
        print(f"scikit-learn per draw   : {K / t_sk:8.2f} probes/s (scaled from {len(sk_sample)} draws)")
    print(f"ratio engine / competent loop : {t_comp / t_engine:8.1f}x  (goal >= 100x at paper scale; an engine at "
          f"100% of the matmul rate would be {t_comp / ceiling:.0f}x)")
    print(f"ratio engine / DataLoader loop: {t_loop / t_engine:8.1f}x  (the original scripts' way)")
    if with_sklearn:
        print(f"ratio engine / scikit-learn   : {t_sk / t_engine:8.1f}x")
    print(f"useful GFLOP/s: {useful / t_engine:.1f} of matmul {peak:.1f} GFLOP/s = "
          f"{useful / t_engine / peak:.1%}  (goal >= 50%)")


def bench_lbfgs(a, Xtr, ytr, Xte, yte, device):
    """The lbfgs solver on every draw at once, for each grid size, against scikit-learn's
    LogisticRegression(C, lbfgs) fitted one draw at a time (a sample of draws, scaled)."""
    from sklearn.linear_model import LogisticRegression

    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"lbfgs: device={device} ({name}) n={a.n} d={a.d} C={a.classes} fractions=22 seeds={a.seeds} + the full "
          f"layer per seed")
    grids = {1: (1.0,), 8: tuple(10.0 ** p for p in range(-3, 5))}
    times = {}
    for size in (int(v) for v in a.cs.split(",")):
        est = SubsetProbes(solver="lbfgs", Cs=grids[size], fractions=PAPER_FRACTIONS, seeds=tuple(range(a.seeds)),
                           device=device, verbose=False)
        t0 = time.perf_counter()
        est.fit(Xtr, ytr)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times[size] = time.perf_counter() - t0
        rec = est.solver_records_
        res = est.evaluate(Xte, yte)
        print(f"engine, {size} C{'s' if size > 1 else ''}: {len(est.draws_)} probes in {times[size]:.2f} s; "
              f"iterations median {int(np.median(rec['n_iter']))}, max {int(rec['n_iter'].max())}; "
              f"{rec['converged'].mean():.0%} converged; full-layer test acc {res['test_accuracy'].iloc[-1]:.3f}")
        if a.sklearn_draws < 1:
            continue
        sample = np.linspace(0, len(est.draws_) - 1, a.sklearn_draws).astype(int)
        t0 = time.perf_counter()
        tr = est.train_indices_
        for di in sample:
            for c in grids[size]:
                LogisticRegression(C=c, max_iter=est.max_iter, tol=est.tol).fit(
                    Xtr[tr][:, est.draws_[di].neurons], ytr[tr])
        t_sk = (time.perf_counter() - t0) / len(sample) * len(est.draws_)
        goal = "<= 1 s on a GPU" if device.startswith("cuda") else "<= 10 s on 2 CPU cores"
        print(f"scikit-learn one draw at a time, {size} C{'s' if size > 1 else ''}: {t_sk:.1f} s (scaled from "
              f"{len(sample)} draws); engine / scikit-learn: {t_sk / times[size]:.1f}x (goal >= 100x; one C {goal})")


if __name__ == "__main__":
    main()
