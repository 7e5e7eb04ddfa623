"""CKA in sample space, for layers wider than their samples (d > n: flattened feature maps).

Feature space needs the d x d Gram (d = 100,000 is 80 GB in float64). Sample space needs
n x n kernels: K = Yc Ycᵀ of the whole layer (columns centred), accumulated over column
blocks streamed from the store in one pass, and for a subset S, L = Yc_S Yc_Sᵀ. Then

* biased: CKA = <K, L>_F / (||K||_F ||L||_F) (the appendix's HSIC; K and L are already
  centred because the columns are);
* unbiased: Song et al.'s HSIC₁ of K and L (zero diagonals), which does not change when a
  feature is shifted, so centred columns give the raw kernels' value.

Subsets of one seed are nested prefixes of one permutation (a sweep's draws are views of
one column order), so L of each prefix is a running sum over the permutation's columns:
one pass over the columns per seed, however many fractions (a prefix above half the layer
is the whole layer's K minus the rest, so the pass stops at the middle). Columns are read
in groups that fit ``memory_mb`` (each group reads each stored chunk it touches once).
Projection draws (pca / randproj prefixes of one basis W) become Z = Yc W, n x k, in one
pass, and their kernels are running sums over Z's columns.
"""

from __future__ import annotations

import numpy as np

from ._inputs import Features

__all__ = ["KernelStatistics", "kernel_statistics", "sample_space_terms", "prefer_sample_space"]

GEMM_COLUMNS = 1024  # columns per product: large enough for BLAS, small against n x n


def prefer_sample_space(n: int, d: int) -> bool:
    """space="auto": sample space when the layer is wider than its samples (d > n): the n x n
    kernels are smaller than the d x d Gram, and a pass costs n²d instead of nd²."""
    return d > n


class KernelStatistics:
    """One pass's sums for sample-space CKA: K = Yc Ycᵀ (float64, columns centred), the column
    means, and per column the centred and raw sums of squares (the constant-subset check)."""

    def __init__(self, n: int, d: int):
        self.n, self.d = n, d
        self.K = np.zeros((n, n))
        self.mean = np.zeros(d)
        self.spread = np.zeros(d)
        self.size = np.zeros(d)

    def add_columns(self, lo: int, Y: np.ndarray) -> None:
        """Columns lo .. lo + Y.shape[1] (all rows)."""
        Y64 = np.asarray(Y, dtype=np.float64)
        mean = Y64.mean(axis=0)
        hi = lo + Y.shape[1]
        self.mean[lo:hi] = mean
        Yc64 = Y64 - mean
        self.spread[lo:hi] = (Yc64 * Yc64).sum(axis=0)
        self.size[lo:hi] = (Y64 * Y64).sum(axis=0)
        Yc = Yc64.astype(np.float32)
        self.K += Yc @ Yc.T


def _column_groups(n: int, memory_mb: int) -> int:
    """Columns held at once: ``memory_mb`` of float32 rows (at least one GEMM block)."""
    return max(GEMM_COLUMNS, (memory_mb << 20) // (4 * n) // GEMM_COLUMNS * GEMM_COLUMNS)


def kernel_statistics(X: Features, memory_mb: int) -> KernelStatistics:
    """The whole layer's kernel in one pass over its columns, in stored order."""
    n, d = X.shape
    st = KernelStatistics(n, d)
    step = _column_groups(n, memory_mb)
    for lo in range(0, d, step):
        cols = np.arange(lo, min(lo + step, d))
        Y = X.columns(cols, np.float32)
        for a in range(0, len(cols), GEMM_COLUMNS):
            st.add_columns(lo + a, Y[:, a:a + GEMM_COLUMNS])
    return st


def _add_kernel(L: np.ndarray, X: Features, cols: np.ndarray, mean: np.ndarray) -> None:
    """L += Yc Ycᵀ over the columns ``cols`` (one read of them, centred by the layer's means),
    in float32 products of GEMM_COLUMNS columns added into float64."""
    Y = X.columns(cols, np.float32)
    Y -= mean[cols].astype(np.float32)
    for a in range(0, len(cols), GEMM_COLUMNS):
        B = Y[:, a:a + GEMM_COLUMNS]
        L += B @ B.T


def _terms(K: np.ndarray, L: np.ndarray, estimator: str, kk: float | None):
    """(HSIC(K, L), HSIC(K, K), HSIC(L, L)) up to a common factor (biased: Frobenius products)."""
    if estimator == "biased":
        return float(np.vdot(K, L)), kk, float(np.vdot(L, L))
    n = len(K)
    dK, dL = np.diagonal(K), np.diagonal(L)
    rK, rL = K.sum(axis=1) - dK, L.sum(axis=1) - dL  # row sums of the zero-diagonal kernels

    def hsic1(tr, sa, sb, ab):
        return (tr + sa * sb / ((n - 1) * (n - 2)) - 2.0 * ab / (n - 2)) / (n * (n - 3))

    sK, sL = rK.sum(), rL.sum()
    kl = hsic1(float(np.vdot(K, L)) - dK @ dL, sK, sL, rK @ rL)
    ll = hsic1(float(np.vdot(L, L)) - dL @ dL, sL, sL, rL @ rL)
    return kl, kk, ll


def _self_term(K: np.ndarray, estimator: str) -> float:
    return _terms(K, K, estimator, 0.0)[2]


def _prefix_chains(index_subsets: list[tuple[int, np.ndarray]]):
    """Index subsets grouped into chains of nested prefixes of one array (a family's draws are
    views ``columns[:k]``): [(order, [(subset j, k), ...])], sorted by k; others alone."""
    by_memory: dict = {}
    for j, a in index_subsets:  # prefixes of one array start at its address, with its strides
        by_memory.setdefault((a.__array_interface__["data"][0], a.strides, a.dtype.str), []).append((j, a))
    chains = []
    for members in by_memory.values():
        widest = max((a for _, a in members), key=len)
        chains.append((np.asarray(widest), sorted(((j, len(a)) for j, a in members), key=lambda t: t[1])))
    return chains


def sample_space_terms(X: Features, stats: KernelStatistics, index_subsets, projection_families, estimator: str,
                       memory_mb: int):
    """Per subset j: (kl, kk, ll, spread, size). ``index_subsets`` is [(j, indices)];
    ``projection_families`` [(W, [(j, k), ...])] as ``_projection_families`` gives them."""
    n, d = stats.n, stats.d
    K = stats.K
    kk = _self_term(K, estimator)
    out: dict[int, tuple] = {}
    step = _column_groups(n, memory_mb)
    for order, members in _prefix_chains(index_subsets):
        cuts = sorted({k for _, k in members})
        # prefixes up to half the chain come from the front; when the chain orders the whole layer
        # (distinct indices, checked), longer ones are K minus the tail
        front = [k for k in cuts if k <= len(order) - k or len(order) < d]
        back = [k for k in cuts if k not in front]
        values: dict[int, tuple] = {}
        L = np.zeros((n, n))
        done = 0
        for k in front:
            for lo in range(done, k, step):
                _add_kernel(L, X, order[lo:min(lo + step, k)], stats.mean)
            done = k
            values[k] = _terms(K, L, estimator, kk)
        if back:
            L[:] = 0.0
            done = len(order)  # = d: the chain covers the layer
            for k in sorted(back, reverse=True):
                for hi in range(done, k, -step):
                    _add_kernel(L, X, order[max(hi - step, k):hi], stats.mean)
                done = k
                np.subtract(K, L, out=L)  # the prefix's kernel, in place ...
                values[k] = _terms(K, L, estimator, kk)
                np.subtract(K, L, out=L)  # ... and back to the tail's
        for j, k in members:
            idx = order[:k]
            out[j] = (*values[k], stats.spread[idx].sum(), stats.size[idx].sum())
    for W, members in projection_families:
        Z = np.zeros((n, W.shape[1]))
        for lo in range(0, d, step):
            cols = np.arange(lo, min(lo + step, d))
            Y = X.columns(cols, np.float64) - stats.mean[cols]
            Z += Y @ W[lo:lo + len(cols)]
        raw = np.cumsum((Z * Z).sum(axis=0))  # Z is centred: its spread is its size; CKA ignores the shift
        L = np.zeros((n, n))
        done = 0
        for j, k in sorted(members, key=lambda t: t[1]):
            if k > done:
                L += Z[:, done:k] @ Z[:, done:k].T
                done = k
            out[j] = (*_terms(K, L, estimator, kk), raw[k - 1], raw[k - 1] + _shift_size(stats, W[:, :k], n))
    return out


def _shift_size(stats: KernelStatistics, W: np.ndarray, n: int) -> float:
    """n ||mean W||²: what the uncentred projection adds to its centred sum of squares."""
    m = stats.mean @ W
    return float(n * (m @ m))
