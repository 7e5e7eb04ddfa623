"""probes.fit_together: many estimators in one pass of the engine, each as if fitted alone;
and the sweep's fits built on it (one per pairing, split by workers and memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipelines
import probes
from featstore import errors
from probes import SubsetProbes

from .test_probes import data, orders_of, train_alone  # noqa: F401 - the fixture is used by name

KW = dict(epochs=3, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=64, lr_step=2, lr_gamma=0.1, device="cpu",
          verbose=False, select_epoch="last")


def _estimators():
    """A sweep pairing's estimators: full-layer references under seeds 0..3 (random at
    fraction 1, as a sweep's), random under seeds 0 and 3 (fewer than the references: their
    dense draws and the references' fall in different streams), prefix, explicit subsets and
    a projection mode."""
    fr = (0.05, 0.25, 0.5, 0.8, 1.0)
    ests = [SubsetProbes(mode="random", fractions=(1.0,), seeds=(s,), include_full=False, **KW) for s in range(4)]
    ests += [SubsetProbes(mode="random", fractions=fr, seeds=(s,), include_full=False, **KW) for s in (0, 3)]
    ests += [SubsetProbes(mode="prefix", fractions=fr, include_full=False, **KW),
             SubsetProbes(subsets=[np.array([3, 7, 11]), np.arange(40)], include_full=False, **KW),
             SubsetProbes(mode="randproj", fractions=(0.1, 0.5), seeds=(2,), include_full=False, **KW)]
    return ests


def _assert_equals_lone_probe(est, di, Xtr, ytr, Xte, orders=None):
    """Draw ``di`` of a fitted ``est`` against nn.Linear + torch.optim.SGD trained alone on its
    neurons, from the estimator's own initial weights, in its seed's minibatch order."""
    draw = est.draws_[di]
    w0, b0 = est.initial_weights(di)
    orders = orders_of(est, draw, KW["epochs"]) if orders is None else orders
    lin = train_alone(Xtr, ytr, draw.neurons, w0, b0, orders, C=4, lr=KW["lr"], momentum=KW["momentum"],
                      wd=KW["weight_decay"], batch_size=KW["batch_size"], lr_step=KW["lr_step"],
                      lr_gamma=KW["lr_gamma"])
    with torch.no_grad():
        ref = lin(torch.from_numpy(Xte[:, draw.neurons])).numpy()
    assert np.abs(est.decision_function(Xte)[:, di] - ref).max() < 1e-4, (draw.mode, draw.k, draw.seed)


def test_each_estimator_of_a_joint_fit_equals_its_own_fit(data):
    """Every estimator handed back by fit_together holds the probes its own fit trains: the same
    draws, weights and logits to float rounding (the products are grouped with the others'), the
    same validation accuracy, best epoch and training loss; and its batches are its own."""
    Xtr, ytr, Xte, yte = data
    together = probes.fit_together(_estimators(), Xtr, ytr)
    alone = [est.fit(Xtr, ytr) for est in _estimators()]
    joint = sum(len(a.draws_) for a in alone)
    for j, a in zip(together, alone):
        assert [(d.mode, d.k, d.seed) for d in j.draws_] == [(d.mode, d.k, d.seed) for d in a.draws_]
        for dj, da in zip(j.draws_, a.draws_):
            np.testing.assert_array_equal(dj.neurons if dj.neurons is not None else dj.projection,
                                          da.neurons if da.neurons is not None else da.projection)
        assert len(j.batches_) == len(a.batches_) and j.joint_draws_ == joint
        np.testing.assert_allclose(j.decision_function(Xte), a.decision_function(Xte), atol=1e-4)
        for di in range(len(a.draws_)):
            for wj, wa in zip(j.probe_weights(di), a.probe_weights(di)):
                np.testing.assert_allclose(wj, wa, atol=1e-5)
        np.testing.assert_allclose(j.val_accuracy_, a.val_accuracy_, atol=1.5 / len(j.val_indices_))
        np.testing.assert_allclose(j.train_loss_, a.train_loss_, rtol=1e-5)
        assert (j.evaluate(Xte, yte)["test_accuracy"] - a.evaluate(Xte, yte)["test_accuracy"]).abs().max() \
            <= 1.5 / len(yte)
    # the joint fit batched the modes together: fewer batches than the estimators' own fits
    assert together[0].joint_batches_ < sum(len(a.batches_) for a in alone)


def test_a_joint_fits_probes_equal_nn_linear_trained_alone(data):
    """The independent reference: a draw of each kind (a reference, random, prefix, explicit)
    from the joint fit against nn.Linear + torch.optim.SGD trained alone with the estimator's own
    initial weights and its seed's minibatch order."""
    Xtr, ytr, Xte, _ = data
    ests = probes.fit_together(_estimators(), Xtr, ytr)
    for est, di in [(ests[0], 0), (ests[3], 0), (ests[4], 2), (ests[5], 4), (ests[6], 3), (ests[7], 1)]:
        _assert_equals_lone_probe(est, di, Xtr, ytr, Xte)


def test_ridge_estimators_fit_together_as_alone(data):
    Xtr, ytr, Xte, _ = data
    kw = {**KW, "solver": "ridge"}
    make = lambda: [SubsetProbes(mode="random", fractions=(0.25, 1.0), seeds=(1,), **kw),  # noqa: E731
                    SubsetProbes(mode="pca", fractions=(0.25,), include_full=False, **kw)]
    for j, a in zip(probes.fit_together(make(), Xtr, ytr), [e.fit(Xtr, ytr) for e in make()]):
        np.testing.assert_allclose(j.decision_function(Xte), a.decision_function(Xte), atol=1e-5)
        np.testing.assert_array_equal(j.ridge_alpha_, a.ridge_alpha_)


@pytest.mark.parametrize("key, value", [("epochs", 4), ("lr", 0.2), ("device", "auto"), ("max_memory_mb", 512)])
def test_estimators_of_other_protocols_are_refused(data, key, value):
    Xtr, ytr, _, _ = data
    other = SubsetProbes(mode="prefix", **{**KW, key: value})
    with pytest.raises(errors.IncompatibleParametersError, match=rf"{key}.*estimator 1 differs from estimator 0"):
        probes.fit_together([SubsetProbes(mode="prefix", **KW), other], Xtr, ytr)
    assert not hasattr(other, "batches_")
    with pytest.raises(errors.IncompatibleParametersError, match="at least one"):
        probes.fit_together([], Xtr, ytr)


def test_fit_bytes_grows_with_the_draws():
    one = probes.fit_bytes(SubsetProbes(mode="random", seeds=(0,), include_full=False), 2048, 100)
    five = probes.fit_bytes(SubsetProbes(mode="random", seeds=tuple(range(5)), include_full=False), 2048, 100)
    assert five == 5 * one
    # 22 paper fractions of d = 2048, 100 classes: 5 copies of 9,000 x 100 weights, a 256-row minibatch
    # of the inputs, the logits and the layer
    ks = [probes.subset_size(f, 2048) for f in probes.PAPER_FRACTIONS]
    assert one == 4 * (5 * 100 * (sum(ks) + len(ks)) + 256 * (max(ks) + 100 * len(ks)) + 256 * 2048)


# ----------------------------------------------------------------------------- the sweep's fits


def _tasks(tmp_path, pairings=2, modes=("random", "prefix"), seeds=(0, 1, 2)):
    spec = pipelines.load_spec({
        "store": str(tmp_path / "s.zarr"),
        "groups": [{"model": "m", "layer": f"l{i}", "dataset": "digits"} for i in range(pairings)],
        "selection": {"modes": list(modes), "seeds": list(seeds), "fractions": [0.1, 1.0]}})
    return pipelines.expand_tasks(spec)


def test_one_fit_per_pairing_by_default(tmp_path):
    tasks = _tasks(tmp_path)
    shapes = {0: (64, 10, 1 << 20), 1: (64, 10, 1 << 20)}
    fits = pipelines.plan_fits(tasks, shapes)
    assert [len(f) for f in fits] == [7, 7]  # 3 references + 3 random seeds + prefix, per pairing
    assert all(len({t.group_index for t in f}) == 1 for f in fits)
    assert [t for f in fits for t in f] == tasks  # every task once, in order


def test_fits_split_for_workers_and_on_request(tmp_path):
    tasks = _tasks(tmp_path)
    shapes = {0: (64, 10, 0), 1: (64, 10, 0)}
    assert len(pipelines.plan_fits(tasks, shapes, workers=2)) == 2  # as many workers as pairings: one each
    fits = pipelines.plan_fits(tasks, shapes, workers=6)  # 3 fits per pairing keep 6 workers busy
    assert len(fits) == 6 and [t for f in fits for t in f] == tasks
    fits = pipelines.plan_fits(tasks, shapes, fits_per_pairing=50)  # at most one per task
    assert [len(f) for f in fits] == [1] * len(tasks)


def test_a_fit_over_the_memory_budget_is_split(tmp_path):
    """The probes' working memory beside the features stays under max_memory_mb: a pairing whose
    joint fit would exceed it is packed into several fits that each fit."""
    tasks = _tasks(tmp_path, pairings=1)
    d, C = 1_000_000, 1000  # a layer this wide makes ~100 MB of probe state per task
    sizes = [probes.fit_bytes(t.estimator(d, "cpu"), d, C) for t in tasks]
    limit = probes.SubsetProbes().max_memory_mb << 20
    features = limit - int(2.5 * max(sizes))  # room for about two tasks
    fits = pipelines.plan_fits(tasks, {0: (d, C, features)})
    assert len(fits) > 1 and [t for f in fits for t in f] == tasks
    for f in fits:
        assert sum(sizes[tasks.index(t)] for t in f) <= limit - features or len(f) == 1
    assert len(pipelines.plan_fits(tasks, {0: (64, 10, features)})) == 1  # a narrow layer: one fit


def test_a_seeds_probes_do_not_depend_on_the_other_seeds_of_the_fit(data):
    """Initial weights are seeded by a draw's place among its own (mode, seed)'s draws: seed 3 of
    a fit of seeds 0..4 starts, and ends, as a fit of seed 3 alone (as a sweep's per-seed task)."""
    Xtr, ytr, Xte, _ = data
    many = SubsetProbes(mode="random", fractions=(0.1, 0.5, 1.0), seeds=(0, 1, 2, 3, 4), **KW).fit(Xtr, ytr)
    one = SubsetProbes(mode="random", fractions=(0.1, 0.5, 1.0), seeds=(3,), **KW).fit(Xtr, ytr)
    mine = [i for i, d in enumerate(many.draws_) if d.seed == 3]
    assert [(many.draws_[i].mode, many.draws_[i].k) for i in mine] == [(d.mode, d.k) for d in one.draws_]
    for i, j in zip(mine, range(len(one.draws_))):
        for a, b in zip(many.initial_weights(i), one.initial_weights(j)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(many.decision_function(Xte)[:, mine], one.decision_function(Xte), atol=1e-4)
    # seeds differ in their neurons, not in where their initial weights come from
    assert not np.array_equal(many.draws_[mine[0]].neurons, many.draws_[0].neurons)


# ----------------------------------------------------------------------------- several layers in one fit


def _two_layers(data):
    """Two "layers" of the same rows: the test data's 48 features and 32 others derived from them."""
    Xtr, ytr, Xte, yte = data
    W = np.random.default_rng(1).normal(size=(48, 32)).astype(np.float32) / 7
    return (Xtr, Xte), (np.maximum(Xtr @ W, 0), np.maximum(Xte @ W, 0)), ytr


def test_estimators_of_several_layers_fit_together_as_alone(data):
    """A list of features, one per estimator: every layer's estimators in one fit (their families
    in batches of their own layer), each equal to its own fit; the second layer's draws against
    nn.Linear + SGD trained alone on that layer."""
    (a_tr, a_te), (b_tr, b_te), ytr = _two_layers(data)
    make = lambda: [SubsetProbes(mode="random", fractions=(0.1, 0.5, 1.0), seeds=(0, 1), **KW),  # noqa: E731
                    SubsetProbes(mode="prefix", fractions=(0.25, 1.0), include_full=False, **KW),
                    SubsetProbes(mode="random", fractions=(0.1, 0.5, 1.0), seeds=(0, 1), **KW),
                    SubsetProbes(mode="pca", fractions=(0.25,), include_full=False, **KW)]
    layer = [a_tr, a_tr, b_tr, b_tr]
    together = probes.fit_together(make(), layer, ytr)
    alone = [e.fit(x, ytr) for e, x in zip(make(), layer)]
    assert together[0].joint_draws_ == sum(len(a.draws_) for a in alone)
    for j, a, te in zip(together, alone, [a_te, a_te, b_te, b_te]):
        assert j.n_features_in_ == a.n_features_in_
        np.testing.assert_allclose(j.decision_function(te), a.decision_function(te), atol=1e-4)
        np.testing.assert_allclose(j.val_accuracy_, a.val_accuracy_, atol=1.5 / len(j.val_indices_))
    est = together[2]
    for di in (0, 2, len(est.draws_) - 1):
        _assert_equals_lone_probe(est, di, b_tr, ytr, b_te)
    ridge = [SubsetProbes(mode="random", fractions=(0.5,), seeds=(0,), **{**KW, "solver": "ridge"}) for _ in range(2)]
    for j, x, te in zip(probes.fit_together(ridge, [a_tr, b_tr], ytr), [a_tr, b_tr], [a_te, b_te]):
        alone = SubsetProbes(mode="random", fractions=(0.5,), seeds=(0,), **{**KW, "solver": "ridge"}).fit(x, ytr)
        np.testing.assert_allclose(j.decision_function(te), alone.decision_function(te), atol=1e-5)


def test_layers_of_other_rows_are_refused(data):
    (a_tr, _), (b_tr, _), ytr = _two_layers(data)
    two = lambda: [SubsetProbes(mode="prefix", **KW), SubsetProbes(mode="prefix", **KW)]  # noqa: E731
    a = probes.load_training_data(a_tr, ytr)
    with pytest.raises(errors.InvalidFeaturesError, match="estimator 1.*other train rows"):
        probes.fit_together(two(), [a, probes.load_training_data(b_tr[:-5], ytr[:-5])])
    with pytest.raises(errors.InvalidFeaturesError, match="estimator 1.*other labels"):
        probes.fit_together(two(), [a, probes.load_training_data(b_tr, np.roll(ytr, 1))])
    with pytest.raises(errors.IncompatibleParametersError, match="a list of 3.*one per estimator"):
        probes.fit_together(two(), [a_tr, b_tr, b_tr], ytr)


def test_pairings_that_share_rows_join_one_fit(tmp_path):
    tasks = _tasks(tmp_path)  # two layers of one model and dataset
    same = {0: (64, 10, 1 << 20, "rows"), 1: (32, 10, 1 << 20, "rows")}
    assert [len(f) for f in pipelines.plan_fits(tasks, same, share_rows=True)] == [14]
    assert [len(f) for f in pipelines.plan_fits(tasks, same, share_rows=True, workers=2)] == [7, 7]  # one each
    other = {0: (64, 10, 1 << 20, "rows"), 1: (32, 10, 1 << 20, "other rows")}
    assert [len(f) for f in pipelines.plan_fits(tasks, other, share_rows=True)] == [7, 7]
    limit = probes.SubsetProbes().max_memory_mb << 20
    big = {0: (64, 10, limit // 2, "rows"), 1: (32, 10, limit // 2, "rows")}  # together past the budget
    assert [len(f) for f in pipelines.plan_fits(tasks, big, share_rows=True)] == [7, 7]
    assert [len(f) for f in pipelines.plan_fits(tasks, same)] == [7, 7]  # off: one fit per pairing


# ----------------------------------------------------------------------------- few-shot probes


def test_few_shot_probes_train_on_k_images_per_class_of_their_seed(data):
    """shots = K: each seed's probes (and its full-layer reference) train on K train images per
    class drawn by that seed, against nn.Linear + SGD trained alone on those rows in the seed's
    order; validation keeps its rows; a seed's rows are the same fitted alone or with others."""
    Xtr, ytr, Xte, _ = data
    est = SubsetProbes(mode="random", fractions=(0.25, 1.0), seeds=(0, 3), shots=10, **KW).fit(Xtr, ytr)
    rows = {s: est.train_rows(s) for s in (0, 3)}
    for s, r in rows.items():
        assert set(r) <= set(est.train_indices_) and np.bincount(ytr[r]).tolist() == [10] * 4
    assert not np.array_equal(rows[0], rows[3]) and len(est.val_indices_) == 90
    np.testing.assert_array_equal(
        SubsetProbes(mode="random", fractions=(0.25,), seeds=(3,), shots=10, **KW).fit(Xtr, ytr).train_rows(3),
        rows[3])
    for di in (0, 2, len(est.draws_) - 1):
        draw = est.draws_[di]
        orders = orders_of(est, draw, KW["epochs"])
        assert all(np.array_equal(np.sort(o), rows[draw.seed]) for o in orders)
        _assert_equals_lone_probe(est, di, Xtr, ytr, Xte, orders)
    every = SubsetProbes(mode="random", fractions=(1.0,), seeds=(0,), shots=10_000, **KW).fit(Xtr, ytr)
    np.testing.assert_array_equal(every.train_rows(0), every.train_indices_)  # more than any class has: all
    with pytest.raises(errors.IncompatibleParametersError, match="shots.*not by solver 'lbfgs'"):
        SubsetProbes(solver="lbfgs", shots=5, device="cpu").check_params()
