"""Layers wider than the sample count: CKA of the paper's grid on a flattened-map-sized layer,
in bounded memory.

    python benchmarks/bench_wide.py [--n 5000] [--d 100000] [--seeds 2] [--memory-mb 256] [--epochs 5]

Writes a synthetic n x d float16 layer (10 classes; class structure in a low-rank part plus
noise; the size of an early flattened block) to a Zarr array on disk in chunks that split
its columns, as featstore stores wide layers. Then, for 22 fractions x seeds nested random
subsets, in one process:

* CKA of every subset against the whole layer (``probes.subset_cka``: sample space, n x n
  kernels streamed over column blocks, ``memory_mb`` of columns at a time);
* probes on every subset (``SubsetProbes(max_memory_mb=...)``: the features stay on disk,
  each minibatch reads its rows), ``--epochs`` epochs, tested on a held-out 10%.

Prints each stage's time and the process's peak memory (goal: under 2 GB, whatever d).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np

import probes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--d", type=int, default=100_000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    a = p.parse_args()
    import zarr

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n_test = a.n // 10
        arr = zarr.create_array(f"{tmp}/wide.zarr", shape=(a.n, a.d), chunks=(64, 8192), dtype="float16")
        test = zarr.create_array(f"{tmp}/test.zarr", shape=(n_test, a.d), chunks=(64, 8192), dtype="float16")
        W = rng.normal(size=(32, a.d)).astype(np.float32) / 4
        centres = rng.normal(size=(10, 32)).astype(np.float32)
        y_all = rng.integers(0, 10, a.n + n_test)
        for target, offset, rows in ((arr, 0, a.n), (test, a.n, n_test)):
            for s in range(0, rows, 64):
                m = min(64, rows - s)
                z = centres[y_all[offset + s:offset + s + m]] + rng.normal(size=(m, 32)).astype(np.float32)
                target[s:s + m] = np.maximum(z @ W + rng.normal(size=(m, a.d)).astype(np.float32), 0)
        y, y_test = y_all[:a.n], y_all[a.n:]
        print(f"n={a.n} d={a.d} float16 on disk (chunks 64 x 8192): written in {time.perf_counter() - t0:.1f} s; "
              f"as float32 in memory it would be {a.n * a.d * 4 / 2**30:.1f} GiB, its d x d Gram "
              f"{a.d * a.d * 8 / 2**30:.0f} GiB")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        orders = [rng.permutation(a.d) for _ in range(a.seeds)]
        subsets = [o[:max(1, int(f * a.d))] for o in orders for f in probes.PAPER_FRACTIONS]
        t0 = time.perf_counter()
        r = probes.subset_cka(arr, subsets, memory_mb=a.memory_mb)
        t = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{len(subsets)} subsets ({len(probes.PAPER_FRACTIONS)} fractions x {a.seeds} seeds), space={r.space}: "
              f"{t:.1f} s; peak memory {peak:.0f} MB (before the call {before:.0f} MB; goal < 2048 MB)")
        print("CKA at fractions 0.01, 0.1, 0.5, 0.9 (seed 0):",
              ", ".join(f"{r.values[probes.PAPER_FRACTIONS.index(f)]:.4f}" for f in (0.01, 0.1, 0.5, 0.9)))
        t0 = time.perf_counter()
        est = probes.SubsetProbes(fractions=probes.PAPER_FRACTIONS, seeds=tuple(range(a.seeds)), epochs=a.epochs,
                                  max_memory_mb=a.memory_mb, device="cpu")
        est.fit(arr, y)
        res = est.evaluate(test, y_test)
        t = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        acc = res.groupby("fraction")["test_accuracy"].mean()
        print(f"{len(est.draws_)} probes, {a.epochs} epochs, features read from disk by minibatch: {t:.1f} s; "
              f"peak memory {peak:.0f} MB (goal < 2048 MB)")
        print("test accuracy at fractions 0.01, 0.1, 0.5, 1.0:",
              ", ".join(f"{acc.loc[f]:.3f}" for f in (0.01, 0.1, 0.5, 1.0)))


if __name__ == "__main__":
    main()
