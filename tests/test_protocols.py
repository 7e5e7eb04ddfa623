"""Probe protocols beside the paper's SGD: the lr x weight-decay grid in one SGD pass (against
separate SGD fits) and the kNN solver (against scikit-learn's KNeighborsClassifier and a
literal re-implementation of DINOv2's weighted vote)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from featstore import errors
from probes import SubsetProbes

from .test_lbfgs import draw_inputs

KW = dict(device="cpu", verbose=False)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, d, C = 560, 32, 5
    W = rng.normal(size=(d, C))
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X @ W + rng.normal(size=(n, C))).argmax(1)
    return X[:400], y[:400], X[400:], y[400:]


# ----------------------------------------------------------------------------- the lr x weight-decay grid

GRID = dict(mode="random", fractions=(0.1, 0.5, 0.9), seeds=(0, 1), epochs=4, lr_step=2, **KW)


def test_the_lr_weight_decay_grid_equals_separate_sgd_fits(data):
    Xtr, ytr, Xte, yte = data
    lrs, wds = (0.01, 0.3), (0.0, 0.01)
    grid = SubsetProbes(**GRID, lrs=lrs, weight_decays=wds).fit(Xtr, ytr)
    res = grid.evaluate(Xte, yte)
    alone = {(lr, wd): SubsetProbes(**GRID, lr=lr, weight_decay=wd).fit(Xtr, ytr) for lr in lrs for wd in wds}
    val = np.stack([alone[p].val_accuracy_ for p in alone], 1)  # (draws, pairs) in the grid's order
    chosen = [list(alone)[j] for j in val.argmax(1)]  # the first best pair of each draw
    assert list(zip(res["lr"], res["weight_decay"])) == chosen
    assert len(set(chosen)) > 1  # the grid chose differently for different draws: the test can tell
    for di, pair in enumerate(chosen):
        w, b = grid.probe_weights(di)
        w_alone, b_alone = alone[pair].probe_weights(di)
        # the same products in the same batches, the same update: bit for bit
        assert np.array_equal(w, w_alone) and np.array_equal(b, b_alone), (di, pair)
        assert grid.val_accuracy_[di] == alone[pair].val_accuracy_[di]
        assert grid.best_epoch_[di] == alone[pair].best_epoch_[di]
    assert "weight_decay" in res and grid.evaluate(Xte, yte)["test_accuracy"].equals(res["test_accuracy"])


def test_a_pair_a_draw_diverged_under_is_never_its_choice():
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(300, 16)) * 1e17).astype(np.float32)  # lr = 1000 overflows on these
    y = rng.integers(0, 3, 300)
    kw = dict(mode="random", fractions=(0.5,), seeds=(0,), epochs=2, **KW)
    with pytest.raises(errors.ProbeDivergedError):
        SubsetProbes(**kw, lr=1000.0).fit(X, y)
    est = SubsetProbes(**kw, lrs=(1000.0, 1e-30)).fit(X, y)  # the diverging pair first: ties cannot pick it
    assert (est.solver_records_["lr"] == 1e-30).all()
    with pytest.raises(errors.ProbeDivergedError, match="lr=500"):  # every pair diverged: no measurement
        SubsetProbes(**kw, lrs=(1000.0, 500.0)).fit(X, y)


@pytest.mark.parametrize("params, key", [
    (dict(lrs=[]), "lrs"), (dict(lrs=[0.1, 0.1]), "lrs"), (dict(lrs=[-1.0]), "lrs"), (dict(lrs="0.1"), "lrs"),
    (dict(weight_decays=[2.0]), "weight_decays"), (dict(solver="lbfgs", lrs=[0.1]), "lrs"),
    (dict(solver="ridge", weight_decays=[0.0]), "weight_decays"), (dict(solver="knn", ks=[0]), "ks"),
    (dict(solver="knn", knn_weights="cosine"), "knn_weights"), (dict(solver="knn", precision="bf16"), "precision"),
    (dict(solver="knn", ks=[400]), "ks"),
])
def test_protocol_values_are_checked_before_any_work(data, params, key):
    Xtr, ytr, _, _ = data
    est = SubsetProbes(mode="random", fractions=(0.5,), seeds=(0,), **{**KW, **params})
    with pytest.raises(errors.FeatstoreError, match=key):
        est.fit(Xtr, ytr)
    assert not hasattr(est, "batches_")


# ----------------------------------------------------------------------------- kNN

KNN = dict(solver="knn", fractions=(0.1, 0.5, 0.9), seeds=(0, 1), ks=(3, 7, 15), **KW)


@pytest.mark.parametrize("mode", ["random", "prefix", "pca", "randproj"])
@pytest.mark.parametrize("weights", ["distance", "uniform"])
def test_each_knn_draw_equals_scikit_learn(data, mode, weights):
    Xtr, ytr, Xte, yte = data
    est = SubsetProbes(mode=mode, knn_weights=weights, **KNN).fit(Xtr, ytr)
    votes = est.decision_function(Xte)
    res = est.evaluate(Xte, yte)
    tr, va = est.train_indices_, est.val_indices_
    for di in range(len(est.draws_)):
        A, B = draw_inputs(est, di, Xtr), draw_inputs(est, di, Xte)
        fits = {k: KNeighborsClassifier(n_neighbors=k, weights=weights, metric="cosine", algorithm="brute")
                .fit(A[tr], ytr[tr]) for k in (3, 7, 15)}
        val = [fits[k].score(A[va], ytr[va]) for k in fits]
        assert est.knn_k_[di] == list(fits)[int(np.argmax(val))], est.draws_[di]  # chosen on validation
        assert est.val_accuracy_[di] == pytest.approx(max(val))
        k = int(est.knn_k_[di])
        sk = fits[k]
        assert np.array_equal(votes[:, di].argmax(1), sk.predict(B)), est.draws_[di]
        # the votes, normalised, are scikit-learn's probabilities, where the k-th neighbour is not a float
        # tie with the next (1 / distance amplifies float32 rounding where a neighbour is almost the query)
        clear = _clear_of_ties(A[tr], B, k, weights)
        assert clear.mean() > 0.95
        np.testing.assert_allclose((votes[:, di] / votes[:, di].sum(1, keepdims=True))[clear],
                                   sk.predict_proba(B)[clear], rtol=1e-2, atol=1e-4)
        assert res["test_accuracy"][di] == pytest.approx(sk.score(B, yte))
    assert (res["knn_k"] == est.knn_k_).all() and res["train_loss"].isna().all()


def _clear_of_ties(train, queries, k, weights, margin=1e-5):
    """The queries whose k-th and (k+1)-th most cosine-similar train rows differ by more than
    ``margin`` (float64), so their k neighbours are the same set at any float rounding, and, for
    distance weights, whose nearest is farther than ``margin`` (1 / distance, and scikit-learn's
    rule for a neighbour at distance 0, turn float32 rounding there into any weight)."""
    def normalize(a):
        a = a.astype(np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)

    sims = -np.sort(-(normalize(queries) @ normalize(train).T), axis=1)
    return (sims[:, k - 1] - sims[:, k] > margin) & ((1 - sims[:, 0] > margin) | (weights != "distance"))


def _dinov2_votes(train, labels, queries, k, max_k, T, C):
    """DINOv2's eval/knn.py, literally: L2-normalised features, the max_k most similar train rows,
    softmax(similarities / T) over them, one-hot labels weighted and summed over the first k."""
    def normalize(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sims = normalize(queries.astype(np.float64)) @ normalize(train.astype(np.float64)).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :max_k]
    top = np.take_along_axis(sims, idx, 1)
    e = np.exp((top - top.max(1, keepdims=True)) / T)
    soft = e / e.sum(1, keepdims=True)
    onehot = np.eye(C)[labels[idx]]  # (q, max_k, C)
    return (onehot * soft[:, :, None])[:, :k].sum(1)


def test_the_temperature_vote_is_dinov2s(data):
    Xtr, ytr, Xte, yte = data
    est = SubsetProbes(mode="random", knn_weights="temperature", knn_temperature=0.1, **KNN).fit(Xtr, ytr)
    votes = est.decision_function(Xte)
    tr = est.train_indices_
    for di in range(len(est.draws_)):
        theirs = _dinov2_votes(draw_inputs(est, di, Xtr)[tr], ytr[tr], draw_inputs(est, di, Xte), int(est.knn_k_[di]),
                               15, 0.1, 5)
        np.testing.assert_allclose(votes[:, di], theirs, rtol=1e-4, atol=1e-6)
        assert np.array_equal(votes[:, di].argmax(1), theirs.argmax(1))


def test_few_shot_knn_votes_among_each_seeds_shots(data):
    Xtr, ytr, Xte, _ = data
    est = SubsetProbes(mode="random", knn_weights="distance", shots=4, **{**KNN, "ks": (3, 5)}).fit(Xtr, ytr)
    votes = est.decision_function(Xte)
    rows = {seed: est.train_rows(seed) for seed in (0, 1)}
    assert not np.array_equal(rows[0], rows[1]) and len(rows[0]) == 4 * 5
    for di, draw in enumerate(est.draws_):
        r = rows[draw.seed]
        sk = KNeighborsClassifier(n_neighbors=int(est.knn_k_[di]), weights="distance", metric="cosine",
                                  algorithm="brute").fit(draw_inputs(est, di, Xtr)[r], ytr[r])
        assert np.array_equal(votes[:, di].argmax(1), sk.predict(draw_inputs(est, di, Xte))), draw


def test_knn_probes_hold_no_weights(data):
    Xtr, ytr, _, _ = data
    est = SubsetProbes(mode="random", **KNN).fit(Xtr, ytr)
    with pytest.raises(errors.IncompatibleParametersError, match="no weights"):
        est.probe_weights(0)
