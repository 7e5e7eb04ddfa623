"""The batched probe engine against probes trained alone and against scikit-learn."""

from __future__ import annotations

import pickle
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch

import probes
from featstore import errors
from probes import SubsetProbes, make_families, random_permutation, subset_size


INDEX_MODES = [m for m, e in probes.SELECTION_MODES.items() if not e.projection]
PROJECTION_MODES = [m for m, e in probes.SELECTION_MODES.items() if e.projection]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, d, C = 1200, 48, 4
    means = rng.normal(size=(C, d)) * 0.6
    y = rng.integers(0, C, n)
    X = (means[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X[:900], y[:900], X[900:], y[900:]


def train_alone(X, y, neurons, w0, b0, orders, *, lr, momentum, wd, batch_size, lr_step, lr_gamma, C):
    """One probe, the plain way: nn.Linear + torch.optim.SGD + StepLR on X[:, neurons]."""
    lin = torch.nn.Linear(len(neurons), C)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w0.T))
        lin.bias.copy_(torch.from_numpy(b0))
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=lr_gamma)
    Xs = torch.from_numpy(X[:, neurons])
    yt = torch.from_numpy(y)
    for order in orders:
        for s in range(0, len(order), batch_size):
            rows = torch.from_numpy(order[s:s + batch_size])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(Xs[rows]), yt[rows]).backward()
            opt.step()
        sched.step()
    return lin


def orders_of(est, draw, epochs):
    """The minibatch order a draw's probe is trained with: its seed's (per-seed), or the one
    shared order."""
    seed = draw.seed if est.minibatch_order == "per-seed" else None
    return [est.epoch_order(e, seed) for e in range(epochs)]


ORDERS = list(typing.get_args(probes.Protocol.model_fields["minibatch_order"].annotation))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", INDEX_MODES + ["explicit"])
def test_probe_in_a_batch_equals_probe_trained_alone(data, mode, order):
    Xtr, ytr, Xte, yte = data
    kw = dict(epochs=4, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=64, lr_step=2, lr_gamma=0.1)
    subsets = [np.array([3, 7, 11]), np.arange(40), np.array([0, 47, 5, 9, 30])] if mode == "explicit" else None
    selection = dict(subsets=subsets) if mode == "explicit" else dict(mode=mode)
    est = SubsetProbes(fractions=(0.05, 0.25, 0.5, 1.0), seeds=(0, 3), select_epoch="last", device="cpu",
                       minibatch_order=order, **selection, **kw).fit(Xtr, ytr)
    logits = est.decision_function(Xte)
    seeded = mode == "random" and order == "per-seed"
    n_full = 2 if seeded else 1  # the full layer under each seed's order
    assert len(est.draws_) == (len(subsets) if subsets else (8 if mode == "random" else 4)) + n_full
    assert [dr.seed for dr in est.draws_ if dr.mode == "full"] == ([0, 3] if seeded else [None])
    for di, draw in enumerate(est.draws_):
        orders = orders_of(est, draw, kw["epochs"])
        w0, b0 = est.initial_weights(di)
        lin = train_alone(Xtr, ytr, draw.neurons, w0, b0, orders, C=4, **{
            "lr": kw["lr"], "momentum": kw["momentum"], "wd": kw["weight_decay"], "batch_size": kw["batch_size"],
            "lr_step": kw["lr_step"], "lr_gamma": kw["lr_gamma"]})
        with torch.no_grad():
            ref = lin(torch.from_numpy(Xte[:, draw.neurons])).numpy()
        assert np.abs(logits[:, di] - ref).max() < 1e-4, (di, draw)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("min_block, dense_fraction", [(1, 0.75), (4, 2.0), (64, 0.0), (16, 0.5), (1024, 0.75)],
                         ids=["one-block-per-segment", "merged-blocks-no-dense", "all-dense", "mixed",
                              "one-wide-block"])  # one-wide-block: CUDA's layout (MIN_BLOCK_WIDTH_CUDA)
def test_every_layout_trains_each_probe_as_if_alone(data, monkeypatch, min_block, dense_fraction, order):
    """Column blocks (one per segment, or merged with masked corners) and the dense group
    (the raw layer, zero weights off the subset) all train exactly the lone probe."""
    from probes import _batch

    monkeypatch.setattr(_batch, "MIN_BLOCK_WIDTH", min_block)
    monkeypatch.setattr(_batch, "DENSE_FRACTION", dense_fraction)
    Xtr, ytr, Xte, yte = data
    kw = dict(epochs=3, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=64, lr_step=2, lr_gamma=0.1)
    est = SubsetProbes(fractions=(0.02, 0.05, 0.1, 0.25, 0.3, 0.5, 0.8, 1.0), seeds=(0, 3, 5), select_epoch="last",
                       device="cpu", minibatch_order=order, **kw).fit(Xtr, ytr)
    kinds = {("dense" if g.dense is not None else f"{len(g.blocks)} blocks") for g in est.batches_}
    if dense_fraction == 0.0:
        assert kinds == {"dense"}
    elif dense_fraction > 1:
        assert all(k.endswith("blocks") for k in kinds)
    else:
        assert "dense" in kinds and len(kinds) > 1
    logits = est.decision_function(Xte)
    for di in (0, 4, 7, 8, 15, len(est.draws_) - 1):
        draw = est.draws_[di]
        orders = orders_of(est, draw, kw["epochs"])
        w0, b0 = est.initial_weights(di)
        lin = train_alone(Xtr, ytr, draw.neurons, w0, b0, orders, C=4, lr=kw["lr"], momentum=kw["momentum"],
                          wd=kw["weight_decay"], batch_size=kw["batch_size"], lr_step=kw["lr_step"],
                          lr_gamma=kw["lr_gamma"])
        w, b = est.probe_weights(di)
        assert w.shape == (draw.k, 4)
        np.testing.assert_allclose(w, lin.weight.detach().numpy().T, atol=1e-5)
        np.testing.assert_allclose(b, lin.bias.detach().numpy(), atol=1e-5)
        with torch.no_grad():
            ref = lin(torch.from_numpy(Xte[:, draw.neurons])).numpy()
        assert np.abs(logits[:, di] - ref).max() < 1e-4, (di, draw)
        np.testing.assert_allclose(Xte[:, draw.neurons] @ w + b, logits[:, di], atol=1e-4)
    with pytest.raises(errors.InvalidParameterError, match=rf"draw: expected an integer in 0\.\.{len(est.draws_) - 1}"):
        est.probe_weights(len(est.draws_))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", list(probes.SELECTION_MODES))
def test_laid_out_passes_train_the_probes_of_per_minibatch_inputs(data, monkeypatch, mode, order):
    """Each pass laid out once by column block (row gathers per minibatch; the default when it
    fits) and the per-minibatch column gather or projection (when it does not) fill the same
    block inputs: index modes give the same probes bit for bit, projections (n-row products
    instead of B-row ones) to float tolerance. The layout is dropped after fit."""
    from probes import _batch

    Xtr, ytr, Xte, yte = data
    kw = dict(mode=mode, fractions=(0.05, 0.3, 0.5, 0.8, 1.0), seeds=(0, 1), epochs=3, batch_size=64, device="cpu",
              minibatch_order=order, val_every=1)
    monkeypatch.setattr(_batch, "_layout_pays", lambda *a: True)  # wherever it would not pay, too
    laid = SubsetProbes(**kw).fit(Xtr, ytr)
    monkeypatch.setattr(_batch, "_room_for", lambda *a: False)
    each = SubsetProbes(**kw).fit(Xtr, ytr)
    assert laid.laid_out_ > 0 and each.laid_out_ == 0
    assert all(g.laid is None for g in laid.batches_)  # dropped after fit: not pickled with the estimator
    if mode in INDEX_MODES:
        np.testing.assert_array_equal(laid.decision_function(Xte), each.decision_function(Xte))
        np.testing.assert_array_equal(laid.val_accuracy_, each.val_accuracy_)
        np.testing.assert_array_equal(laid.best_epoch_, each.best_epoch_)
    else:
        assert laid.batches_[0].is_projection
        np.testing.assert_allclose(laid.decision_function(Xte), each.decision_function(Xte), atol=1e-4)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", list(probes.SELECTION_MODES))
def test_inputs_are_laid_out_where_it_pays(data, mode, order):
    """By default the layout is made where it was measured to pay on the CPU: projections (one
    projection per pass, not per minibatch) always; index subsets in float32 only for several
    minibatch streams (per-seed orders) over at least LAYOUT_MIN_EPOCHS epochs; never for the
    dense batch (it reads the minibatch itself)."""
    from probes import _batch

    Xtr, ytr, _, _ = data
    kw = dict(mode=mode, fractions=(0.05, 0.3, 0.8, 1.0), seeds=(0, 1), batch_size=300, device="cpu",
              minibatch_order=order)
    several_streams = order == "per-seed" and probes.SELECTION_MODES[mode].seeded
    for epochs in (3, _batch.LAYOUT_MIN_EPOCHS):
        est = SubsetProbes(epochs=epochs, **kw).fit(Xtr, ytr)
        want = mode in PROJECTION_MODES or (several_streams and epochs >= _batch.LAYOUT_MIN_EPOCHS)
        assert (est.laid_out_ > 0) == want, epochs


def test_both_softmax_gradients_agree():
    """The CPU's one-hot form and CUDA's gather/scatter form of softmax - onehot give the same
    gradient (bit for bit) and the same summed cross-entropy, which equals torch's."""
    from probes._sgd import _softmax_gradient

    g = torch.Generator().manual_seed(0)
    F, m, C, B = 3, 5, 7, 33
    logits = torch.randn(F, m, C, B, generator=g) * 4
    targets = torch.randint(0, C, (F, 1, 1, B), generator=g)
    classes = torch.arange(C).view(1, 1, C, 1)
    loss_a, loss_b = torch.zeros(F, m), torch.zeros(F, m)
    a = _softmax_gradient(logits.clone(), targets, loss_a, classes)
    b = _softmax_gradient(logits.clone(), targets, loss_b, classes, minus_one=torch.tensor(-1.0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    want = torch.softmax(logits, 2) - torch.nn.functional.one_hot(targets.view(F, 1, B), C).permute(0, 1, 3, 2)
    torch.testing.assert_close(a, want.expand(F, m, C, B), rtol=0, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(logits.permute(0, 1, 3, 2).reshape(-1, C),
                                           targets.expand(F, m, 1, B).reshape(-1), reduction="none")
    torch.testing.assert_close(loss_a, ce.view(F, m, B).sum(2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-5)


def test_inputs_are_laid_out_only_within_max_memory_mb(monkeypatch):
    """The layout (F x n x width per pass) is made only when it fits max_memory_mb beside the
    features themselves; over it, each minibatch gathers its columns, with the same probes."""
    from probes import _batch

    monkeypatch.setattr(_batch, "_layout_pays", lambda *a: True)
    rng = np.random.default_rng(2)
    n, d = 3000, 2000  # 24 MB of float32 features; the layout of two seeds' halves is 24 MB more
    y = rng.integers(0, 3, n)
    X = (rng.normal(size=(3, d))[y] * 0.2 + rng.normal(size=(n, d))).astype(np.float32)
    kw = dict(fractions=(0.1, 0.5), seeds=(0, 1), epochs=1, batch_size=256, include_full=False, device="cpu")
    roomy = SubsetProbes(max_memory_mb=64, **kw).fit(X, y)
    tight = SubsetProbes(max_memory_mb=40, **kw).fit(X, y)
    assert roomy.laid_out_ == 2 * n * 1000 * 4 and tight.laid_out_ == 0
    np.testing.assert_array_equal(roomy.decision_function(X[:100]), tight.decision_function(X[:100]))


@pytest.mark.parametrize("mode", PROJECTION_MODES)
def test_projection_probes_equal_a_probe_trained_alone_on_projected_inputs(data, mode):
    """pca / pca-least / randproj probes against nn.Linear + torch.optim.SGD trained alone on
    X @ basis[:, :k] (the draw's directions), with the same initial weights and order."""
    Xtr, ytr, Xte, yte = data
    kw = dict(epochs=3, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=64, lr_step=2, lr_gamma=0.1)
    est = SubsetProbes(mode=mode, fractions=(0.05, 0.25, 1.0), seeds=(0, 2), select_epoch="last", device="cpu",
                       include_full=False, **kw).fit(Xtr, ytr)
    logits = est.decision_function(Xte)
    checked = 0
    for fam in est.families_:
        for draw in fam.draws:
            di = est.draws_.index(draw)
            orders = orders_of(est, draw, kw["epochs"])
            P = fam.basis[:, :draw.k]
            w0, b0 = est.initial_weights(di)
            lin = train_alone(Xtr @ P, ytr, np.arange(draw.k), w0, b0, orders, C=4, lr=kw["lr"],
                              momentum=kw["momentum"], wd=kw["weight_decay"], batch_size=kw["batch_size"],
                              lr_step=kw["lr_step"], lr_gamma=kw["lr_gamma"])
            w, b = est.probe_weights(di)
            np.testing.assert_allclose(w, lin.weight.detach().numpy().T, atol=1e-4)
            np.testing.assert_allclose(b, lin.bias.detach().numpy(), atol=1e-4)
            with torch.no_grad():
                ref = lin(torch.from_numpy(Xte @ P)).numpy()
            assert np.abs(logits[:, di] - ref).max() < 1e-3, (di, draw)
            checked += 1
    assert checked == len(est.draws_) == (6 if probes.SELECTION_MODES[mode].seeded else 3)


def test_best_epoch_selection_and_reported_fields(data):
    Xtr, ytr, Xte, yte = data
    est = SubsetProbes(fractions=(0.1, 1.0), seeds=(0,), epochs=6, batch_size=64, device="cpu").fit(Xtr, ytr)
    res = est.evaluate(Xte, yte)
    assert list(res["mode"]) == ["random", "random", "full"]
    assert res["best_epoch"].between(1, 6).all() and (res["train_loss"] > 0).all()
    assert res["val_accuracy"].between(0, 1).all()
    pcs = np.array(res["per_class_accuracy"].tolist())
    counts = np.bincount(yte, minlength=4)
    np.testing.assert_allclose((pcs * counts).sum(1) / counts.sum(), res["test_accuracy"], atol=1e-12)
    # accuracy from predictions, recomputed independently
    pred = est.predict(Xte)
    np.testing.assert_allclose(res["test_accuracy"], (pred == yte[:, None]).mean(0))
    # the full layer is the best probe on this easy problem
    assert res["test_accuracy"].iloc[-1] >= res["test_accuracy"].iloc[0]
    assert len(res["neurons"].iloc[0]) == subset_size(0.1, 48) == 4


def test_subset_sizes_nesting_and_determinism_across_processes():
    fams = make_families(1280, "random", probes.PAPER_FRACTIONS, seeds=(0, 1))
    ks = [dr.k for dr in fams[0].draws]
    assert ks == sorted(max(1, int(f * 1280)) for f in probes.PAPER_FRACTIONS)
    assert ks[0] == 1 and ks[-1] == 1280
    for fam in fams:
        for small, big in zip(fam.draws, fam.draws[1:]):
            assert set(small.neurons) <= set(big.neurons)  # nested across fractions, one seed
    assert not np.array_equal(fams[0].draws[5].neurons, fams[1].draws[5].neurons)
    # the original's recipe: torch.manual_seed(seed); torch.randperm(d)[:k]
    torch.manual_seed(1)
    np.testing.assert_array_equal(torch.randperm(1280)[:128].numpy(), fams[1].draws[12].neurons)
    out = subprocess.run([sys.executable, "-c", "import probes; print(probes.random_permutation(1280, 7)[:20].tolist())"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(random_permutation(1280, 7)[:20].tolist())


def test_randproj_columns_are_unit_norm_and_nested():
    P = probes.random_projection(64, 10, seed=3)
    np.testing.assert_allclose(np.linalg.norm(P, axis=0), 1.0, rtol=1e-6)
    assert (P >= 0).all()  # the original's uniform [0, 1) entries
    np.testing.assert_allclose(probes.random_projection(64, 4, seed=3), P[:, :4], rtol=1e-6)
    G = probes.random_projection(64, 10, seed=3, distribution="gaussian")
    assert (G < 0).any()


def test_pca_at_full_width_matches_the_full_layer(data):
    Xtr, ytr, Xte, yte = data
    res = SubsetProbes(mode="pca", fractions=(1.0,), epochs=8, batch_size=64, device="cpu").fit(Xtr, ytr).evaluate(Xte, yte)
    pca, full = res["test_accuracy"]
    assert abs(pca - full) <= 0.03  # a rotation of the layer: equal within noise
    least = SubsetProbes(mode="pca-least", fractions=(0.1,), epochs=8, batch_size=64, device="cpu").fit(Xtr, ytr)
    top = SubsetProbes(mode="pca", fractions=(0.1,), epochs=8, batch_size=64, device="cpu").fit(Xtr, ytr)
    assert top.evaluate(Xte, yte)["test_accuracy"][0] > least.evaluate(Xte, yte)["test_accuracy"][0]


def test_ridge_solver_matches_closed_form(data):
    from sklearn.linear_model import Ridge

    Xtr, ytr, Xte, yte = data
    est = SubsetProbes(subsets=[np.arange(10)], solver="ridge", ridge_alphas=(0.1,), include_full=False).fit(Xtr, ytr)
    tr = est.train_indices_
    Gs = Xtr[tr][:, :10].astype(np.float64)
    scale = np.diag((Gs - Gs.mean(0)).T @ (Gs - Gs.mean(0))).mean()
    ref = Ridge(alpha=0.1 * scale).fit(Gs, np.eye(4)[ytr[tr]])
    np.testing.assert_allclose(est.decision_function(Xte)[:, 0], ref.predict(Xte[:, :10]), atol=1e-4)


def test_estimator_is_picklable_and_joblib_ready(data):
    from joblib import Parallel, delayed

    Xtr, ytr, Xte, yte = data
    est = SubsetProbes(fractions=(0.5,), seeds=(0,), epochs=2, device="cpu")
    assert "epochs" in est.get_params() and not hasattr(est, "draws_")  # nothing learned in __init__
    fitted = est.fit(Xtr, ytr)
    assert fitted is est
    clone = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(clone.decision_function(Xte), est.decision_function(Xte))

    def work(seed):
        return SubsetProbes(fractions=(0.5,), seeds=(seed,), epochs=2, device="cpu").fit(Xtr, ytr).evaluate(Xte, yte)

    par = Parallel(n_jobs=2)(delayed(work)(s) for s in (0, 1))
    np.testing.assert_allclose(par[0]["test_accuracy"], work(0)["test_accuracy"])


def test_group_input_reads_views_per_epoch(tmp_path, tiny):
    """Epoch e trains on pass e mod (1 + views): checked against a probe trained alone that
    reads exactly those passes (a wrong pass in any epoch changes the weights)."""
    import featstore

    (g,) = featstore.build(**tiny, splits="train", views=2, store=tmp_path / "s.zarr", dtype="float32")
    passes = [g.numpy(v) for v in range(3)]
    assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])
    kw = dict(epochs=5, lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=8, lr_step=2, lr_gamma=0.5)
    est = SubsetProbes(fractions=(0.5,), seeds=(0,), select_epoch="last", include_full=False, device="cpu",
                       **kw).fit(g)
    assert est.n_classes_ == 3 and est.n_features_in_ == g.n_neurons
    draw = est.draws_[0]
    orders = orders_of(est, draw, kw["epochs"])
    w0, b0 = est.initial_weights(0)
    y = g.labels
    lin = torch.nn.Linear(draw.k, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w0.T))
        lin.bias.copy_(torch.from_numpy(b0))
    opt = torch.optim.SGD(lin.parameters(), lr=kw["lr"], momentum=kw["momentum"], weight_decay=kw["weight_decay"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=kw["lr_step"], gamma=kw["lr_gamma"])
    for epoch, order in enumerate(orders):
        Xs = torch.from_numpy(passes[epoch % 3][:, draw.neurons])  # clean, view 1, view 2, clean, view 1
        for s in range(0, len(order), kw["batch_size"]):
            rows = torch.from_numpy(order[s:s + kw["batch_size"]])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(Xs[rows]), torch.from_numpy(y)[rows]).backward()
            opt.step()
        sched.step()
    w, b = est.probe_weights(0)
    np.testing.assert_allclose(w, lin.weight.detach().numpy().T, atol=1e-5)
    np.testing.assert_allclose(b, lin.bias.detach().numpy(), atol=1e-5)
    res = est.evaluate(g)
    assert len(res) == 1 and res["test_accuracy"].between(0, 1).all()


def test_a_group_is_read_once_and_verified_by_that_read(tmp_path, tiny, monkeypatch):
    """Training data from a group: every chunk is read once, and that read is the check (a
    missing chunk is still refused: test_faults)."""
    import featstore

    (g,) = featstore.build(**tiny, splits="train", views=1, store=tmp_path / "s.zarr", dtype="float32")
    n_chunks = -(-g.n_samples // g.spec.chunk_rows)
    from featstore._chunks import PassReader

    reads = []
    real = PassReader._check  # every chunk a read returns is checked once, as it is read
    monkeypatch.setattr(PassReader, "_check", lambda self, c, *a: reads.append((self.label, c)) or real(self, c, *a))
    data = probes.load_training_data(g)
    assert sorted(reads) == sorted([("features", c) for c in range(n_chunks)] + [("views[0]", c) for c in range(n_chunks)])
    np.testing.assert_array_equal(data.X, g.numpy(0))
    reads.clear()
    probes.subset_cka(g, [np.arange(3)], space="feature")  # feature space: one row-block pass (sample space: read_columns)
    assert sorted(reads) == [("features", c) for c in range(n_chunks)]


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(fractions=(0.0, 0.5)), errors.InvalidParameterError,
     "SubsetProbes.fractions[0]: expected a number in (0, 1]; got 0.0 (float)"),
    (dict(fractions=(1.5,)), errors.InvalidParameterError, "SubsetProbes.fractions[0]: expected a number in (0, 1]"),
    (dict(fractions=()), errors.IncompatibleParametersError,
     "SubsetProbes.sizes=[] cannot be used here: fractions is empty and so is sizes"),
    (dict(fractions=(0.5, 0.5)), errors.InvalidParameterError, "expected a list without repeats"),
    (dict(mode="lottery"), errors.UnknownNameError,
     "SubsetProbes.mode: Unknown selection mode 'lottery'; known: pca, pca-least, prefix, random, randproj"),
    (dict(subsets=[np.array([0, 99])]), errors.InvalidParameterError,
     "subsets[0]: expected a non-empty 1-D array of distinct integer neuron indices in 0..47; got [0, 99]"),
    (dict(seeds=(-1,)), errors.InvalidParameterError, "SubsetProbes.seeds[0]: expected an integer in [0, 4294967295]; got -1"),
    (dict(seeds=(1.5,)), errors.InvalidParameterError, "SubsetProbes.seeds[0]: expected an integer in [0, 4294967295]; got 1.5 (float)"),
    (dict(solver="adam"), errors.UnknownNameError, "SubsetProbes.solver: Unknown solver 'adam'; known: knn, lbfgs, ridge, sgd"),
    (dict(momentum="0.9"), errors.InvalidParameterError,
     "SubsetProbes.momentum: expected a number in [0, 1); got '0.9' (string)"),
    (dict(epochs=True), errors.InvalidParameterError, "SubsetProbes.epochs: expected an integer in [1, 10000]; got True (boolean)"),
    (dict(include_full="no"), errors.InvalidParameterError, "SubsetProbes.include_full: expected true or false"),
    (dict(device="gpu"), errors.InvalidParameterError, "SubsetProbes.device: expected one of 'auto', 'cpu', 'cuda'"),
])
def test_bad_parameters(data, kwargs, exc, message):
    """Every parameter is checked against its declaration, before any work: the message names
    the key, the value, its type and what the declaration allows; strings are never coerced."""
    import re

    Xtr, ytr, _, _ = data
    with pytest.raises(exc, match=re.escape(message)):
        SubsetProbes(**{"epochs": 1, **kwargs}).fit(Xtr, ytr)


def test_estimator_follows_scikit_learns_contract(data):
    """Keyword-only __init__ that stores its arguments unchanged, get_params / set_params from
    the one declaration, clone, and a not-fitted error that is also AttributeError / ValueError."""
    import inspect

    from sklearn.base import clone

    declared = list(probes.SubsetProbesParameters.model_fields)
    sig = inspect.signature(SubsetProbes)
    assert list(sig.parameters) == declared
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in sig.parameters.values())
    assert {n: p.default for n, p in sig.parameters.items()} == {
        n: f.default for n, f in probes.SubsetProbesParameters.model_fields.items()}
    with pytest.raises(TypeError):
        SubsetProbes("random")  # keyword-only
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        SubsetProbes(epoch=3)
    est = SubsetProbes(momentum="not checked here", epochs=2)
    assert est.momentum == "not checked here"  # __init__ stores, fit validates
    est.set_params(momentum=0.5)
    assert est.get_params()["momentum"] == 0.5 and set(est.get_params()) == set(declared)
    with pytest.raises(errors.UnknownKeyError, match="SubsetProbes.momentun"):
        est.set_params(momentun=0.1)
    copy = clone(est)
    assert copy.get_params() == est.get_params() and copy is not est
    assert repr(est) == "SubsetProbes(epochs=2, momentum=0.5)"
    for builtin in (AttributeError, ValueError, errors.NotFittedError):
        with pytest.raises(builtin, match="not fitted yet"):
            est.predict(data[2])


def test_bad_data(data):
    Xtr, ytr, _, _ = data
    bad = Xtr.copy()
    bad[3, 4] = np.inf
    with pytest.raises(errors.InvalidFeaturesError, match="NaN/Inf .*row 3, neuron 4"):
        SubsetProbes(epochs=1).fit(bad, ytr)
    with pytest.raises(errors.InvalidFeaturesError, match="label 9 is outside the class range 0..3"):
        SubsetProbes(epochs=1).fit(Xtr, np.where(np.arange(len(ytr)) == 0, 9, ytr), n_classes=4)
    with pytest.raises(errors.InvalidFeaturesError, match="empty split"):
        SubsetProbes(epochs=1).fit(np.zeros((0, 5), np.float32), np.zeros(0, int))
    with pytest.raises(errors.InvalidFeaturesError, match="labels for"):
        SubsetProbes(epochs=1).fit(Xtr, ytr[:-1])


def test_bf16_on_a_cpu_without_it_is_refused_before_any_work(data, monkeypatch):
    from probes import _engine

    monkeypatch.setattr(_engine, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(_engine, "load_training_data", lambda *a, **k: pytest.fail("data read before the check"))
    with pytest.raises(errors.IncompatibleParametersError, match="native bf16"):
        SubsetProbes(precision="bf16", device="cpu").fit(data[0], data[1])


def test_bf16_path_tracks_fp32(data):
    """The bf16 compute path (the GPU's option) on a CPU with native bf16."""
    Xtr, ytr, Xte, yte = data
    kw = dict(fractions=(0.1, 0.5, 0.8, 1.0), seeds=(0, 1), epochs=4, batch_size=64, device="cpu")
    if not probes.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 matmuls (AVX512-BF16 / AMX)")
    fp = SubsetProbes(**kw).fit(Xtr, ytr)
    bf = SubsetProbes(precision="bf16", **kw).fit(Xtr, ytr)
    assert all(w.dtype == torch.float32 for g in bf.batches_ for w in g.W)  # fp32 master weights
    # bf16 operands laid out in bf16 whatever the epochs (no conversion per step); 4 float32 epochs are not
    assert bf.laid_out_ == sum(len(Xtr) * g.F * g.width * 2 for g in bf.batches_ if g.dense is None) > 0
    assert fp.laid_out_ == 0
    a, b = fp.evaluate(Xte, yte), bf.evaluate(Xte, yte)
    assert np.abs(a["test_accuracy"] - b["test_accuracy"]).max() <= 0.06
    la, lb = fp.decision_function(Xte), bf.decision_function(Xte)
    assert np.abs(la - lb).max() < 0.1 * np.abs(la).max()


def test_bf16_operands_held_in_bf16_equal_converting_each_minibatch(data, monkeypatch):
    """With precision="bf16" the layout is made in bf16 and the dense batch reads resident bf16
    copies of the passes (no conversion per step); without room for either, each minibatch is
    gathered in float32 and converted. The same rounding either way: the same probes, bit for bit."""
    from probes import _batch

    if not probes.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 matmuls (AVX512-BF16 / AMX)")
    Xtr, ytr, Xte, yte = data
    kw = dict(fractions=(0.05, 0.3, 0.8, 1.0), seeds=(0, 1), epochs=3, batch_size=64, device="cpu", precision="bf16",
              val_every=1)
    read = []
    from probes import _sgd

    real = _sgd._read_passes
    monkeypatch.setattr(_sgd, "_read_passes", lambda est, *a: read.append(r := real(est, *a)) or r)
    held = SubsetProbes(**kw).fit(Xtr, ytr)
    monkeypatch.setattr(_batch, "_room_for", lambda *a: False)
    each = SubsetProbes(**kw).fit(Xtr, ytr)
    # the passes of the fit's one set of features: resident in bf16, or float32
    assert [p.dtype for p in read[0][0]] == [torch.bfloat16] and [p.dtype for p in read[1][0]] == [torch.float32]
    assert held.laid_out_ > 0 and each.laid_out_ == 0
    np.testing.assert_array_equal(held.decision_function(Xte), each.decision_function(Xte))
    np.testing.assert_array_equal(held.val_accuracy_, each.val_accuracy_)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(data):
    Xtr, ytr, Xte, yte = data
    kw = dict(fractions=(0.1, 0.5, 1.0), seeds=(0, 1), epochs=3, batch_size=64, select_epoch="last")
    cpu = SubsetProbes(device="cpu", **kw).fit(Xtr, ytr).decision_function(Xte)
    gpu = SubsetProbes(device="cuda", **kw).fit(Xtr, ytr).decision_function(Xte)
    assert np.abs(cpu - gpu).max() < 1e-3
    bf = SubsetProbes(device="cuda", precision="bf16", **kw).fit(Xtr, ytr).evaluate(Xte, yte)
    assert bf["test_accuracy"].min() > 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", list(probes.SELECTION_MODES))
@pytest.mark.parametrize("room", ["on the GPU", "streamed from pinned host memory"])
def test_cuda_paths_equal_cpu(data, monkeypatch, mode, room):
    """Features on the GPU (projections projected once there), or, when the GPU has no room,
    kept in pinned host memory and copied per minibatch (projections per minibatch)."""
    import probes._sgd as engine  # where the SGD solver places each pass

    Xtr, ytr, Xte, yte = data
    kw = dict(mode=mode, fractions=(0.1, 0.5, 0.8, 1.0), seeds=(0, 1), epochs=3, batch_size=64,
              select_epoch="last")
    cpu = SubsetProbes(device="cpu", **kw).fit(Xtr, ytr).decision_function(Xte)
    placed = []
    real = engine._to_device

    def spy(X, device):
        t = real(X, device)
        placed.append((t.device.type, t.is_pinned()))
        return t

    monkeypatch.setattr(engine, "_to_device", spy)
    if room != "on the GPU":
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0, 1 << 36))  # no room at all
    gpu = SubsetProbes(device="cuda", **kw).fit(Xtr, ytr).decision_function(Xte)
    assert placed == ([("cuda", False)] if room == "on the GPU" else [("cpu", True)])
    assert np.abs(cpu - gpu).max() < 1e-3 * max(1.0, np.abs(cpu).max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", list(probes.SELECTION_MODES))
def test_cuda_graph_steps_equal_eager_steps(data, mode):
    """Training steps replayed from CUDA graphs (one per learning rate and pass) give the eager
    path's probes: same weights, same best epochs, same losses. Several learning rates (lr_step
    1), per-seed streams, a partial last minibatch (eager) and validation every epoch."""
    Xtr, ytr, Xte, yte = data
    kw = dict(mode=mode, fractions=(0.1, 0.5, 0.8, 1.0), seeds=(0, 1), epochs=4, batch_size=64, lr_step=1,
              lr_gamma=0.5, device="cuda")
    eager = SubsetProbes(cuda_graphs=False, **kw).fit(Xtr, ytr)
    n_train = len(eager.train_indices_)
    assert n_train % 64 and n_train > 3 * 64  # full steps (graphs) and a partial one (eager)
    graphs = SubsetProbes(cuda_graphs=True, **kw).fit(Xtr, ytr)
    assert (eager.cuda_graphs_, graphs.cuda_graphs_) == (0, 4)  # one per learning rate: the graphs did run
    np.testing.assert_array_equal(graphs.best_epoch_, eager.best_epoch_)
    np.testing.assert_allclose(graphs.train_loss_, eager.train_loss_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(graphs.decision_function(Xte), eager.decision_function(Xte), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", [m for m in probes.SELECTION_MODES if m.startswith("pca")])
def test_pca_keeps_only_directions_of_the_train_splits_rank(mode):
    """n <= d (Flowers102: ~920 x 2048): beyond rank n - 1 are null-space directions. Only
    non-null ones are used, compared with numpy's SVD of the centred split; a k beyond the
    rank is clamped with a warning and the rank recorded."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 48)) @ rng.normal(size=(48, 48))
    Xc = X - X.mean(0)
    _, sv, Vt = np.linalg.svd(Xc, full_matrices=False)
    assert sv[-1] < 1e-9 * sv[0]  # 30 rows, centred: rank 29
    with pytest.warns(UserWarning, match="rank 29 .* fractions 1 are clamped to k = 29"):
        (fam,) = make_families(48, mode, (0.25, 0.5, 1.0), (0,), X_train=X.astype(np.float32))
    assert [dr.k for dr in fam.draws] == [12, 24, 29] and {dr.rank for dr in fam.draws} == {29}
    assert fam.basis.shape == (48, 29)
    for k in (12, 29):
        want = Vt[:k] if mode == "pca" else Vt[29 - k:29]  # the k largest / smallest non-null directions
        np.testing.assert_allclose(fam.basis[:, :k] @ fam.basis[:, :k].T, want.T @ want, atol=1e-4)


@pytest.mark.parametrize("mode", [m for m in probes.SELECTION_MODES if m.startswith("pca")])
def test_pca_directions_do_not_depend_on_the_eigensolvers_signs(data, monkeypatch, mode):
    """LAPACK builds may return any eigenvector with either sign; the basis (and so the
    probes a task trains) must be the same on every machine."""
    from probes._selection import make_families

    Xtr = data[0]
    (fam,) = make_families(Xtr.shape[1], mode, (0.5,), (0,), X_train=Xtr)
    real = np.linalg.eigh

    def flipped(a):
        vals, vecs = real(a)
        return vals, vecs * np.where(np.arange(vecs.shape[1]) % 2, -1.0, 1.0)

    monkeypatch.setattr(np.linalg, "eigh", flipped)
    (again,) = make_families(Xtr.shape[1], mode, (0.5,), (0,), X_train=Xtr)
    np.testing.assert_array_equal(fam.basis, again.basis)
    big = np.argmax(np.abs(fam.basis), axis=0)
    assert (fam.basis[big, np.arange(fam.basis.shape[1])] > 0).all()


@pytest.mark.parametrize("dataset, weight_decay, augmented_val", [("cifar10", 5e-4, True), ("flowers102", 1e-4, False)])
def test_original_preset_equals_a_literal_reimplementation_of_the_released_loop(tmp_path, tiny, dataset, weight_decay,
                                                                                augmented_val):
    """The released per-(fraction, seed) run, written out: torch.manual_seed(seed);
    randperm(d)[:k]; nn.Linear + SGD(momentum 0.9, the dataset's weight decay) + StepLR; every
    epoch on an augmented pass, the minibatches in the seed's order; validation every 5 epochs
    on the validation rows as the released code saw them (a random_split Subset keeps the train
    transform: augmented, for CIFAR and Pets; Flowers' own split: clean), the best top-1
    checkpoint kept (strictly better). Equal to the engine's probe under the `original` preset
    to 1e-4 in the logits."""
    import featstore

    (g,) = featstore.build(**tiny, splits="train", views=2, store=tmp_path / "s.zarr", dtype="float32")
    est = SubsetProbes.from_preset("original", dataset=dataset, fractions=(0.25, 1.0), epochs=12, batch_size=8,
                                   lr=0.05, lr_step=4, device="cpu", include_full=False).fit(g)
    assert (est.weight_decay, est.val_every, est.seeds, est.train_passes) == (weight_decay, 5, (1, 2, 3, 4, 5), "views")
    assert est.val_transform == ("augmented" if augmented_val else "clean")
    # the released datamodule's split: seed_everything(0); random_split(full, [int(0.9 n), rest])
    torch.manual_seed(0)
    n_train = int(0.9 * g.n_samples)
    _, released_val = torch.utils.data.random_split(range(g.n_samples), [n_train, g.n_samples - n_train])
    np.testing.assert_array_equal(est.val_indices_, np.sort(released_val.indices))
    passes = [g.numpy(v) for v in range(3)]
    y = torch.from_numpy(g.labels)
    val = torch.from_numpy(est.val_indices_)
    logits = est.decision_function(passes[0])
    for di, draw in enumerate(est.draws_):
        torch.manual_seed(draw.seed)
        neurons = torch.randperm(g.n_neurons)[:draw.k].numpy()  # the released code's choice
        np.testing.assert_array_equal(neurons, draw.neurons)
        lin = torch.nn.Linear(draw.k, 3)
        w0, b0 = est.initial_weights(di)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w0.T))
            lin.bias.copy_(torch.from_numpy(b0))
        opt = torch.optim.SGD(lin.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.1)
        best, best_state = -1.0, None
        for epoch in range(12):
            Xs = torch.from_numpy(passes[1 + epoch % 2][:, neurons])  # augmented every epoch
            order = est.epoch_order(epoch, draw.seed)  # the seed's shuffle (seed_everything(seed))
            for s in range(0, len(order), 8):
                rows = torch.from_numpy(order[s:s + 8])
                opt.zero_grad()
                torch.nn.functional.cross_entropy(lin(Xs[rows]), y[rows]).backward()
                opt.step()
            sched.step()
            if (epoch + 1) % 5 == 0:  # check_val_every_n_epoch=5; ModelCheckpoint(monitor=val_acc1, mode=max)
                seen = Xs if augmented_val else torch.from_numpy(passes[0][:, neurons])
                with torch.no_grad():
                    acc = (lin(seen[val]).argmax(1) == y[val]).float().mean().item()
                if acc > best:
                    best, best_state = acc, {k: v.clone() for k, v in lin.state_dict().items()}
        lin.load_state_dict(best_state)
        with torch.no_grad():
            ref = lin(torch.from_numpy(passes[0][:, neurons])).numpy()
        assert np.abs(logits[:, di] - ref).max() < 1e-4, (di, draw)
        assert est.best_epoch_[di] in (5, 10) and est.val_accuracy_[di] == pytest.approx(best)


@pytest.mark.parametrize("laid_out", [False, True])
@pytest.mark.parametrize("val_transform", ["clean", "augmented"])
def test_validation_scores_the_clean_pass_or_the_epochs_augmented_pass(data, monkeypatch, val_transform, laid_out):
    """val_transform="augmented" scores the validation rows on the pass the epoch trained on (the
    released code's validation Subset kept the train transform), "clean" on the clean pass: each
    probe's recorded validation accuracy is its weights' accuracy on those rows, by hand. The view
    here is the clean pass negated, so the two differ for every probe."""
    from probes import _batch
    from probes._engine import TrainingData

    monkeypatch.setattr(_batch, "_layout_pays", lambda *a: laid_out)  # inputs laid out per pass, or gathered
    Xtr, ytr, _, _ = data
    view = -Xtr
    est = SubsetProbes(fractions=(0.25, 1.0), seeds=(0,), epochs=1, select_epoch="last", batch_size=64,
                       train_passes="views", val_transform=val_transform, device="cpu")
    est.fit(TrainingData(Xtr, ytr, [view], 4, "array"))
    assert (est.laid_out_ > 0) == laid_out
    rows = est.val_indices_
    for di, draw in enumerate(est.draws_):
        w, b = est.probe_weights(di)
        on = {"augmented": view, "clean": Xtr}
        acc = {k: float(((X[rows][:, draw.neurons] @ w + b).argmax(1) == ytr[rows]).mean()) for k, X in on.items()}
        assert acc["augmented"] > acc["clean"] + 0.3  # trained on the view: the two really differ
        assert est.val_accuracy_[di] == pytest.approx(acc[val_transform], abs=1e-6)


def test_presets_resolve_per_dataset_and_explicit_values_win():
    """The original preset takes each released script's schedule (ResNet50's scripts: --epochs,
    --step_lr, --batch_size; weight decay from dataset_metadata.py; which images validation
    scored); a dataset without a released script keeps the declared defaults of those."""
    assert probes.preset("paper") == {**probes.Selection().model_dump(), **probes.Protocol().model_dump()}
    released = {  # dataset: (epochs, lr_step, batch_size, weight_decay, val_transform), read off the scripts
        "cifar10": (100, 20, 256, 5e-4, "augmented"), "cifar100": (100, 20, 256, 5e-4, "augmented"),
        "flowers102": (100, 20, 256, 1e-4, "clean"), "oxford-pets": (100, 20, 256, 1e-4, "augmented"),
        "places365": (50, 5, 1024, 5e-4, "augmented"), "imagenet": (10, 1, 512, 1e-4, "augmented")}
    keys = ("epochs", "lr_step", "batch_size", "weight_decay", "val_transform")
    for dataset, want in released.items():
        got = probes.preset("original", dataset)
        assert tuple(got[k] for k in keys) == want, dataset
        assert dataset in probes.ORIGINAL_SCHEDULES[dataset].source or dataset in ("flowers102", "oxford-pets")
    default = probes.Protocol()
    assert tuple(probes.preset("original", "fashion-mnist")[k] for k in keys) == tuple(getattr(default, k) for k in keys)
    assert probes.preset("original", "cifar100")["weight_decay"] == 5e-4
    assert probes.preset("original", "flowers102")["weight_decay"] == 1e-4
    assert probes.preset("original", "cifar10", weight_decay=0.0)["weight_decay"] == 0.0
    with pytest.raises(errors.UnknownNameError, match="Unknown preset 'released'; known: original, paper"):
        probes.preset("released")
    with pytest.raises(errors.InvalidParameterError, match=r"preset.val_every: expected an integer in \[1, 10000\]"):
        probes.preset("original", val_every=0)


def test_randproj_original_is_the_released_matrix():
    import torch.nn.functional as F

    d, seed = 96, 3
    want = F.normalize(torch.rand((d, d), generator=torch.Generator().manual_seed(seed)), dim=0)
    (fam,) = make_families(d, "randproj", (0.1, 0.5), (seed,), randproj_distribution="original")
    np.testing.assert_array_equal(fam.basis, want[:, :48].numpy())
    assert [dr.k for dr in fam.draws] == [9, 48]


def test_pca_is_fitted_on_the_passes_the_probes_train_on(tmp_path, tiny):
    import featstore

    (g,) = featstore.build(**tiny, splits="train", views=1, store=tmp_path / "s.zarr", dtype="float32")
    for passes, source in (("all", g.numpy(0)), ("views", g.numpy(1))):
        est = SubsetProbes(mode="pca", fractions=(0.1,), epochs=1, batch_size=8, device="cpu",
                           train_passes=passes).fit(g)
        (want,) = make_families(g.n_neurons, "pca", (0.1,), (0,), X_train=source[est.train_indices_])
        np.testing.assert_array_equal(est.families_[0].basis, want.basis)


def test_sizes_give_exactly_those_k_nested_per_seed(data):
    Xtr, ytr, Xte, yte = data
    est = SubsetProbes(fractions=(), sizes=(3, 7, 40), seeds=(0, 4), epochs=1, batch_size=64, device="cpu",
                       include_full=False).fit(Xtr, ytr)
    for seed in (0, 4):
        draws = [dr for dr in est.draws_ if dr.seed == seed]
        assert [dr.k for dr in draws] == [3, 7, 40] and [dr.fraction for dr in draws] == [3 / 48, 7 / 48, 40 / 48]
        assert set(draws[0].neurons) <= set(draws[1].neurons) <= set(draws[2].neurons)
        torch.manual_seed(seed)
        np.testing.assert_array_equal(draws[2].neurons, torch.randperm(48)[:40].numpy())
    mixed = SubsetProbes(fractions=(0.5,), sizes=(8,), seeds=(0,), epochs=1, device="cpu", include_full=False)
    assert [dr.k for dr in mixed.fit(Xtr, ytr).draws_] == [8, 24]
    with pytest.raises(errors.InvalidParameterError, match=r"sizes\[0\]: expected an integer in 1\.\.48"):
        SubsetProbes(sizes=(49,), epochs=1, device="cpu").fit(Xtr, ytr)
    with pytest.raises(errors.IncompatibleParametersError, match="give at least one fraction or size"):
        SubsetProbes(fractions=(), epochs=1, device="cpu").fit(Xtr, ytr)


def test_an_explicit_validation_split_picks_the_best_epoch(data):
    """fit(train, validation=(X_val, y_val)): every train row trains, the given rows validate;
    equal to the lone probe whose best epoch is chosen on those rows."""
    Xtr, ytr, Xte, yte = data
    Xv, yv = Xte[:150], yte[:150]
    kw = dict(epochs=4, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=64, lr_step=2, lr_gamma=0.1)
    est = SubsetProbes(fractions=(0.25,), seeds=(0,), include_full=False, device="cpu", **kw).fit(
        Xtr, ytr, validation=(Xv, yv))
    np.testing.assert_array_equal(est.train_indices_, np.arange(len(Xtr)))
    assert len(est.val_indices_) == 150
    draw = est.draws_[0]
    w0, b0 = est.initial_weights(0)
    lin = torch.nn.Linear(draw.k, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w0.T))
        lin.bias.copy_(torch.from_numpy(b0))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    Xs, yt = torch.from_numpy(Xtr[:, draw.neurons]), torch.from_numpy(ytr)
    best, state = -1.0, None
    for epoch, order in enumerate(orders_of(est, draw, 4)):
        for s in range(0, len(order), 64):
            rows = torch.from_numpy(order[s:s + 64])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(Xs[rows]), yt[rows]).backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            acc = (lin(torch.from_numpy(Xv[:, draw.neurons])).argmax(1).numpy() == yv).mean()
        if acc > best:
            best, state = acc, {k: v.clone() for k, v in lin.state_dict().items()}
    lin.load_state_dict(state)
    with torch.no_grad():
        ref = lin(torch.from_numpy(Xte[:, draw.neurons])).numpy()
    assert np.abs(est.decision_function(Xte)[:, 0] - ref).max() < 1e-4
    assert est.val_accuracy_[0] == pytest.approx(best)
    with pytest.raises(errors.InvalidFeaturesError, match="validation .*: 5 neurons, but the train features have 48"):
        SubsetProbes(epochs=1, device="cpu").fit(Xtr, ytr, validation=(Xv[:, :5], yv))


def test_features_larger_than_max_memory_train_from_disk_exactly_as_in_memory(tmp_path):
    """A wide layer (stored float16, 700 x 8,000 = 22 MB as float32) over max_memory_mb=16 is
    written once to a scratch file and read by minibatch: the probes, their best epochs and
    their test logits equal the in-memory engine's bit for bit; a test split over the budget
    is read in row chunks too. Projection modes and ridge are one clear error."""
    import zarr

    from probes import RowFile, load_training_data

    rng = np.random.default_rng(1)
    n, d, C = 900, 8000, 4
    y = rng.integers(0, C, n)
    X = (rng.normal(size=(C, d))[y] * 0.15 + rng.normal(size=(n, d))).astype(np.float16)
    z_train = zarr.create_array(str(tmp_path / "train.zarr"), shape=(700, d), chunks=(64, 1024), dtype="float16")
    z_train[:] = X[:700]
    z_test = zarr.create_array(str(tmp_path / "test.zarr"), shape=(200, d), chunks=(64, 1024), dtype="float16")
    z_test[:] = X[700:]
    assert isinstance(load_training_data(z_train, y[:700], max_memory_mb=16).X, RowFile)
    assert isinstance(load_training_data(z_train, y[:700]).X, np.ndarray)  # the default budget holds it
    kw = dict(fractions=(0.01, 0.1, 0.5, 0.8, 1.0), seeds=(0, 1), epochs=3, batch_size=64, val_every=1)
    mem = SubsetProbes(**kw).fit(X[:700].astype(np.float32), y[:700])
    disk = SubsetProbes(max_memory_mb=16, **kw).fit(z_train, y[:700])
    np.testing.assert_array_equal(disk.best_epoch_, mem.best_epoch_)
    np.testing.assert_array_equal(disk.val_accuracy_, mem.val_accuracy_)
    np.testing.assert_array_equal(disk.decision_function(X[700:].astype(np.float32)),
                                  mem.decision_function(X[700:].astype(np.float32)))
    a, b = disk.evaluate(z_test, y[700:]), mem.evaluate(X[700:].astype(np.float32), y[700:])
    np.testing.assert_array_equal(a["test_accuracy"], b["test_accuracy"])
    # validation rows from a split of their own, joined on disk
    v_disk = SubsetProbes(max_memory_mb=16, **kw).fit(z_train, y[:700], validation=(z_test, y[700:]))
    v_mem = SubsetProbes(**kw).fit(X[:700].astype(np.float32), y[:700], validation=(X[700:].astype(np.float32),
                                                                                        y[700:]))
    np.testing.assert_array_equal(v_disk.val_accuracy_, v_mem.val_accuracy_)
    for bad in (dict(mode="pca"), dict(mode="randproj"), dict(solver="ridge")):
        with pytest.raises(errors.IncompatibleParametersError, match="exceed max_memory_mb=16"):
            SubsetProbes(max_memory_mb=16, **{**kw, **bad}).fit(z_train, y[:700])


def test_a_probe_that_diverges_is_an_error_naming_the_draws_not_chance_accuracy(data):
    """Features of magnitude 1e17 under lr = 1e3 (both within their declared ranges): the logits
    overflow, the loss becomes NaN; the fit stops with one error naming the draws and the protocol,
    instead of rows at chance accuracy."""
    Xtr, ytr, _, _ = data
    est = SubsetProbes(fractions=(0.5, 1.0), seeds=(0,), epochs=3, lr=1000.0, device="cpu")
    with pytest.raises(errors.ProbeDivergedError, match=r"\d of 3 probes diverged \(training loss NaN or inf in epoch "
                                                        r"\d: random k=\d+ seed 0.*lr=1000, weight_decay=0\.0001"):
        est.fit(Xtr * 1e17, ytr)
    assert not hasattr(est, "batches_")  # nothing fitted is left behind


def test_fewer_than_two_classes_is_an_error_before_any_training(data):
    Xtr, _, _, _ = data
    with pytest.raises(errors.InvalidFeaturesError, match=r"the train rows hold 1 class \(1 declared\): a probe needs at "
                                                          r"least 2"):
        SubsetProbes(fractions=(0.5,), seeds=(0,), epochs=1, device="cpu").fit(Xtr, np.zeros(len(Xtr), dtype=int))


def test_a_batch_size_beyond_the_train_rows_allocates_only_what_they_fill(data):
    """batch_size = 2**20 on 810 train rows: buffers the size of the train rows (not of 2**20
    minibatch rows), and the probes of batch_size = the train rows themselves."""
    Xtr, ytr, Xte, _ = data
    kw = dict(fractions=(0.5,), seeds=(0,), epochs=2, device="cpu")
    huge = SubsetProbes(batch_size=1 << 20, **kw).fit(Xtr, ytr)
    exact = SubsetProbes(batch_size=len(huge.train_indices_), **kw).fit(Xtr, ytr)
    np.testing.assert_allclose(huge.decision_function(Xte), exact.decision_function(Xte), rtol=1e-5, atol=1e-5)
