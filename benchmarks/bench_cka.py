"""Streaming CKA: one Gram pass + thousands of subsets vs a per-subset minibatch baseline.

    python benchmarks/bench_cka.py [--n 50000] [--d 2048] [--subsets 10000]

Synthetic features with low-rank structure (n x d, float32, as a feature store holds
them). Times, in one run: the streaming Gram pass (float64), the biased CKA of
``--subsets`` random subsets at the paper's fractions from that Gram, and a baseline
that computes minibatch CKA (Nguyen et al.: unbiased HSIC per 256-row minibatch, the
authors' library) from the features for a few subsets, scaled to all of them.
Goals: subsets cost <= the Gram pass; >= 1000x the per-subset baseline.

Then one sweep task's projection draws (``--projection-seeds`` random bases cut at the
paper's 22 fractions, as ``randproj`` / ``pca`` tasks pass them): prefixes that are views
of one basis share its products (biased) or its one extra pass over X (unbiased); the
same draws as separate copies pay for each. Statistics are taken once; values agree.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from probes import PAPER_FRACTIONS
from probes._cka import (  # the benchmark times the engine's own stages
    CKAStatistics,
    GramAccumulator,
    _biased,
    _minibatches,
    _subset_matrix,
    _unbiased_pair_terms,
    cka_statistics,
    iter_row_blocks,
    subset_cka,
)

FRACTIONS = PAPER_FRACTIONS


def per_subset_minibatch_cka(X, idx, batch_size=256):
    kl = kk = ll = 0.0
    nb = 0
    for b in _minibatches(iter_row_blocks(X, 8192), batch_size):
        t = _unbiased_pair_terms(b[:, idx], b)
        kl, kk, ll = kl + t[0], kk + t[1], ll + t[2]
        nb += 1
    return kl / np.sqrt(kk * ll)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--subsets", type=int, default=10_000)
    p.add_argument("--baseline-subsets", type=int, default=3)
    p.add_argument("--projection-seeds", type=int, default=1)
    p.add_argument("--projection-estimators", default="biased,unbiased")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    X = np.empty((a.n, a.d), dtype=np.float32)
    W = rng.normal(size=(64, a.d)).astype(np.float32)
    for s in range(0, a.n, 8192):  # build in blocks to keep memory flat
        z = rng.normal(size=(min(8192, a.n - s), 64)).astype(np.float32)
        X[s : s + len(z)] = np.maximum(z @ W + rng.normal(size=(len(z), a.d)).astype(np.float32), 0)
    fr = np.array(FRACTIONS)[rng.integers(0, len(FRACTIONS), a.subsets)]
    subsets = [rng.permutation(a.d)[: max(1, int(f * a.d))] for f in fr]
    print(f"n={a.n} d={a.d} subsets={a.subsets} (mixed paper fractions, mean k={np.mean([len(s) for s in subsets]):.0f})")

    t0 = time.perf_counter()
    stats = GramAccumulator()
    for block in iter_row_blocks(X, 8192):
        stats.add(block)
    t_gram = time.perf_counter() - t0

    t0 = time.perf_counter()
    M, projections, kinds = _subset_matrix(subsets, a.d)
    result = _biased(stats, M, projections, kinds, "zero")
    t_subsets = time.perf_counter() - t0
    assert np.isfinite(result.values).all()

    t0 = time.perf_counter()
    for idx in subsets[: a.baseline_subsets]:
        per_subset_minibatch_cka(X, idx)
    t_base_each = (time.perf_counter() - t0) / a.baseline_subsets
    t_base = t_base_each * a.subsets
    ours = t_gram + t_subsets
    print(f"Gram pass (float64, streamed)          : {t_gram:8.2f} s")
    print(f"{a.subsets} subsets from the Gram        : {t_subsets:8.2f} s   ratio subsets/Gram = {t_subsets / t_gram:.3f} (goal <= 1)")
    print(f"per-subset minibatch baseline          : {t_base_each:8.2f} s per subset -> {t_base:,.0f} s for {a.subsets} (scaled from {a.baseline_subsets})")
    print(f"speed-up vs per-subset baseline        : {t_base / ours:8.0f}x (goal >= 1000x)")

    bases = [rng.normal(size=(a.d, a.d)).astype(np.float32) for _ in range(a.projection_seeds)]
    views = [B[:, : max(1, int(f * a.d))] for B in bases for f in FRACTIONS]
    copies = [np.array(v, copy=True) for v in views]
    print(f"{len(views)} projection draws ({a.projection_seeds} bases x {len(FRACTIONS)} fractions), statistics taken once:")
    for estimator in a.projection_estimators.split(","):
        st = CKAStatistics("biased", stats.n, a.d, stats) if estimator == "biased" else cka_statistics(X, estimator)
        timed = {}
        for name, draws in (("shared", views), ("separate", copies)):
            t0 = time.perf_counter()
            values = subset_cka(X, draws, estimator=estimator, statistics=st).values
            timed[name] = (time.perf_counter() - t0, values)
        np.testing.assert_allclose(timed["shared"][1], timed["separate"][1], rtol=1e-8)
        print(f"  {estimator:8s} prefixes of one basis, shared : {timed['shared'][0]:8.2f} s")
        print(f"  {estimator:8s} separate projections          : {timed['separate'][0]:8.2f} s   "
              f"ratio separate/shared = {timed['separate'][0] / timed['shared'][0]:.1f}x")

if __name__ == "__main__":
    main()
