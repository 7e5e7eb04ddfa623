"""Streaming linear CKA between neuron subsets (or projections) of a layer and the layer.

Three estimators, every result tagged with the one that produced it:

``biased`` (default; appendix A.1 of the paper)
    K = Y Yᵀ, L = Z Zᵀ, HSIC(K, L) = tr(K H L H) / (n-1)², CKA = HSIC(K,L) /
    sqrt(HSIC(K,K) HSIC(L,L)). In feature space, with column-centred Yc, Zc,
    CKA = ||Ycᵀ Zc||²_F / (||Ycᵀ Yc||_F ||Zcᵀ Zc||_F). For Z = Y[:, S] every term is a
    block of the one centred d x d Gram C = Ycᵀ Yc, accumulated in float64 in one
    streaming pass; then, with the 0/1 indicator matrix M (d x n_subsets),
    ||C[:, S]||² = colsum(C∘C) · m and ||C[S, S]||² = mᵀ (C∘C) m, so any number of
    subsets costs two GEMMs.
``unbiased`` (Song et al. 2007, "debiased" CKA) over the whole split
    HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1] / (n(n-3)),
    K̃, L̃ = K, L with zeroed diagonals, on the raw linear kernels. Every term is a
    function of streamed sums (Gram, Y ᵀ(Y∘Y), (Y∘Y)ᵀ(Y∘Y), row norms), so it too is
    one pass and GEMMs over subsets.
``minibatch`` (Nguyen et al. 2021, the authors' library)
    HSIC₁ of each equal-size minibatch, averaged over minibatches for each of the three
    HSIC terms, then the CKA ratio. Minibatches are cut from a seeded shuffle of the rows
    (``shuffle_seed``; as STIR draws them from a shuffled loader): stored rows are often
    sorted by class, and consecutive rows would bias the estimate. The shuffle depends on
    the rows' content only, so any stored order of the same data gives the same value. A
    ragged last minibatch is dropped; the number of rows used is reported.

Subsets whose features are constant over the split (judged against the subset's own
scale: CKA does not depend on it, so a quiet live neuron is not constant) and, for the
unbiased estimators, subsets whose self-HSIC estimate is not positive have no defined
CKA: they get NaN and are flagged in ``CKAResult.degenerate`` (or raise with
``on_degenerate="raise"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
from pydantic import Field

from featstore.errors import IncompatibleParametersError, InvalidFeaturesError, InvalidParameterError
from featstore.params import OneOf, Parameters, SeedValue, defaults, validate

from ._inputs import Features, as_features
from ._sample_cka import KernelStatistics, kernel_statistics, prefer_sample_space, sample_space_terms
from ._selection import check_indices

__all__ = ["CKAResult", "CKAStatistics", "CKAEstimator", "ESTIMATORS", "CKAOptions", "cka_statistics", "subset_cka",
           "cross_cka", "linear_cka", "GramAccumulator", "iter_row_blocks"]


@dataclass
class CKAResult:
    """CKA values, one per subset, with the estimator that produced them.

    Behaves like a 1-D numpy array (``np.asarray(result)``, indexing, ``len``).

    Attributes
    ----------
    values : array of shape (n_subsets,)
    estimator : str
        ``biased``, ``unbiased`` or ``minibatch``.
    n_samples : int
        Rows that entered the estimate.
    degenerate : array of bool, shape (n_subsets,)
        Subsets with no defined CKA (value NaN): features constant over the samples (judged
        against the subset's own scale, so a quiet but live neuron is not one), or a
        self-HSIC estimate that is not positive.
    batch_size : int or None
        Minibatch size for ``minibatch``.
    shuffle_seed : int or None
        Seed of the row order the minibatches were cut from (``minibatch``).
    space : {"feature", "sample"}
        Where the estimate was computed: the d x d Gram (feature space) or n x n kernels
        (sample space, for layers wider than their samples). Both give the same value.
    """

    values: np.ndarray
    estimator: str
    n_samples: int
    degenerate: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    batch_size: int | None = None
    shuffle_seed: int | None = None
    space: str = "feature"

    def __array__(self, dtype=None, copy=None):
        return self.values.astype(dtype) if dtype is not None else self.values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        return self.values[i]

    def __repr__(self) -> str:
        bs = f", batch_size={self.batch_size}, shuffle_seed={self.shuffle_seed}" if self.batch_size else ""
        return (f"CKAResult(estimator={self.estimator!r}{bs}, space={self.space!r}, n_samples={self.n_samples}, "
                f"values={np.array2string(self.values, precision=4, threshold=8)}, "
                f"degenerate={int(self.degenerate.sum())})")


# ----------------------------------------------------------------------------- input streaming


def iter_row_blocks(X, block_rows: int | None = None) -> Iterator[np.ndarray]:
    """Yield float64 row blocks of X: a numpy array, torch tensor, zarr array or featstore Group.

    Blocks are checked for NaN/Inf as they stream; a group's chunks are verified by the same read.
    """
    return as_features(X).blocks(block_rows)


# ----------------------------------------------------------------------------- subsets


def _memory_key(a: np.ndarray) -> tuple:
    """Arrays with one key share their first columns' memory: the narrower is a prefix of the wider."""
    return a.__array_interface__["data"][0], a.strides, a.dtype.str, a.shape[0]


def _leading_sums(A: np.ndarray) -> np.ndarray:
    """out[k-1] = sum of the leading k x k block of A, for every k."""
    return np.diagonal(np.cumsum(np.cumsum(A, axis=0), axis=1)).copy()


def _projection_families(kinds, projections) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
    """Projection subsets grouped by the basis they are prefixes of: [(W, [(subset j, k), ...])],
    W the widest (``_subset_matrix`` made prefixes of one basis views of one array)."""
    by_memory: dict = {}
    for j, (kind, i) in enumerate(kinds):
        if kind == "proj":
            by_memory.setdefault(_memory_key(projections[i]), []).append((j, projections[i]))
    return [(max((P for _, P in members), key=lambda P: P.shape[1]), [(j, P.shape[1]) for j, P in members])
            for members in by_memory.values()]


_SUBSETS = "a non-empty list of index arrays (1-D) or projections (n_neurons x k)"


def _split_subsets(subsets: Sequence, d: int) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[str, int]]]:
    """(index arrays, projections, kinds): each subset checked; kinds[j] = ("index" | "proj", i)."""
    if isinstance(subsets, np.ndarray) and subsets.ndim == 1:
        subsets = [subsets]
    subsets = list(subsets)
    if not subsets:
        raise InvalidParameterError(key="subsets", value=[], expected=_SUBSETS)
    index_cols, projections, kinds = [], [], []
    for i, s in enumerate(subsets):
        a = np.asarray(s)
        if a.ndim == 1:
            index_cols.append(check_indices(a, d, f"subsets[{i}]"))
            kinds.append(("index", len(index_cols) - 1))
        elif a.ndim == 2 and a.shape[0] == d:
            projections.append(a)
            kinds.append(("proj", len(projections) - 1))
        else:
            raise InvalidParameterError(key=f"subsets[{i}]", value=f"array of shape {a.shape}",
                                        expected=f"1-D neuron indices or a ({d}, k) projection")
    # Projections that are the first k columns of one basis (a pca / randproj family's draws are
    # views basis[:, :k]) become views of one float64 copy of the widest, which `_biased` spots.
    widest: dict = {}
    for a in projections:
        key = _memory_key(a)
        if key not in widest or a.shape[1] > widest[key].shape[1]:
            widest[key] = a
    as_f64 = {key: a.astype(np.float64) for key, a in widest.items()}
    projections = [as_f64[_memory_key(a)][:, : a.shape[1]] for a in projections]
    return index_cols, projections, kinds


def _subset_matrix(subsets: Sequence, d: int) -> tuple[np.ndarray | None, list[np.ndarray], list]:
    """Split subsets into a 0/1 indicator matrix (d x n_index) and a list of projections."""
    index_cols, projections, kinds = _split_subsets(subsets, d)
    M = None
    if index_cols:
        M = np.zeros((d, len(index_cols)))
        for j, idx in enumerate(index_cols):
            M[idx, j] = 1.0
    return M, projections, kinds


# ----------------------------------------------------------------------------- biased (appendix A.1)


class GramAccumulator:
    """Streamed, float64, shifted accumulation of n, column sums and the Gram of (A, B).

    The first block's column means are subtracted from every row before accumulating
    (CKA is shift-invariant), which avoids cancellation in ``G - s sᵀ / n``.
    """

    def __init__(self):
        self.n = 0
        self.shift_a = self.shift_b = None
        self.sa = self.sb = None
        self.gab = self.gaa = self.gbb = None

    def add(self, A: np.ndarray, B: np.ndarray | None = None) -> None:
        if self.shift_a is None:
            self.shift_a = A.mean(axis=0)
            self.shift_b = B.mean(axis=0) if B is not None else None
            self.sa = np.zeros(A.shape[1])
            self.gaa = np.zeros((A.shape[1], A.shape[1]))
            if B is not None:
                self.sb = np.zeros(B.shape[1])
                self.gab = np.zeros((A.shape[1], B.shape[1]))
                self.gbb = np.zeros((B.shape[1], B.shape[1]))
        A = A - self.shift_a
        self.n += len(A)
        self.sa += A.sum(axis=0)
        self.gaa += A.T @ A
        if B is not None:
            B = B - self.shift_b
            self.sb += B.sum(axis=0)
            self.gab += A.T @ B
            self.gbb += B.T @ B

    def spread_size(self, side: str = "a") -> tuple[float, float]:
        """(Σ ||z - z̄||², Σ ||z||²) of one side's rows: its centred spread and its own raw size."""
        n, shift, s, g = (self.n, self.shift_a, self.sa, self.gaa) if side == "a" else \
            (self.n, self.shift_b, self.sb, self.gbb)
        return _spread_size(n, shift, s, g)

    def centred(self):
        """(Caa, Cab, Cbb): centred Grams (Cab, Cbb are None without B)."""
        caa = self.gaa - np.outer(self.sa, self.sa) / self.n
        if self.sb is None:
            return caa, None, None
        cab = self.gab - np.outer(self.sa, self.sb) / self.n
        cbb = self.gbb - np.outer(self.sb, self.sb) / self.n
        return caa, cab, cbb


# A subset is constant when its centred spread is this small against its own raw size: exact
# arithmetic gives 0, float64 sums leave ~1e-16. Judged per subset, never against the whole
# layer's scale, since CKA does not depend on a subset's scale (a quiet neuron is live).
CONSTANT_RTOL = 1e-12


def _spread_size(n, shift, s, G) -> tuple[np.ndarray, np.ndarray]:
    """Per column: (centred sum of squares, raw sum of squares) from rows shifted by ``shift``
    (s = Σ(y - shift), G = Σ(y - shift)(y - shift)ᵀ)."""
    g = np.diagonal(G)
    return g - s * s / n, g + 2.0 * shift * s + n * shift * shift


def _subset_constant(n, shift, s, G, M, projections, kinds) -> tuple[np.ndarray, bool]:
    """(constant per subset, the whole layer constant) from shifted moment sums."""
    C = G - np.outer(s, s) / n
    spread_col, size_col = _spread_size(n, shift, s, G)
    spread, size = np.zeros(len(kinds)), np.zeros(len(kinds))
    if M is not None:
        ci, ri = spread_col @ M, size_col @ M
    for j, (kind, k) in enumerate(kinds):
        if kind == "index":
            spread[j], size[j] = ci[k], ri[k]
    families = _projection_families(kinds, projections)
    if families:
        R = G + np.outer(shift, s) + np.outer(s, shift) + n * np.outer(shift, shift)  # raw Gram
        for W, members in families:
            cw, rw = np.cumsum((W * (C @ W)).sum(axis=0)), np.cumsum((W * (R @ W)).sum(axis=0))
            for j, k in members:
                spread[j], size[j] = cw[k - 1], rw[k - 1]
    return _constant(spread, size), bool(_constant(spread_col.sum(), size_col.sum()))


def _constant(spread, size):
    spread, size = np.asarray(spread, float), np.asarray(size, float)
    return (size <= 0) | (spread <= CONSTANT_RTOL * size)


class _ColumnStats:
    """Streamed n, Σz and Σz² of one subset's columns (for the constant-subset check)."""

    def __init__(self):
        self.n, self.s, self.q = 0, 0.0, 0.0

    def add(self, Z: np.ndarray) -> None:
        self.n += len(Z)
        self.s = self.s + Z.sum(axis=0)
        self.q = self.q + (Z * Z).sum(axis=0)

    def constant(self) -> bool:
        return bool(_constant((self.q - self.s * self.s / self.n).sum(), np.sum(self.q)))


def _finish(num, den_a, den_b, estimator, n, on_degenerate, constant, layer_constant=False, batch_size=None,
            shuffle_seed=None) -> CKAResult:
    """CKA = num / sqrt(den_a * den_b); den_* are the self-HSIC terms (squared norms).

    A subset has no defined CKA when it is constant (``constant``, judged on its own scale),
    or its self-HSIC estimate is not positive (the unbiased estimators can give that); nor has
    any subset when the reference side is constant or its self-HSIC is not positive. Those
    get NaN and the degenerate flag.
    """
    num, den_a, den_b = np.broadcast_arrays(np.asarray(num, float), np.asarray(den_a, float), np.asarray(den_b, float))
    degenerate = np.asarray(constant, bool) | ~(den_b > 0) | ~(den_a > 0) | bool(layer_constant)
    values = np.full(num.shape, np.nan)
    ok = ~degenerate
    values[ok] = num[ok] / np.sqrt(den_a[ok] * den_b[ok])
    if degenerate.any() and on_degenerate == "raise":
        first = int(np.argmax(degenerate))
        raise InvalidFeaturesError(
            problem=f"subset {first} has no defined CKA ({estimator}): its features (or the layer's) are constant over "
                    f"the {n} samples, or its self-HSIC estimate is not positive; pass on_degenerate='nan' to get NaN "
                    f"(flagged in .degenerate) for such subsets")
    return CKAResult(values=values, estimator=estimator, n_samples=n, degenerate=degenerate, batch_size=batch_size,
                     shuffle_seed=shuffle_seed)


def _biased(stats: GramAccumulator, M, projections, kinds, on_degenerate) -> CKAResult:
    C, _, _ = stats.centred()
    C2 = C * C
    full = C2.sum()  # ||C||_F^2 ∝ HSIC(K, K)
    num = np.zeros(len(kinds))
    den_s = np.zeros(len(kinds))
    if M is not None:
        idx_num = C2.sum(axis=0) @ M  # ||C[:, S]||^2
        idx_den = np.einsum("ij,ij->j", M, C2 @ M)  # ||C[S, S]||_F^2
    for j, (kind, k) in enumerate(kinds):
        if kind == "index":
            num[j], den_s[j] = idx_num[k], idx_den[k]
    for W, members in _projection_families(kinds, projections):  # two products per basis, every prefix
        CW = C @ W
        num_upto = np.cumsum((CW * CW).sum(axis=0))  # ||Ycᵀ Zc||^2 with Zc = Yc W[:, :k], for every k
        B = W.T @ CW
        den_upto = _leading_sums(B * B)  # ||Zcᵀ Zc||_F^2
        for j, k in members:
            num[j], den_s[j] = num_upto[k - 1], den_upto[k - 1]
    constant, layer_constant = _subset_constant(stats.n, stats.shift_a, stats.sa, stats.gaa, M, projections, kinds)
    return _finish(num, full, den_s, "biased", stats.n, on_degenerate, constant, layer_constant)


# ----------------------------------------------------------------------------- unbiased HSIC (Song et al.)


class MomentAccumulator:
    """Streamed sums for the unbiased HSIC of raw linear kernels of Y and Y[:, S].

    With rows y_i, q_i = y_i∘y_i and r_i = ||y_i||²: n, s = Σy, G = Σ y yᵀ,
    H = Σ y qᵀ, Q = Σ q qᵀ, u = Σ r y, w = Σ r q, Σ r, Σ r².
    The unbiased HSIC is invariant to a constant shift of the features, so rows are
    shifted by the first block's column means to keep the float64 sums well conditioned.
    """

    def __init__(self, d: int):
        self.shift = None
        self.n = 0
        self.s = np.zeros(d)
        self.G = np.zeros((d, d))
        self.H = np.zeros((d, d))
        self.Q = np.zeros((d, d))
        self.u = np.zeros(d)
        self.w = np.zeros(d)
        self.r1 = 0.0
        self.r2 = 0.0

    def add(self, Y: np.ndarray) -> None:
        if self.shift is None:
            self.shift = Y.mean(axis=0)
        Y = Y - self.shift
        q = Y * Y
        r = q.sum(axis=1)
        self.n += len(Y)
        self.s += Y.sum(axis=0)
        self.G += Y.T @ Y
        self.H += Y.T @ q
        self.Q += q.T @ q
        self.u += r @ Y
        self.w += r @ q
        self.r1 += r.sum()
        self.r2 += r @ r


def _hsic1(trKL, sumK, sumL, kl1, n):
    """Unbiased HSIC from tr(K̃L̃), 1ᵀK̃1, 1ᵀL̃1 and 1ᵀK̃L̃1."""
    return (trKL + sumK * sumL / ((n - 1) * (n - 2)) - 2.0 * kl1 / (n - 2)) / (n * (n - 3))


def _unbiased_terms(m: MomentAccumulator, M: np.ndarray):
    """(HSIC(K,L), HSIC(K,K), HSIC(L,L)) for every indicator column of M (K: all neurons)."""
    n, s, G, H, Q = m.n, m.s, m.G, m.H, m.Q
    if n < 4:
        raise InvalidFeaturesError(problem=f"the unbiased HSIC needs at least 4 samples; got {n}")
    G2 = G * G
    sM = M * s[:, None]  # columns: s restricted to each subset
    # K vs K (all neurons)
    trKK = G2.sum() - m.r2
    sumK = s @ s - m.r1
    kk1 = s @ G @ s - 2.0 * s @ m.u + m.r2
    # L vs L (subset S): r_S = q·m
    trLL = np.einsum("ij,ij->j", M, G2 @ M) - np.einsum("ij,ij->j", M, Q @ M)
    sumL = (s * s) @ M - np.diag(G) @ M
    ll1 = np.einsum("ij,ij->j", sM, G @ sM) - 2.0 * np.einsum("ij,ij->j", sM, H @ M) + np.einsum("ij,ij->j", M, Q @ M)
    # K vs L
    trKL = G2.sum(axis=0) @ M - m.w @ M
    kl1 = (G @ s * s) @ M - s @ H @ M - (s * m.u) @ M + m.w @ M
    return _hsic1(trKL, sumK, sumL, kl1, n), _hsic1(trKK, sumK, sumK, kk1, n), _hsic1(trLL, sumL, sumL, ll1, n)


def _unbiased_pair_terms(A: np.ndarray, B: np.ndarray):
    """(HSIC(K,L), HSIC(K,K), HSIC(L,L)) for explicit feature blocks A (n x da), B (n x db)."""
    n = len(A)
    K = A @ A.T
    L = B @ B.T
    return _hsic1_dense(K, L, n), _hsic1_dense(K, K, n), _hsic1_dense(L, L, n)


def _hsic1_dense(K, L, n):
    K = K.copy()
    L = L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    return _hsic1((K * L).sum(), K.sum(), L.sum(), K.sum(axis=0) @ L.sum(axis=1), n)


def _pair_moments_terms(blocks: Iterable[tuple[np.ndarray, np.ndarray]]):
    """Unbiased HSIC terms for (A, B) pairs streamed in feature space (projections, cross-group)."""
    acc = None
    for A, B in blocks:
        ra, rb = (A * A).sum(1), (B * B).sum(1)
        part = dict(n=len(A), sa=A.sum(0), sb=B.sum(0), Gab=A.T @ B, Gaa=A.T @ A, Gbb=B.T @ B,
                    a_rb=rb @ A, b_ra=ra @ B, a_ra=ra @ A, b_rb=rb @ B, rarb=ra @ rb, ra=ra.sum(), rb=rb.sum(),
                    ra2=ra @ ra, rb2=rb @ rb)
        acc = part if acc is None else {k: acc[k] + v for k, v in part.items()}
    n = acc["n"]
    if n < 4:
        raise InvalidFeaturesError(problem=f"the unbiased HSIC needs at least 4 samples; got {n}")
    sa, sb = acc["sa"], acc["sb"]
    trKL = (acc["Gab"] ** 2).sum() - acc["rarb"]
    trKK = (acc["Gaa"] ** 2).sum() - acc["ra2"]
    trLL = (acc["Gbb"] ** 2).sum() - acc["rb2"]
    sumK, sumL = sa @ sa - acc["ra"], sb @ sb - acc["rb"]
    kl1 = sa @ acc["Gab"] @ sb - sa @ acc["a_rb"] - sb @ acc["b_ra"] + acc["rarb"]
    kk1 = sa @ acc["Gaa"] @ sa - 2 * sa @ acc["a_ra"] + acc["ra2"]
    ll1 = sb @ acc["Gbb"] @ sb - 2 * sb @ acc["b_rb"] + acc["rb2"]
    return _hsic1(trKL, sumK, sumL, kl1, n), _hsic1(trKK, sumK, sumK, kk1, n), _hsic1(trLL, sumL, sumL, ll1, n)


def _unbiased_prefix_terms(m: MomentAccumulator, blocks: Iterable[np.ndarray], W: np.ndarray):
    """(HSIC(K,L), HSIC(K,K), HSIC(L,L)) for L from Z_k = Y W[:, :k], for every k at once.

    K's terms and every term of L that is linear in Z Zᵀ come from the moment sums m
    (G, s, u over the shifted rows Y). The rest needs Z's squares, taken in one pass
    over the blocks (shifted like m): P1 = Yᵀ(Z∘Z), P2 = (Z∘Z)ᵀ(Z∘Z), P3 = (Z∘Z)ᵀZ and
    v = rᵀ(Z∘Z) with r the row norms of Y. Each prefix is then a cumulative sum over
    Z's columns (P2, P3, WᵀGW: leading blocks). Same formulas as ``_pair_moments_terms``
    with A = Y, B = Z_k.
    """
    kmax = W.shape[1]
    P1 = np.zeros((W.shape[0], kmax))
    P2 = np.zeros((kmax, kmax))
    P3 = np.zeros((kmax, kmax))
    v = np.zeros(kmax)
    for block in blocks:
        Y = block - m.shift
        Z = Y @ W
        Z2 = Z * Z
        P1 += Y.T @ Z2
        P2 += Z2.T @ Z2
        P3 += Z2.T @ Z
        v += (Y * Y).sum(axis=1) @ Z2
    n, s, G, u = m.n, m.s, m.G, m.u
    if n < 4:
        raise InvalidFeaturesError(problem=f"the unbiased HSIC needs at least 4 samples; got {n}")
    GW = G @ W
    WGW = W.T @ GW  # Z_kᵀ Z_k = its leading k x k block
    sb = W.T @ s  # column sums of Z (prefix k: the first k)
    rarb = np.cumsum(v)  # Σ_i r_i q_i with q_i = ||z_i[:k]||²
    rb = np.cumsum(np.diagonal(WGW))  # Σ_i q_i
    rb2 = _leading_sums(P2)  # Σ_i q_i²
    trKL = np.cumsum((GW * GW).sum(axis=0)) - rarb
    trKK = (G * G).sum() - m.r2
    trLL = _leading_sums(WGW * WGW) - rb2
    sumK = s @ s - m.r1
    sumL = np.cumsum(sb * sb) - rb
    kl1 = np.cumsum((s @ GW) * sb) - np.cumsum(s @ P1) - np.cumsum(sb * (W.T @ u)) + rarb
    kk1 = s @ G @ s - 2.0 * s @ u + m.r2
    ll1 = _leading_sums(WGW * np.outer(sb, sb)) - 2.0 * _leading_sums(P3 * sb[None, :]) + rb2
    return _hsic1(trKL, sumK, sumL, kl1, n), _hsic1(trKK, sumK, sumK, kk1, n), _hsic1(trLL, sumL, sumL, ll1, n)


# ----------------------------------------------------------------------------- the estimators


def _terms_arrays(n: int):
    return np.zeros(n), np.zeros(n), np.zeros(n)


def _biased_subsets(X: Features, M, projections, kinds, opts, sums) -> CKAResult:
    sums = sums if sums is not None else _accumulate(X, "biased", opts.block_rows)
    return _biased(sums, M, projections, kinds, opts.on_degenerate)


def _unbiased_subsets(X: Features, M, projections, kinds, opts, sums) -> CKAResult:
    kl, kk, ll = _terms_arrays(len(kinds))
    mom = sums if sums is not None else _accumulate(X, "unbiased", opts.block_rows)  # one pass
    if M is not None:  # every index subset from the moment sums
        ikl, ikk, ill = _unbiased_terms(mom, M)
    for j, (kind, k) in enumerate(kinds):
        if kind == "index":
            kl[j], kk[j], ll[j] = ikl[k], ikk, ill[k]
    # a projection's squared features are not in the sums: one more pass per basis, shared
    # by all of its prefixes
    for W, members in _projection_families(kinds, projections):
        fkl, fkk, fll = _unbiased_prefix_terms(mom, X.blocks(opts.block_rows), W)
        for j, k in members:
            kl[j], kk[j], ll[j] = fkl[k - 1], fkk, fll[k - 1]
    constant, layer_constant = _subset_constant(mom.n, mom.shift, mom.s, mom.G, M, projections, kinds)
    return _finish(kl, kk, ll, "unbiased", X.n_samples, opts.on_degenerate, constant, layer_constant)


def _row_order(rows: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random order of the rows that depends on their content only, not on where they
    are stored: rows sorted by a seeded hash of their bits (multiply-add universal hashing of
    the float32 words, then a murmur finaliser). A class-sorted store and any reordering of it
    give the same minibatches (identical rows are interchangeable)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    coeffs = np.random.default_rng([seed, 17]).integers(1, 2 ** 63, size=rows.shape[1], dtype=np.uint64) | np.uint64(1)
    keys = np.empty(len(rows), dtype=np.uint64)
    for i in range(0, len(rows), 8192):
        h = (rows[i:i + 8192].view(np.uint32).astype(np.uint64) * coeffs).sum(axis=1)  # wraps mod 2**64
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        keys[i:i + 8192] = h
    return np.argsort(keys, kind="stable")


def _shuffled_minibatches(rows: np.ndarray, order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """float64 minibatches of exactly ``batch_size`` rows in ``order``; a ragged tail is dropped."""
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield rows[order[start:start + batch_size]].astype(np.float64)


def _minibatch_subsets(X: Features, M, projections, kinds, opts, sums) -> CKAResult:
    """Per-minibatch unbiased HSIC, averaged over the minibatches, then the ratio. Minibatches
    are cut from a seeded shuffle of the rows (as STIR draws them from a shuffled loader):
    consecutive stored rows are often one class, which biases the estimate."""
    kl, kk, ll = _terms_arrays(len(kinds))
    rows = X.numpy(np.float32)  # read once (and checked) for the shuffled minibatches
    order = _row_order(rows, opts.shuffle_seed)
    whole = GramAccumulator()  # over every row used: which subsets are constant
    stats = [_ColumnStats() for _ in kinds]
    n_batches = 0
    for batch in _shuffled_minibatches(rows, order, opts.batch_size):
        n_batches += 1
        whole.add(batch)
        if M is not None:
            mom = MomentAccumulator(X.n_neurons)
            mom.add(batch)
            ikl, ikk, ill = _unbiased_terms(mom, M)
        for j, (kind, k) in enumerate(kinds):
            if kind == "index":
                a, b, c = ikl[k], ikk, ill[k]
            else:
                Z = batch @ projections[k]
                stats[j].add(Z)
                a, b, c = _unbiased_pair_terms(batch, Z)
            kl[j] += a; kk[j] += b; ll[j] += c  # noqa: E702
    if n_batches == 0:
        raise InvalidFeaturesError(where=X.where, problem=f"fewer rows than batch_size={opts.batch_size}: "
                                                          f"no complete minibatch")
    constant, layer_constant = _subset_constant(whole.n, whole.shift_a, whole.sa, whole.gaa, M, [], [
        (kind, k) if kind == "index" else ("none", k) for kind, k in kinds])
    constant = np.array([stats[j].constant() if kind == "proj" else constant[j] for j, (kind, _) in enumerate(kinds)])
    return _finish(kl / n_batches, kk / n_batches, ll / n_batches, "minibatch", n_batches * opts.batch_size,
                   opts.on_degenerate, constant, layer_constant, batch_size=opts.batch_size,
                   shuffle_seed=opts.shuffle_seed)


def _biased_pairs(pairs, select, kinds, opts) -> CKAResult:
    acc = [GramAccumulator() for _ in kinds]
    for a, b in pairs():
        for j, (kind, k) in enumerate(kinds):
            acc[j].add(select(a, kind, k), b)
    num, da, db = _terms_arrays(len(kinds))
    for j, st in enumerate(acc):
        caa, cab, cbb = st.centred()
        num[j], da[j], db[j] = (cab * cab).sum(), (caa * caa).sum(), (cbb * cbb).sum()
    # here the subsets are X's (side a) and Y is the reference (side b)
    constant = [bool(_constant(*(v.sum() for v in st.spread_size("a")))) for st in acc]
    y_constant = bool(_constant(*(v.sum() for v in acc[0].spread_size("b"))))
    return _finish(num, db, da, "biased", acc[0].n, opts.on_degenerate, constant, y_constant)


def _unbiased_pairs(pairs, select, kinds, opts) -> CKAResult:
    stats, y_stats = [_ColumnStats() for _ in kinds], _ColumnStats()

    def counted(j, kind, k):
        for a, b in pairs():
            Z = select(a, kind, k)
            stats[j].add(Z)
            if j == 0:
                y_stats.add(b)
            yield Z, b

    terms = [_pair_moments_terms(counted(j, kind, k)) for j, (kind, k) in enumerate(kinds)]
    kl, kk, ll = (np.array(t) for t in zip(*terms))  # K: the subset of X, L: Y
    return _finish(kl, ll, kk, "unbiased", y_stats.n, opts.on_degenerate, [st.constant() for st in stats],
                   y_stats.constant())


def _minibatch_pairs(pairs, select, kinds, opts) -> CKAResult:
    """Minibatches cut from one seeded shuffle of the samples, ordered by the content of the
    reference side's rows (Y here, the whole layer in ``subset_cka``, so that
    ``cross_cka(X, X, subsets=S)`` equals ``subset_cka(X, S)``), the same rows for X and Y."""
    blocks = list(pairs())
    width = blocks[0][0].shape[1]
    rows = np.vstack([np.hstack([a, b]).astype(np.float32) for a, b in blocks])  # X's columns, then Y's
    del blocks
    order = _row_order(rows[:, width:], opts.shuffle_seed)
    sums = np.zeros((len(kinds), 3))
    stats, y_stats = [_ColumnStats() for _ in kinds], _ColumnStats()
    n_batches = 0
    for batch in _shuffled_minibatches(rows, order, opts.batch_size):
        a, b = batch[:, :width], batch[:, width:]
        n_batches += 1
        y_stats.add(b)
        for j, (kind, k) in enumerate(kinds):
            Z = select(a, kind, k)
            stats[j].add(Z)
            sums[j] += _unbiased_pair_terms(Z, b)
    if n_batches == 0:
        raise InvalidFeaturesError(problem=f"fewer rows than batch_size={opts.batch_size}: no complete minibatch")
    sums /= n_batches
    return _finish(sums[:, 0], sums[:, 2], sums[:, 1], "minibatch", n_batches * opts.batch_size, opts.on_degenerate,
                   [st.constant() for st in stats], y_stats.constant(), batch_size=opts.batch_size,
                   shuffle_seed=opts.shuffle_seed)


@dataclass(frozen=True)
class CKAEstimator:
    """One entry of the CKA-estimator registry.

    Attributes
    ----------
    name : str
    description : str
    subsets : callable
        ``subsets(features, M, projections, kinds, options, sums) -> CKAResult``: subsets of
        one layer against the layer.
    pairs : callable
        ``pairs(pairs, select, kinds, options) -> CKAResult``: two feature sets over the
        same samples (``cross_cka``).
    sums : callable or None
        ``sums(n_neurons)``: the whole-split accumulator a pass fills (reusable through
        ``cka_statistics``); None when the estimator has none (``minibatch``).
    """

    name: str
    description: str
    subsets: Callable
    pairs: Callable
    sums: Callable | None


ESTIMATORS: dict[str, CKAEstimator] = {e.name: e for e in (
    CKAEstimator("biased", "the appendix's HSIC over the whole split (centred Gram)", _biased_subsets,
                 _biased_pairs, lambda d: GramAccumulator()),
    CKAEstimator("unbiased", "Song et al.'s unbiased HSIC over the whole split", _unbiased_subsets,
                 _unbiased_pairs, MomentAccumulator),
    CKAEstimator("minibatch", "Nguyen et al.'s unbiased HSIC averaged over minibatches of a seeded row shuffle",
                 _minibatch_subsets, _minibatch_pairs, None),
)}


class CKAOptions(Parameters):
    """How CKA is estimated: what a sweep's ``[metrics] cka_*`` keys set."""

    estimator: Annotated[str, OneOf(ESTIMATORS, "CKA estimator")] = "biased"
    """biased (the appendix's definition), unbiased or minibatch."""
    batch_size: Annotated[int, Field(ge=4, le=1 << 20)] = 256
    """Minibatch size of the minibatch estimator (the unbiased HSIC needs >= 4 rows)."""
    shuffle_seed: SeedValue = 0
    """Seed of the row shuffle the minibatch estimator cuts its minibatches from."""


OnDegenerate = Literal["nan", "raise"]
Space = Literal["auto", "feature", "sample"]


class _CKACall(CKAOptions):
    """A call's options: the estimator's, and how the call streams and reports."""

    block_rows: Annotated[int, Field(ge=1)] | None = None
    """Rows per streamed block (the value does not change the result)."""
    on_degenerate: OnDegenerate = "nan"
    """What to do with subsets whose CKA is undefined: report NaN (flagged) or raise."""
    space: Space = "auto"
    """feature (the d x d Gram), sample (n x n kernels streamed over column blocks) or auto: sample when the
    layer is wider than its samples (d > n). The value does not depend on it (biased and unbiased)."""
    memory_mb: Annotated[int, Field(ge=16)] = 1024
    """Sample space: MB of feature columns held at once (the kernels add 2-3 x n² float64 on top)."""


_CKA = defaults(_CKACall)


def _options(**given) -> _CKACall:
    return validate(_CKACall, given)


def _accumulate(X: Features, estimator: str, block_rows: int | None):
    sums = ESTIMATORS[estimator].sums(X.n_neurons)
    for block in X.blocks(block_rows):
        sums.add(block)
    return sums


# ----------------------------------------------------------------------------- public entry points


@dataclass
class CKAStatistics:
    """The streamed sums of one pass over a layer's features, reusable by ``subset_cka``.

    That pass (n·d² multiply-adds in float64) is the whole cost of scoring index
    subsets; computing it once serves every later call on the same features, e.g. each
    task of a sweep that a worker runs on one layer.

    Attributes
    ----------
    estimator : {"biased", "unbiased"}
    n_samples, n_neurons : int
        The shape of the features the sums were taken over.
    sums : GramAccumulator, MomentAccumulator or KernelStatistics
    space : {"feature", "sample"}
        The d x d sums, or the n x n kernel of a layer wider than its samples.
    """

    estimator: str
    n_samples: int
    n_neurons: int
    sums: object = field(repr=False)
    space: str = "feature"


def cka_statistics(X, estimator: str = _CKA["estimator"], *, block_rows: int | None = None,
                   space: Space = _CKA["space"], memory_mb: int = _CKA["memory_mb"]) -> CKAStatistics:
    """One streamed pass over X, for any number of later ``subset_cka(X, ..., statistics=...)`` calls.

    Parameters
    ----------
    X : array of shape (n_samples, n_neurons), torch tensor, zarr array or featstore.Group
    estimator : {"biased", "unbiased"}
        ``minibatch`` has no whole-split sums (each minibatch is its own estimate).
    space, memory_mb
        As in :func:`subset_cka`: a layer wider than its samples gets its n x n kernel.
    """
    opts = _options(estimator=estimator, block_rows=block_rows, space=space, memory_mb=memory_mb)
    if ESTIMATORS[opts.estimator].sums is None:
        raise IncompatibleParametersError(
            key="estimator", value=estimator,
            reason="it has no reusable whole-split statistics (every minibatch is its own estimate); choose "
                   "one of " + ", ".join(repr(e.name) for e in ESTIMATORS.values() if e.sums is not None)
                   + ", or call subset_cka without statistics")
    X = as_features(X)
    if _space(opts, X) == "sample":
        return CKAStatistics(opts.estimator, X.n_samples, X.n_neurons, kernel_statistics(X, opts.memory_mb), "sample")
    sums = _accumulate(X, opts.estimator, opts.block_rows)
    return CKAStatistics(opts.estimator, sums.n, X.n_neurons, sums)


def _space(opts, X: Features) -> str:
    """The space a call computes in (``space="auto"``: sample when d > n; minibatch: feature)."""
    if opts.space == "sample" and opts.estimator == "minibatch":
        raise IncompatibleParametersError(
            key="space", value="sample",
            reason="the minibatch estimator works on minibatches of rows in feature space; sample space serves the "
                   "biased and unbiased estimators")
    if opts.space != "auto":
        return opts.space
    return "sample" if opts.estimator != "minibatch" and prefer_sample_space(*X.shape) else "feature"


def _sample_subsets(X: Features, subsets, opts, stats: KernelStatistics | None) -> CKAResult:
    index_cols, projections, kinds = _split_subsets(subsets, X.n_neurons)
    if opts.estimator == "unbiased" and X.n_samples < 4:
        raise InvalidFeaturesError(where=X.where, problem=f"the unbiased HSIC needs at least 4 samples; got "
                                                          f"{X.n_samples}")
    stats = stats if stats is not None else kernel_statistics(X, opts.memory_mb)
    index = [(j, index_cols[i]) for j, (kind, i) in enumerate(kinds) if kind == "index"]
    terms = sample_space_terms(X, stats, index, _projection_families(kinds, projections), opts.estimator,
                               opts.memory_mb)
    kl, kk, ll, spread, size = (np.array(v, dtype=float) for v in zip(*(terms[j] for j in range(len(kinds)))))
    layer_constant = bool(_constant(stats.spread.sum(), stats.size.sum()))
    result = _finish(kl, kk, ll, opts.estimator, stats.n, opts.on_degenerate, _constant(spread, size), layer_constant)
    result.space = "sample"
    return result


def _check_statistics(statistics: CKAStatistics, estimator: str, n: int, d: int, space: str) -> None:
    if not isinstance(statistics, CKAStatistics):
        raise InvalidParameterError(key="statistics", value=statistics,
                                    expected="the CKAStatistics returned by cka_statistics(X)")
    if statistics.estimator != estimator:
        raise IncompatibleParametersError(
            key="statistics", value=statistics,
            reason=f"they were taken for estimator={statistics.estimator!r}, not {estimator!r}; call "
                   f"cka_statistics(X, estimator={estimator!r})")
    if (statistics.n_samples, statistics.n_neurons) != (n, d):
        raise IncompatibleParametersError(
            key="statistics", value=statistics,
            reason=f"they were taken over features of shape ({statistics.n_samples}, {statistics.n_neurons}), "
                   f"but X has shape ({n}, {d}); they belong to other features")
    if statistics.space != space:
        raise IncompatibleParametersError(
            key="statistics", value=statistics,
            reason=f"they were taken in {statistics.space} space, and this call computes in {space} space; call "
                   f"cka_statistics(X, space={space!r})")


def subset_cka(
    X,
    subsets: Sequence,
    estimator: str = _CKA["estimator"],
    *,
    batch_size: int = _CKA["batch_size"],
    shuffle_seed: int = _CKA["shuffle_seed"],
    block_rows: int | None = _CKA["block_rows"],
    on_degenerate: OnDegenerate = _CKA["on_degenerate"],
    statistics: CKAStatistics | None = None,
    space: Space = _CKA["space"],
    memory_mb: int = _CKA["memory_mb"],
) -> CKAResult:
    """Linear CKA between X[:, S] (or X @ P) and X, for many subsets, from one pass over X.

    Parameters
    ----------
    X : array of shape (n_samples, n_neurons), torch tensor, zarr array or featstore.Group
        The layer's features; a group is streamed in chunk-aligned row blocks.
    subsets : sequence
        Each element is a 1-D integer array of neuron indices, or a 2-D projection
        matrix of shape (n_neurons, k) (``pca``/``randproj`` draws).
    estimator : {"biased", "unbiased", "minibatch"}
        ``biased`` is the appendix's definition (default).
    batch_size : int
        Minibatch size of the ``minibatch`` estimator.
    shuffle_seed : int
        Seed of the row shuffle ``minibatch`` cuts its minibatches from (the order depends
        on the rows' content, not on how they are stored).
    block_rows : int, optional
        Rows per streamed block (the value does not change the result).
    on_degenerate : {"nan", "raise"}
        What to do with subsets whose CKA is undefined (constant features): NaN, flagged in
        ``.degenerate``, or an error.
    statistics : CKAStatistics, optional
        ``cka_statistics(X, estimator)`` computed earlier on these same features: the
        pass over X is skipped (projections under ``unbiased`` still read X).
    space : {"auto", "feature", "sample"}
        feature: the d x d Gram; sample: the n x n kernels, streamed over column blocks (nested
        prefixes of one order cost one pass over the columns); auto: sample when d > n (not
        for ``minibatch``). Recorded in the result; the value does not depend on it.
    memory_mb : int
        Sample space: MB of feature columns held at once (the n x n kernels come on top).

    Returns
    -------
    CKAResult
        One value per subset, in order, with the estimator's name.
    """
    opts = _options(estimator=estimator, batch_size=batch_size, shuffle_seed=shuffle_seed, block_rows=block_rows,
                    on_degenerate=on_degenerate, space=space, memory_mb=memory_mb)
    X = as_features(X)
    where = _space(opts, X)
    if statistics is not None:
        _check_statistics(statistics, opts.estimator, X.n_samples, X.n_neurons, where)
    if where == "sample":
        return _sample_subsets(X, subsets, opts, statistics.sums if statistics is not None else None)
    M, projections, kinds = _subset_matrix(subsets, X.n_neurons)
    return ESTIMATORS[opts.estimator].subsets(X, M, projections, kinds, opts,
                                              statistics.sums if statistics is not None else None)


def _minibatches(blocks: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive rows in minibatches of exactly ``batch_size``; a ragged tail is dropped."""
    pending: list[np.ndarray] = []
    have = 0
    for block in blocks:
        pending.append(block)
        have += len(block)
        while have >= batch_size:
            rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield rows[:batch_size]
            rest = rows[batch_size:]
            pending, have = ([rest] if len(rest) else []), len(rest)


def cross_cka(X, Y, estimator: str = _CKA["estimator"], *, subsets: Sequence | None = None,
              batch_size: int = _CKA["batch_size"], shuffle_seed: int = _CKA["shuffle_seed"],
              block_rows: int | None = _CKA["block_rows"],
              on_degenerate: OnDegenerate = _CKA["on_degenerate"]) -> CKAResult:
    """CKA between two feature sets over the same samples (two layers, or two models).

    X, Y : arrays with equal rows, or featstore groups; for groups, dataset, split and
    sample ids must match (checked, not assumed). ``subsets`` (of X's neurons) gives one
    value per subset of X against all of Y; default: X against Y.
    """
    opts = _options(estimator=estimator, batch_size=batch_size, shuffle_seed=shuffle_seed, block_rows=block_rows,
                    on_degenerate=on_degenerate)
    _check_same_samples(X, Y)
    fx, fy = as_features(X, where="X"), as_features(Y, where="Y")
    subsets = [np.arange(fx.n_neurons)] if subsets is None else list(subsets)
    M, projections, kinds = _subset_matrix(subsets, fx.n_neurons)
    mats = [M[:, j] for j in range(M.shape[1])] if M is not None else []

    def select(block, kind, k):
        return block[:, mats[k].astype(bool)] if kind == "index" else block @ projections[k]

    def pairs():
        for a, b in zip(fx.blocks(opts.block_rows), fy.blocks(opts.block_rows)):
            if len(a) != len(b):
                raise InvalidFeaturesError(problem="X and Y stream blocks of different lengths")
            yield a, b

    return ESTIMATORS[opts.estimator].pairs(pairs, select, kinds, opts)


def _check_same_samples(X, Y) -> None:
    nx, ny = (int(A.n_samples) if hasattr(A, "n_samples") else len(A) for A in (X, Y))
    if nx != ny:
        raise InvalidFeaturesError(problem=f"X has {nx} samples and Y has {ny}; CKA compares the same samples")
    if hasattr(X, "sample_ids") and hasattr(Y, "sample_ids"):
        for key in ("dataset", "split"):
            if getattr(X.spec, key) != getattr(Y.spec, key):
                raise InvalidFeaturesError(problem=f"groups differ in {key}: {getattr(X.spec, key)!r} vs {getattr(Y.spec, key)!r}")
        ix, iy = X.sample_ids, Y.sample_ids
        if not np.array_equal(ix, iy):
            first = int(np.argmax(ix != iy))
            raise InvalidFeaturesError(problem=f"groups {X.name} and {Y.name} hold different samples or another order (first "
                f"difference at row {first}: {ix[first]!r} vs {iy[first]!r}); build both with the same "
                f"--limit and --seed")


def linear_cka(Y: np.ndarray, Z: np.ndarray) -> float:
    """Biased linear CKA of two in-memory feature matrices (feature-space formula)."""
    return float(cross_cka(np.asarray(Y), np.asarray(Z), "biased", on_degenerate="raise")[0])
