"""The lbfgs solver against scikit-learn's LogisticRegression trained alone on each draw's inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import probes
from featstore import errors
from probes import SubsetProbes

KW = dict(solver="lbfgs", device="cpu", verbose=False, tol=1e-6)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, d, C = 3000, 32, 5
    means = rng.normal(size=(C, d)) * 0.5
    y = rng.integers(0, C, n)
    X = (means[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X[:1000], y[:1000], X[1000:], y[1000:]  # 2000 test rows: one image is 0.0005


def draw_inputs(est, di, X):
    """A draw's own inputs: its neurons' columns, or its projection."""
    draw = est.draws_[di]
    if draw.neurons is not None:
        return X[:, draw.neurons]
    fam = next(f for f in est.families_ if any(d is draw for d in f.draws))
    return X @ fam.basis[:, :draw.k]


def _objective(Z, y, W, b, C):
    """scikit-learn's lbfgs objective in its scaling: mean cross-entropy + ||W||^2 / (2 C n)."""
    L = Z.astype(np.float64) @ W + b
    L -= L.max(1, keepdims=True)
    logp = L - np.log(np.exp(L).sum(1, keepdims=True))
    return -logp[np.arange(len(Z)), y].mean() + (W ** 2).sum() / (2 * C * len(Z))


@pytest.mark.parametrize("mode", ["random", "prefix", "pca", "randproj"])
def test_each_lbfgs_draw_equals_scikit_learn_alone(data, mode):
    Xtr, ytr, Xte, yte = data
    C = 0.5
    est = SubsetProbes(mode=mode, fractions=(0.1, 0.5, 1.0), seeds=(0,), Cs=(C,), **KW).fit(Xtr, ytr)
    res = est.evaluate(Xte, yte)
    tr = est.train_indices_
    assert res["converged"].all() and (res["C"] == C).all() and (res["n_iter"] > 0).all()
    for di in range(len(est.draws_)):
        Z = draw_inputs(est, di, Xtr)[tr]
        sk = LogisticRegression(C=C, max_iter=10_000, tol=1e-8).fit(Z.astype(np.float64), ytr[tr])
        w, b = est.probe_weights(di)
        mine, theirs = _objective(Z, ytr[tr], w, b, C), _objective(Z, ytr[tr], sk.coef_.T, sk.intercept_, C)
        assert abs(mine - theirs) <= 1e-4 * theirs, (est.draws_[di], mine, theirs)
        assert abs(res["train_loss"][di] - theirs) <= 1e-4 * theirs
        acc = sk.score(draw_inputs(est, di, Xte).astype(np.float64), yte)
        assert abs(res["test_accuracy"][di] - acc) <= 0.002, (est.draws_[di], res["test_accuracy"][di], acc)


def test_each_draw_keeps_the_c_its_validation_rows_score_best(data):
    """The C grid: per draw, the C whose scikit-learn fit scores best on the validation rows (the
    first of a tie: the strongest penalty), trained from every train row but those."""
    Xtr, ytr, _, _ = data
    Cs = (1e-3, 1e-2, 1.0)
    est = SubsetProbes(mode="random", fractions=(0.05, 0.25, 1.0), seeds=(0,), Cs=Cs, **KW).fit(Xtr, ytr)
    tr, va = est.train_indices_, est.val_indices_
    chosen = est.evaluate(Xtr[:10], ytr[:10])["C"].to_numpy()
    for di in range(len(est.draws_)):
        Z = draw_inputs(est, di, Xtr)
        scores = [LogisticRegression(C=c, max_iter=10_000, tol=1e-8).fit(Z[tr].astype(np.float64), ytr[tr])
                  .score(Z[va].astype(np.float64), ytr[va]) for c in Cs]
        assert chosen[di] == Cs[int(np.argmax(scores))], (est.draws_[di], scores, chosen[di])
        assert est.val_accuracy_[di] == pytest.approx(max(scores), abs=1.5 / len(va))


def test_refit_trains_each_draw_again_on_train_and_validation_with_its_c(data):
    """refit (CLIP's protocol): each draw, its C chosen on the validation rows, equals scikit-learn
    trained on the train and validation rows with that C; the selection's validation accuracy stays."""
    Xtr, ytr, _, _ = data
    Cs = (1e-2, 1.0)
    kw = dict(mode="random", fractions=(0.1, 1.0), seeds=(0,), Cs=Cs, **KW)
    chosen = SubsetProbes(**kw).fit(Xtr, ytr)
    est = SubsetProbes(refit=True, **kw).fit(Xtr, ytr)
    np.testing.assert_array_equal(est.solver_records_["C"], chosen.solver_records_["C"])
    np.testing.assert_array_equal(est.val_accuracy_, chosen.val_accuracy_)
    rows = np.concatenate([est.train_indices_, est.val_indices_])
    for di in range(len(est.draws_)):
        C = est.solver_records_["C"][di]
        Z = draw_inputs(est, di, Xtr)[rows]
        sk = LogisticRegression(C=C, max_iter=10_000, tol=1e-8).fit(Z.astype(np.float64), ytr[rows])
        w, b = est.probe_weights(di)
        mine, theirs = _objective(Z, ytr[rows], w, b, C), _objective(Z, ytr[rows], sk.coef_.T, sk.intercept_, C)
        assert abs(mine - theirs) <= 1e-4 * theirs, (est.draws_[di], mine, theirs)


def test_a_full_rank_random_projection_reaches_the_full_layer_under_lbfgs(data):
    """Under SGD's 50 epochs the demo's randproj probes plateau below the full layer; a converged
    probe on any full-rank projection of the layer reads what the layer holds (to the test
    split's noise: its binomial standard error is 0.008; the penalty, weak here, is not
    rotation-invariant)."""
    Xtr, ytr, Xte, yte = data
    kw = {**KW, "Cs": (100.0,)}
    full = SubsetProbes(mode="prefix", fractions=(1.0,), include_full=False, **kw).fit(Xtr, ytr).score(Xte, yte)
    proj = SubsetProbes(mode="randproj", fractions=(1.0,), seeds=(0,), include_full=False, **kw).fit(Xtr, ytr)
    assert abs(proj.score(Xte, yte) - full) <= 0.01


def test_lbfgs_estimators_fit_together_as_alone(data):
    Xtr, ytr, Xte, _ = data
    make = lambda: [SubsetProbes(mode="random", fractions=(0.25, 1.0), seeds=(s,), Cs=(0.1, 1.0), **KW)  # noqa: E731
                    for s in (0, 1)]
    for j, a in zip(probes.fit_together(make(), Xtr, ytr), [e.fit(Xtr, ytr) for e in make()]):
        # the same optimum: each probe stops within tol of it wherever its batch moved it (a batch's
        # running probes move to batches of their own as the others converge)
        np.testing.assert_allclose(j.train_loss_, a.train_loss_, rtol=1e-7)
        np.testing.assert_allclose(j.decision_function(Xte), a.decision_function(Xte), atol=1e-3)
        np.testing.assert_array_equal(j.solver_records_["C"], a.solver_records_["C"])


def test_lbfgs_parameters_are_checked():
    with pytest.raises(errors.IncompatibleParametersError, match="solver 'lbfgs' runs at fp32"):
        SubsetProbes(solver="lbfgs", precision="bf16", device="cpu").check_params()
    with pytest.raises(errors.InvalidParameterError, match="Cs"):
        SubsetProbes(solver="lbfgs", Cs=(0.0,)).check_params()
    with pytest.raises(errors.InvalidParameterError, match="tol"):
        SubsetProbes(solver="lbfgs", tol="1e-4").check_params()
