"""Streaming CKA against the slow, obvious n x n formulas."""

from __future__ import annotations

import numpy as np
import pytest

import probes
from featstore import errors
from probes._cka import _row_order


# ------------------------------------------------------------------ slow references, written the obvious way


def ref_biased_cka(Y, Z):
    """Appendix A.1: K = YYᵀ, L = ZZᵀ, K' = HKH, L' = HLH, HSIC = vec(K')·vec(L')/(n-1)²."""
    n = len(Y)
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = Y @ Y.T, Z @ Z.T
    Kc, Lc = H @ K @ H, H @ L @ H

    def hsic(A, B):
        return (A.ravel() @ B.ravel()) / (n - 1) ** 2

    return hsic(Kc, Lc) / np.sqrt(hsic(Kc, Kc) * hsic(Lc, Lc))


def ref_unbiased_hsic(K, L):
    """Song et al. 2007, eq. (5), with explicit loops over the double and triple sums' pieces."""
    n = len(K)
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    ones = np.ones(n)
    term1 = np.trace(Kt @ Lt)
    term2 = (ones @ Kt @ ones) * (ones @ Lt @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ Kt @ Lt @ ones)
    return (term1 + term2 - term3) / (n * (n - 3))


def ref_unbiased_cka(Y, Z):
    K, L = Y @ Y.T, Z @ Z.T
    return ref_unbiased_hsic(K, L) / np.sqrt(ref_unbiased_hsic(K, K) * ref_unbiased_hsic(L, L))


def ref_minibatch_cka(Y, Z, batch_size, order=None):
    """Nguyen et al.: the unbiased HSIC terms averaged over equal minibatches of the rows in
    ``order`` (default: as given), then the ratio."""
    if order is not None:
        Y, Z = Y[order], Z[order]
    kl = kk = ll = 0.0
    batches = len(Y) // batch_size  # a ragged tail is dropped
    for b in range(batches):
        y, z = Y[b * batch_size : (b + 1) * batch_size], Z[b * batch_size : (b + 1) * batch_size]
        K, L = y @ y.T, z @ z.T
        kl += ref_unbiased_hsic(K, L)
        kk += ref_unbiased_hsic(K, K)
        ll += ref_unbiased_hsic(L, L)
    return (kl / batches) / np.sqrt((kk / batches) * (ll / batches))


# the slow references of every registered estimator with whole-split sums (a new one needs one here)
REFERENCES = {"biased": ref_biased_cka, "unbiased": ref_unbiased_cka}
WHOLE_SPLIT = [(name, REFERENCES[name]) for name, entry in probes.CKA_ESTIMATORS.items() if entry.sums is not None]


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    # correlated, non-centred, ReLU-like features: the realistic, numerically harder case
    latent = rng.normal(size=(300, 8))
    X = np.maximum(latent @ rng.normal(size=(8, 40)) + rng.normal(scale=0.5, size=(300, 40)) + 2.0, 0)
    return X


@pytest.fixture(scope="module")
def subsets():
    rng = np.random.default_rng(1)
    perm = rng.permutation(40)
    return [perm[:k] for k in (1, 2, 5, 10, 20, 39, 40)] + [rng.permutation(40)[:7]]


def test_biased_equals_appendix_formula(X, subsets):
    got = probes.subset_cka(X, subsets)
    assert got.estimator == "biased" and got.n_samples == 300
    want = np.array([ref_biased_cka(X[:, s], X) for s in subsets])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_unbiased_equals_song_estimator(X, subsets):
    got = probes.subset_cka(X, subsets, estimator="unbiased")
    want = np.array([ref_unbiased_cka(X[:, s], X) for s in subsets])
    assert got.estimator == "unbiased"
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("batch_size", [32, 64, 100])
def test_minibatch_equals_nguyen_average(X, subsets, batch_size):
    got = probes.subset_cka(X, subsets, estimator="minibatch", batch_size=batch_size, block_rows=37, shuffle_seed=3)
    order = _row_order(X, 3)  # the shuffle the minibatches are cut from (its own properties: below)
    want = np.array([ref_minibatch_cka(X[:, s], X, batch_size, order) for s in subsets])
    assert got.estimator == "minibatch" and got.batch_size == batch_size and got.shuffle_seed == 3
    assert got.n_samples == (300 // batch_size) * batch_size  # ragged tail dropped
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("estimator", list(probes.CKA_ESTIMATORS))
def test_projections_equal_reference(X, estimator):
    rng = np.random.default_rng(2)
    P = rng.uniform(size=(40, 6))
    P /= np.linalg.norm(P, axis=0)
    got = probes.subset_cka(X, [P, np.arange(5)], estimator=estimator, batch_size=50)
    ref = {"biased": ref_biased_cka, "unbiased": ref_unbiased_cka,
           "minibatch": lambda a, b: ref_minibatch_cka(a, b, 50, _row_order(X, 0))}[estimator]
    np.testing.assert_allclose(got[0], ref(X @ P, X), rtol=1e-6)
    np.testing.assert_allclose(got[1], ref(X[:, :5], X), rtol=1e-6)


@pytest.mark.parametrize("estimator", list(probes.CKA_ESTIMATORS))
def test_identity_and_full_rank_rotation(X, subsets, estimator):
    full = probes.subset_cka(X, [np.arange(40)], estimator=estimator)
    np.testing.assert_allclose(full[0], 1.0, rtol=1e-9)
    Q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(40, 40)))
    # a full-rank orthogonal projection of the layer is the layer, up to rotation
    np.testing.assert_allclose(probes.subset_cka(X, [Q], estimator=estimator)[0], 1.0, rtol=1e-9)


@pytest.mark.parametrize("estimator", [name for name, _ in WHOLE_SPLIT])  # minibatch: scaled or rotated rows are
def test_scaling_and_rotation_invariance(X, subsets, estimator):         # other bits, so another shuffle
    Q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(40, 40)))
    base = probes.subset_cka(X, subsets, estimator=estimator)
    np.testing.assert_allclose(np.asarray(probes.subset_cka(3.5 * X, subsets, estimator=estimator)),
                               np.asarray(base), rtol=1e-8)
    # CKA(Y Q, Z) = CKA(Y, Z) for orthogonal Q
    a = probes.cross_cka(X @ Q, X[:, :10], estimator=estimator)[0]
    b = probes.cross_cka(X, X[:, :10], estimator=estimator)[0]
    np.testing.assert_allclose(a, b, rtol=1e-8)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 299, 300, 10_000])
def test_same_value_for_any_chunk_size(X, subsets, block_rows):
    for estimator in ("biased", "unbiased", "minibatch"):
        a = probes.subset_cka(X, subsets, estimator=estimator, block_rows=block_rows, batch_size=64)
        b = probes.subset_cka(X, subsets, estimator=estimator, batch_size=64)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10)


def test_cross_group_cka_checks_sample_order(tmp_path, tiny):
    import featstore

    store = tmp_path / "s.zarr"
    featstore.build(**tiny, layers="pre_logits,layer2", splits="train", store=store, dtype="float32")
    s = featstore.open(store)
    a, b = s.group(layer="pre_logits"), s.group(layer="layer2")
    got = probes.cross_cka(a, b)
    np.testing.assert_allclose(got[0], ref_biased_cka(a.numpy().astype(float), b.numpy().astype(float)), rtol=1e-6)
    np.testing.assert_allclose(probes.subset_cka(a, [np.arange(10)])[0],
                               ref_biased_cka(a.numpy()[:, :10].astype(float), a.numpy().astype(float)), rtol=1e-6)
    (other,) = featstore.build(**tiny, layers="layer2", splits="train", limit=20, store=store, dtype="float32")
    with pytest.raises(errors.InvalidFeaturesError, match="samples"):
        probes.cross_cka(a, other)
    with pytest.raises(errors.InvalidFeaturesError, match="different samples or another order"):
        perm = np.random.default_rng(0).permutation(a.n_samples)

        class Shuffled:  # same rows, other order, same metadata otherwise
            spec, n_samples, n_neurons, name = b.spec, b.n_samples, b.n_neurons, "shuffled"
            sample_ids = b.sample_ids[perm]

        probes._cka._check_same_samples(a, Shuffled)


def test_degenerate_subsets_are_nan_and_flagged(X):
    Xd = X.copy()
    Xd[:, 3] = 7.0  # a dead (constant) neuron
    for estimator in probes.CKA_ESTIMATORS:
        r = probes.subset_cka(Xd, [np.array([3]), np.arange(10)], estimator=estimator)
        assert np.isnan(r[0]) and np.isfinite(r[1]) and r.degenerate.tolist() == [True, False]
        with pytest.raises(errors.InvalidFeaturesError, match="subset 0 has no defined CKA"):
            probes.subset_cka(Xd, [np.array([3])], estimator=estimator, on_degenerate="raise")


def test_a_quiet_live_neuron_keeps_its_cka(X):
    """CKA does not depend on a subset's scale: a neuron scaled by 1e-6 is live, not constant."""
    Xq = X.copy()
    Xq[:, 5] *= 1e-6
    P = np.zeros((40, 1))
    P[5, 0] = 1.0  # the same neuron, as a projection
    for estimator, reference in WHOLE_SPLIT:
        r = probes.subset_cka(Xq, [np.array([5]), P], estimator=estimator)
        assert not r.degenerate.any()
        np.testing.assert_allclose(np.asarray(r), reference(Xq[:, [5]], Xq), rtol=1e-6)
    r = probes.subset_cka(Xq, [np.array([5])], estimator="minibatch", batch_size=50)
    assert not r.degenerate.any()
    np.testing.assert_allclose(r[0], ref_minibatch_cka(Xq[:, [5]], Xq, 50, _row_order(Xq, 0)), rtol=1e-6)
    c = probes.cross_cka(Xq[:, [5]], Xq)
    assert not c.degenerate.any() and c[0] == pytest.approx(ref_biased_cka(Xq[:, [5]], Xq), rel=1e-6)


def test_minibatch_cka_shuffles_rows_by_content():
    """Class-sorted rows (as an image-folder store holds them): consecutive minibatches are
    one class each and miss the between-class structure; the seeded shuffle agrees with the
    order-free unbiased estimator, and any stored order of the same rows gives the same value."""
    rng = np.random.default_rng(0)
    n, d, C = 4000, 64, 10
    y = np.sort(rng.integers(0, C, n))
    Xs = rng.normal(size=(C, d))[y] + rng.normal(size=(n, d))
    subs = [rng.permutation(d)[:8] for _ in range(5)]
    unbiased = np.asarray(probes.subset_cka(Xs, subs, estimator="unbiased"))
    shuffled = probes.subset_cka(Xs, subs, estimator="minibatch", batch_size=256)
    consecutive = np.array([ref_minibatch_cka(Xs[:, s], Xs, 256) for s in subs])
    assert np.abs(np.asarray(shuffled) - unbiased).max() < 0.01
    assert np.abs(consecutive - unbiased).min() > 0.04  # what the stored order alone would give
    again = probes.subset_cka(Xs[rng.permutation(n)], subs, estimator="minibatch", batch_size=256)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(shuffled))
    other = probes.subset_cka(Xs, subs, estimator="minibatch", batch_size=256, shuffle_seed=1)
    assert other.shuffle_seed == 1 and not np.array_equal(np.asarray(other), np.asarray(shuffled))
    order = _row_order(Xs, 0)
    assert sorted(order.tolist()) == list(range(n))
    assert np.bincount(y[order[:256]], minlength=C).min() > 0  # every class in the first minibatch
    # cross_cka cuts X and Y into the same minibatches, shuffled by the reference side's rows
    A, B = Xs[:, subs[0]], Xs[:, :20]
    got = probes.cross_cka(A, B, estimator="minibatch", batch_size=256)[0]
    assert got == pytest.approx(ref_minibatch_cka(A, B, 256, _row_order(B, 0)), rel=1e-9)
    assert abs(got - probes.cross_cka(A, B, estimator="unbiased")[0]) < 0.01


def test_bad_input(X):
    with pytest.raises(errors.UnknownNameError, match="estimator: Unknown CKA estimator 'rbf'; known: biased, minibatch, unbiased"):
        probes.subset_cka(X, [np.arange(3)], estimator="rbf")
    with pytest.raises(errors.InvalidParameterError, match=r"subsets\[0\]: expected .* neuron indices in 0\.\.39; got \[0, 40\]"):
        probes.subset_cka(X, [np.array([0, 40])])
    with pytest.raises(errors.InvalidParameterError, match=r"subsets\[0\]: expected a non-empty"):
        probes.subset_cka(X, [np.array([], dtype=int)])
    with pytest.raises(errors.InvalidParameterError, match=r"batch_size: expected an integer in \[4, 1048576\]; got 0"):
        probes.subset_cka(X, [np.arange(3)], estimator="minibatch", batch_size=0)
    with pytest.raises(errors.InvalidParameterError, match=r"on_degenerate: expected one of 'nan', 'raise'"):
        probes.subset_cka(X, [np.arange(3)], on_degenerate="ignore")
    bad = X.copy()
    bad[5, 2] = np.nan
    with pytest.raises(errors.InvalidFeaturesError, match="NaN/Inf .*row 5, neuron 2"):
        probes.subset_cka(bad, [np.arange(3)])
    with pytest.raises(errors.InvalidFeaturesError, match="empty split"):
        probes.subset_cka(np.zeros((0, 4)), [np.arange(3)])


@pytest.mark.parametrize("estimator", list(probes.CKA_ESTIMATORS))
def test_every_registered_estimator_scores_subsets_and_pairs(X, subsets, estimator):
    """Each registry entry serves subset_cka and cross_cka with one definition: a subset of X
    against X scores the same through both."""
    chosen = subsets[:3]
    one = np.asarray(probes.subset_cka(X, chosen, estimator=estimator, batch_size=64))
    two = np.asarray(probes.cross_cka(X, X, estimator=estimator, subsets=chosen, batch_size=64))
    np.testing.assert_allclose(one, two, rtol=1e-9)
    entry = probes.CKA_ESTIMATORS[estimator]
    if entry.sums is None:
        with pytest.raises(errors.IncompatibleParametersError, match="no reusable whole-split statistics"):
            probes.cka_statistics(X, estimator)
    else:
        assert probes.cka_statistics(X, estimator).estimator == estimator


def test_corrupt_group_is_refused_with_its_path(tmp_path, tiny):
    import featstore

    store = tmp_path / "s.zarr"
    (g,) = featstore.build(**tiny, splits="train", store=store)
    (store / g.name / "features" / "c" / "0" / "0").write_bytes(b"garbage")
    with pytest.raises(errors.CorruptGroupError, match=str(store / g.name)):
        probes.subset_cka(featstore.open(store).group(g.name), [np.arange(3)])


@pytest.mark.parametrize("estimator, reference", WHOLE_SPLIT)
def test_statistics_taken_once_serve_many_calls(X, subsets, estimator, reference):
    stats = probes.cka_statistics(X, estimator, block_rows=37)
    assert (stats.estimator, stats.n_samples, stats.n_neurons) == (estimator, 300, 40)
    P = np.random.default_rng(3).normal(size=(40, 5))
    for chosen in (subsets[:3], subsets[3:], [P, subsets[0]]):
        got = probes.subset_cka(X, chosen, estimator=estimator, statistics=stats, block_rows=37)
        want = [reference(X[:, s] if s.ndim == 1 else X @ s, X) for s in chosen]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(probes.subset_cka(X, chosen, estimator=estimator, block_rows=37)))


def test_statistics_must_match_estimator_and_features(X, subsets):
    stats = probes.cka_statistics(X)
    with pytest.raises(errors.InvalidParameterError, match="estimator='biased', not 'unbiased'"):
        probes.subset_cka(X, subsets, estimator="unbiased", statistics=stats)
    with pytest.raises(errors.InvalidParameterError, match=r"shape \(300, 40\), but X has shape \(299, 40\)"):
        probes.subset_cka(X[1:], subsets, statistics=stats)
    with pytest.raises(errors.InvalidParameterError, match="no reusable whole-split statistics"):
        probes.cka_statistics(X, "minibatch")
    with pytest.raises(errors.UnknownNameError, match="nope"):
        probes.cka_statistics(X, "nope")
    with pytest.raises(errors.InvalidParameterError, match="expected the CKAStatistics returned by cka_statistics"):
        probes.subset_cka(X, subsets, statistics={"n": 3})


@pytest.mark.parametrize("estimator, reference", WHOLE_SPLIT)
def test_prefixes_of_one_basis_equal_separate_projections(X, estimator, reference):
    """A pca / randproj family's draws are views basis[:, :k]: they share the products (biased)
    or the one pass (unbiased) of their basis, with the values of separate projections."""
    rng = np.random.default_rng(4)
    basis = rng.normal(size=(40, 30)).astype(np.float32)
    flipped = basis[:, ::-1]  # pca-least style: a reversed view
    views = [basis[:, :k] for k in (1, 4, 30, 9)] + [basis[:, 2:7], flipped[:, :5], flipped[:, :12]]
    copies = [np.array(v, copy=True) for v in views]
    got = probes.subset_cka(X, views + [np.arange(5)], estimator=estimator)
    alone = probes.subset_cka(X, copies + [np.arange(5)], estimator=estimator)
    np.testing.assert_allclose(np.asarray(got), np.asarray(alone), rtol=1e-10)
    want = [reference(X @ v.astype(np.float64), X) for v in views]
    np.testing.assert_allclose(np.asarray(got)[:-1], want, rtol=1e-6)
    if estimator == "unbiased":  # and the streamed pair formula, projection by projection
        from probes._cka import _pair_moments_terms

        for v, value in zip(views, np.asarray(got)):
            a, b, c = _pair_moments_terms([(X, X @ v.astype(np.float64))])
            assert value == pytest.approx(a / np.sqrt(b * c), rel=1e-9)


# ----------------------------------------------------------------------------- wide layers (d > n)


def _nn_cka(X, S, estimator):
    """The n x n formulas, literally: K = Y Yᵀ, L = Z Zᵀ (Z = Y[:, S] or Y @ P), centred with H."""
    from probes._cka import _hsic1_dense

    n = len(X)
    Y = np.asarray(X, dtype=np.float64)
    Z = Y[:, S] if np.ndim(S) == 1 else Y @ S
    K, L = Y @ Y.T, Z @ Z.T
    if estimator == "unbiased":
        return _hsic1_dense(K, L, n) / np.sqrt(_hsic1_dense(K, K, n) * _hsic1_dense(L, L, n))
    H = np.eye(n) - 1.0 / n
    Kc, Lc = H @ K @ H, H @ L @ H
    return (Kc * Lc).sum() / np.sqrt((Kc * Kc).sum() * (Lc * Lc).sum())


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_sample_space_cka_equals_the_nxn_formula_on_a_wide_layer(estimator):
    """d >> n: every subset kind (nested prefixes of two seeds' orders crossing the middle, a
    lone random subset, the whole layer, prefixes of one projection basis) against the n x n
    formulas; space="auto" picks sample space and says so; the feature-space path agrees."""
    rng = np.random.default_rng(3)
    n, d = 40, 900
    X = (rng.normal(size=(n, 6)) @ rng.normal(size=(6, d)) + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    X[:, 7] = 2.5  # a constant neuron
    orders = [rng.permutation(d) for _ in range(2)]
    subsets = [o[:k] for o in orders for k in (1, 9, 90, 450, 451, 810, d)] + [rng.permutation(d)[:33], np.array([7])]
    basis = rng.normal(size=(d, 12))
    subsets += [basis[:, :k] for k in (1, 5, 12)]
    got = probes.subset_cka(X, subsets, estimator, memory_mb=16)
    assert got.space == "sample"
    want = np.array([_nn_cka(X, S, estimator) for S in subsets[:-4]] + [np.nan]
                    + [_nn_cka(X, S, estimator) for S in subsets[-3:]])
    np.testing.assert_allclose(got.values, want, rtol=1e-6, atol=1e-7)
    assert list(np.flatnonzero(got.degenerate)) == [len(subsets) - 4]  # the constant neuron
    feature = probes.subset_cka(X, subsets, estimator, space="feature")
    assert feature.space == "feature"
    np.testing.assert_allclose(got.values, feature.values, rtol=1e-6, atol=1e-7)
    stats = probes.cka_statistics(X, estimator)  # reusable: the n x n kernel
    assert stats.space == "sample"
    np.testing.assert_allclose(probes.subset_cka(X, subsets, estimator, statistics=stats).values, got.values, rtol=1e-12)
    with pytest.raises(errors.IncompatibleParametersError, match="taken in sample space"):
        probes.subset_cka(X, subsets, estimator, statistics=stats, space="feature")
    with pytest.raises(errors.IncompatibleParametersError, match="space='sample'"):
        probes.subset_cka(X, subsets, "minibatch", space="sample")


def test_sample_space_cka_of_a_600_x_40000_layer_within_bounded_memory(tmp_path):
    """The issue's case: 600 x 40,000 float32 (the d x d Gram alone would be 12.8 GB), 22
    fractions x 2 seeds: equal to the n x n formula, peak memory (the process's, incl. imports)
    under 1.5 GB."""
    script = tmp_path / "wide.py"
    script.write_text(
        "import numpy as np, resource, probes\n"
        "rng = np.random.default_rng(0)\n"
        "n, d = 600, 40_000\n"
        "X = rng.normal(size=(n, 16)).astype(np.float32) @ rng.normal(size=(16, d)).astype(np.float32)\n"
        "X += rng.normal(size=(n, d)).astype(np.float32)\n"
        "subs = [p[:max(1, int(f * d))] for p in (rng.permutation(d) for _ in range(2)) for f in probes.PAPER_FRACTIONS]\n"
        "r = probes.subset_cka(X, subs)\n"
        "print(r.space, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
        "H = np.eye(n) - 1 / n\n"
        "Y = X.astype(np.float64)\n"
        "K = H @ (Y @ Y.T) @ H\n"
        "for j in (0, 6, 12, 19, 21, 30, 43):\n"
        "    Z = Y[:, subs[j]]\n"
        "    L = H @ (Z @ Z.T) @ H\n"
        "    print(r.values[j], (K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    space, peak_mb = lines[0].split()
    assert space == "sample" and int(peak_mb) < 1536, lines[0]
    pairs = np.array([[float(v) for v in line.split()] for line in lines[1:] if line])
    np.testing.assert_allclose(pairs[:, 0], pairs[:, 1], rtol=1e-6)
