"""Sweeps: launchers agree, kill-and-resume, killed dask worker, analysis by hand, report, bad specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import featstore
import pipelines
import probes
from featstore import errors
from pipelines import load_results, load_spec, run_sweep

from .conftest import REPO, run_cli, tree_listing

SPEC = """
store = "{store}"

[[groups]]
model = "test_resnet"
layer = "pre_logits"
dataset = "{dataset}"

[selection]
modes = ["random", "pca"]
fractions = [0.1, 0.5, 1.0]
seeds = [0, 1]

[probe]
epochs = 3
batch_size = 8

[metrics]
cka = true
cka_estimator = "biased"
"""

KEY_COLUMNS = ["task", "mode", "fraction", "k", "seed", "draw"]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, image_folder):
    store = tmp_path_factory.mktemp("sweep") / "s.zarr"
    featstore.build("test_resnet", weights="random", dataset=f"imagefolder:{image_folder}", image_size=32,
                    batch_size=8, workers=0, progress=False, splits="train,test", store=store, dtype="float32")
    return store, f"imagefolder:{image_folder}"


@pytest.fixture
def spec_file(tmp_path, sweep_store):
    store, dataset = sweep_store
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(store=store, dataset=dataset))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sweep_store):
    store, dataset = sweep_store
    d = tmp_path_factory.mktemp("ref")
    (d / "spec.toml").write_text(SPEC.format(store=store, dataset=dataset))
    df = run_sweep(d / "spec.toml", d / "out", launcher="local", progress=False)
    df.attrs["out"] = str(d / "out")
    return df


def _same(a: pd.DataFrame, b: pd.DataFrame):
    a = a.sort_values(KEY_COLUMNS, na_position="first").reset_index(drop=True)
    b = b.sort_values(KEY_COLUMNS, na_position="first").reset_index(drop=True)
    assert len(a) == len(b)
    assert not a.duplicated(["task", "draw"]).any()
    pd.testing.assert_frame_equal(a[KEY_COLUMNS], b[KEY_COLUMNS])
    np.testing.assert_array_equal(a["test_accuracy"], b["test_accuracy"])
    np.testing.assert_allclose(a["cka"], b["cka"], rtol=1e-9)
    np.testing.assert_allclose(a["val_accuracy"], b["val_accuracy"])
    for x, y in zip(a["per_class_accuracy"], b["per_class_accuracy"]):
        np.testing.assert_allclose(x, y)


def test_sweep_rows_and_columns(reference):
    df = reference
    # per group: full under each seed's order (2 tasks) + random x 2 seeds + pca (1 task), 3 fractions each
    assert len(df) == 2 + 2 * 3 + 3
    full = df[df["mode"] == "full"]
    assert sorted(full["seed"]) == [0, 1] and (full["k"] == full["n_neurons"]).all()
    pca = df[df["mode"] == "pca"].sort_values("fraction")
    assert list(pca["k"]) == [9, 26, 26] and set(pca["rank"]) == {26}  # 27 train rows: rank 26
    assert set(df["mode"]) == {"full", "random", "pca"}
    assert {"model", "layer", "dataset", "mode", "fraction", "k", "seed", "test_accuracy", "per_class_accuracy",
            "val_accuracy", "best_epoch", "cka", "cka_estimator", "neurons", "train_group", "test_group",
            "seconds_task", "protocol"} <= set(df.columns)
    assert (df["cka_estimator"] == "biased").all()
    full = df[df["mode"] == "full"].iloc[0]
    assert full["cka"] == pytest.approx(1.0) and full["k"] == 96
    rnd = df[(df["mode"] == "random") & (df["seed"] == 0)].sort_values("k")
    assert list(rnd["k"]) == [9, 48, 96]
    assert set(rnd["neurons"].iloc[0]) <= set(rnd["neurons"].iloc[1])  # nested, one seed
    assert json.loads(df["protocol"].iloc[0])["epochs"] == 3


def test_one_fit_per_pairing_gives_the_rows_of_one_fit_per_task(tmp_path, spec_file, reference):
    """By default a pairing's tasks (its references, random x 2 seeds, pca) train in one fit; with
    --fits-per-pairing past the task count each trains alone, as sweeps did before: the same rows
    (each task's draws, initial weights and minibatch orders are its own; the joint fit only groups
    their products, so losses agree to float rounding and, on these few images, accuracies and
    best epochs exactly). The same task ids, so either resumes the other."""
    alone = run_sweep(spec_file, tmp_path / "alone", fits_per_pairing=100, progress=False)
    _same(alone, reference)
    assert set(alone["task"]) == set(reference["task"])
    assert set(reference["fit_tasks"]) == {5} and set(alone["fit_tasks"]) == {1}
    a = alone.sort_values(KEY_COLUMNS, na_position="first").reset_index(drop=True)
    b = reference.sort_values(KEY_COLUMNS, na_position="first").reset_index(drop=True)
    np.testing.assert_array_equal(a["best_epoch"], b["best_epoch"])
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    assert (b.groupby("task")["seconds_fit"].first().nunique() == 1)  # one fit's time, recorded by each task


@pytest.mark.parametrize("probe, check", [
    ('solver = "lbfgs"\nCs = [0.01, 1.0]',
     lambda df: set(df["C"]) <= {0.01, 1.0} and (df["n_iter"] > 0).all() and df["converged"].dtype == bool),
    ('solver = "knn"\nks = [1, 3]', lambda df: set(df["knn_k"]) <= {1, 3} and df["train_loss"].isna().all()),
    ("lrs = [0.01, 0.1]\nweight_decays = [0.0, 0.001]",
     lambda df: set(df["lr"]) <= {0.01, 0.1} and set(df["weight_decay"]) <= {0.0, 0.001}),
], ids=["lbfgs", "knn", "sgd-grid"])
def test_a_sweep_records_each_draws_protocol_choice(tmp_path, spec_file, probe, check):
    """[probe] of another solver (lbfgs's C grid, knn's ks) or an SGD lr x weight-decay grid: every
    row records what its draw chose; the protocol is in the rows."""
    spec = spec_file.read_text().replace("epochs = 3", "epochs = 3\n" + probe)
    spec = spec.replace('modes = ["random", "pca"]', 'modes = ["random"]')
    spec = spec.replace("[[groups]]\n", '[[groups]]\nname = "under test"\n')  # the report's name for it
    (tmp_path / "protocol.toml").write_text(spec)
    df = run_sweep(tmp_path / "protocol.toml", tmp_path / "out", progress=False)
    assert check(df), df.head()
    assert set(df["pairing_name"]) == {"under test"}
    solver = probe.split('"')[1] if "solver" in probe else "sgd"
    assert {json.loads(p)["solver"] for p in df["protocol"]} == {solver}


def test_the_fit_per_pairing_option_is_checked(tmp_path, spec_file):
    r = run_cli("sweep", spec_file, "--out", tmp_path / "o", "--fits-per-pairing", "0")
    assert r.returncode == 2 and "--fits-per-pairing" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("launcher", [name for name in pipelines.LAUNCHERS if name not in ("local", "slurm")])  # slurm: test_slurm.py
def test_launchers_agree_with_local(tmp_path, spec_file, reference, launcher):
    df = run_sweep(spec_file, tmp_path / "out", launcher=launcher, workers=2, progress=False)
    _same(df, reference)


def test_a_worker_reads_a_group_and_takes_its_cka_pass_once(tmp_path, spec_file, reference, monkeypatch):
    import probes

    calls = {"read": 0, "cka_pass": 0}
    real_read, real_stats = probes.load_training_data, probes.cka_statistics

    def read(*args, **kwargs):
        calls["read"] += 1
        return real_read(*args, **kwargs)

    def stats(*args, **kwargs):
        calls["cka_pass"] += 1
        return real_stats(*args, **kwargs)

    monkeypatch.setattr(probes, "load_training_data", read)
    monkeypatch.setattr(probes, "cka_statistics", stats)
    _same(run_sweep(spec_file, tmp_path / "out", progress=False), reference)
    assert calls == {"read": 2, "cka_pass": 1}  # 4 tasks: train + test read once, one d x d pass
    assert pipelines.FeatureCache.key() is None  # freed when the sweep ends


def test_group_cache_reads_a_rebuilt_or_other_group_afresh(monkeypatch):
    from types import SimpleNamespace as NS

    import probes

    reads = []
    monkeypatch.setattr(probes, "load_training_data",
                        lambda g, *a, **k: reads.append(g.path) or NS(n_classes=3, X=None))

    def group(path, built):
        return NS(path=path, provenance={"created": built}, timings={"completed": built})

    cache = pipelines.FeatureCache
    try:
        first = cache.get(group("s/a_train", "t0"), group("s/a_test", "t0"))
        assert cache.get(group("s/a_train", "t0"), group("s/a_test", "t0")) is first
        assert reads == ["s/a_train", "s/a_test"]
        cache.get(group("s/a_train", "t1"), group("s/a_test", "t0"))  # rebuilt in place
        cache.get(group("s/b_train", "t0"), group("s/b_test", "t0"))  # another layer
        assert reads == ["s/a_train", "s/a_test"] * 2 + ["s/b_train", "s/b_test"]
    finally:
        cache.clear()


def test_group_cache_is_safe_across_threads_of_one_worker(monkeypatch):
    """dask workers with --nthreads N run tasks in threads: one read per group, and a task's
    features and CKA statistics stay its own when another thread moves the cache on."""
    import threading
    import time
    from types import SimpleNamespace as NS

    import probes

    reads = []

    def slow_read(g, *a, **k):
        reads.append(g.path)
        time.sleep(0.05)
        return NS(n_classes=3, X=g.path)

    monkeypatch.setattr(probes, "load_training_data", slow_read)
    monkeypatch.setattr(probes, "cka_statistics", lambda X, estimator: (time.sleep(0.05), ("pass over", X))[1])

    def group(path):
        return NS(path=path, provenance={"created": "t0"}, timings={"completed": "t0"})

    cache = pipelines.FeatureCache
    got = []
    try:
        threads = [threading.Thread(target=lambda: got.append(cache.get(group("s/a_train"), group("s/a_test"))))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert reads == ["s/a_train", "s/a_test"] and all(e is got[0] for e in got)
        a = got[0]
        stats = []
        threads = [threading.Thread(target=lambda: stats.append(a.cka_statistics("biased"))) for _ in range(4)]
        for t in threads:
            t.start()
        b = cache.get(group("s/b_train"), group("s/b_test"))  # another thread's task moves the cache on
        for t in threads:
            t.join()
        assert stats == [("pass over", "s/a_train")] * 4 and all(x is stats[0] for x in stats)
        assert (a.train.X, b.train.X, b.cka_statistics("biased")) == ("s/a_train", "s/b_train", ("pass over", "s/b_train"))
    finally:
        cache.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sweep_on_cuda_agrees_with_cpu(tmp_path, spec_file, reference):
    """Same tasks and rows; CKA (computed from the cached features) identical; probes trained on
    the GPU: the engine's GPU-vs-CPU equality is tested in test_probes, here a flipped
    prediction or two on the tiny test split is allowed."""
    df = run_sweep(spec_file, tmp_path / "out", device="cuda", progress=False)
    a = df.sort_values(KEY_COLUMNS, na_position="first").reset_index(drop=True)
    b = reference.sort_values(KEY_COLUMNS, na_position="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(a[KEY_COLUMNS], b[KEY_COLUMNS])
    np.testing.assert_allclose(a["cka"], b["cka"], rtol=1e-9)
    assert np.abs(a["test_accuracy"] - b["test_accuracy"]).max() <= 0.26


@pytest.mark.parametrize("fault", ["task-rows:1", "task-rows:3", "task-done:2", "task-done:3"])
def test_killed_sweep_resumes_to_exactly_one_runs_rows(tmp_path, spec_file, reference, fault):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "featstore.cli", "sweep", str(spec_file), "--out", str(out), "--no-progress"]
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FEATSTORE_FAULT": fault},
                            cwd=REPO, timeout=600)
    assert killed.returncode == -9, killed.stderr
    partial = load_results(out)
    assert len(partial) < len(reference)  # what was recorded is complete tasks only
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr
    assert ("already done" in again.stderr) == (len(partial) > 0)
    _same(load_results(out), reference)


@pytest.mark.parametrize("workers, threads", [(2, 1), (1, 3)])  # (1, 3): tasks in threads of one process
def test_dask_with_an_existing_scheduler_address(tmp_path, spec_file, reference, workers, threads):
    from distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        df = run_sweep(spec_file, tmp_path / "out", launcher="dask", scheduler=cluster.scheduler_address,
                       progress=False)
    _same(df, reference)


def test_killed_dask_worker_loses_no_task(tmp_path, spec_file, reference, monkeypatch):
    once = tmp_path / "killed-once"
    # the first worker to commit a task's rows dies (SIGKILL) before recording it done
    monkeypatch.setenv("FEATSTORE_FAULT", "task-rows:1")
    monkeypatch.setenv("FEATSTORE_FAULT_ONCE", str(once))
    df = run_sweep(spec_file, tmp_path / "out", launcher="dask", workers=2, progress=False)
    assert once.exists()  # a worker really was killed
    _same(df, reference)


SEVERAL_PAIRINGS = set(pipelines._report.COMPARISONS)  # figures that compare pairings


def test_report_renders_every_figure(tmp_path, reference):
    page = pipelines.write_report(reference.attrs["out"], tmp_path / "report")
    single = [name for name in pipelines._report.FIGURES if name not in SEVERAL_PAIRINGS]
    for name in single:
        png = tmp_path / "report" / f"{name}.png"
        assert png.exists() and png.stat().st_size > 10_000, name
    assert not any((tmp_path / "report" / f"{name}.png").exists() for name in SEVERAL_PAIRINGS)  # one pairing
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(single)
    assert "DR(δ) from accuracy, random neurons" in text and "Critical fraction" in text


def test_a_layers_group_sweeps_depth_and_the_report_shows_it(tmp_path, image_folder):
    """`layers = [...]` in one [[groups]] table: one pairing per layer (all from one build pass),
    in the listed order; the report adds the depth and comparison figures. The layers share
    their rows: with share_rows="on" (a GPU's default) both train in one fit, to the same rows."""
    store = tmp_path / "s.zarr"
    featstore.build("test_resnet", weights="random", dataset=f"imagefolder:{image_folder}", image_size=32,
                    batch_size=8, workers=0, progress=False, splits="train,test", store=store, dtype="float32",
                    layers="layer2,pre_logits")
    spec = load_spec({"groups": [{"model": "test_resnet", "dataset": f"imagefolder:{image_folder}",
                                  "layers": ["layer2", "pre_logits"]}],
                      "selection": {"modes": ["random"], "fractions": [0.25, 1.0], "seeds": [0, 1]},
                      "probe": {"epochs": 2, "batch_size": 8}, "metrics": {"cka": False}}, store=str(store))
    assert [g.layer for g in spec.pairings()] == ["layer2", "pre_logits"]
    df = run_sweep(spec, tmp_path / "out", progress=False)
    assert df.groupby("group")["layer"].first().tolist() == ["layer2", "pre_logits"]
    assert df.groupby("group")["n_neurons"].first().tolist() == [48, 96]  # test_resnet: layer2 48 wide
    assert set(df["fit_tasks"]) == {4}  # on the CPU (auto): a fit per pairing (2 references + 2 seeds)
    joined = run_sweep(spec, tmp_path / "joined", progress=False, share_rows="on")
    assert set(joined["fit_tasks"]) == {8}  # both layers in one fit
    _same(joined, df)
    page = pipelines.write_report(tmp_path / "out", tmp_path / "report").read_text()
    for name in SEVERAL_PAIRINGS:
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 10_000
    # one answer per pairing first; the comparisons in their own section, overlaid where axes are shared
    assert page.count("<p class='answer'>") == 2 and "test_resnet / layer2 /" in page
    section = page[page.index("Comparisons across pairings"):page.index("<h2>Details</h2>")]
    assert all(f"fig-{name}" in section for name in SEVERAL_PAIRINGS)


# ------------------------------------------------------------------ analysis by hand


def _table(rows):
    base = dict(group=0, model="m", layer="l", dataset="d", cka=np.nan, cka_estimator=None, task="t", n_neurons=100)
    return pd.DataFrame([{**base, **r} for r in rows])


def test_gini_and_cov_by_hand():
    assert pipelines.gini([1, 1, 1, 1]) == 0.0
    # x = (0, 0, 0, 1): sum |xi - xj| = 6, n = 4, mean = 0.25 -> 6 / (2 * 16 * 0.25) = 0.75
    assert pipelines.gini([0, 0, 0, 1]) == pytest.approx(0.75)
    # x = (1, 2, 3): sum |xi - xj| = 8, n = 3, mean = 2 -> 8 / 36
    assert pipelines.gini([1, 2, 3]) == pytest.approx(8 / 36)
    assert pipelines.coefficient_of_variation([1, 2, 3]) == pytest.approx(np.std([1, 2, 3]) / 2)


def test_diffused_redundancy_by_hand():
    # full layer 0.80; random curve (mean over 2 seeds): f=0.1 -> 0.60, f=0.2 -> 0.74, f=0.5 -> 0.78, f=1 -> 0.80
    rows = [dict(mode="full", fraction=1.0, k=100, seed=None, test_accuracy=0.80, per_class_accuracy=[0.8, 0.8])]
    for seed, accs in ((0, (0.58, 0.73, 0.78, 0.80)), (1, (0.62, 0.75, 0.78, 0.80))):
        for f, a in zip((0.1, 0.2, 0.5, 1.0), accs):
            rows.append(dict(mode="random", fraction=f, k=int(f * 100), seed=seed, test_accuracy=a,
                             per_class_accuracy=[a, a]))
    df = _table(rows)
    dr = pipelines.diffused_redundancy(df, deltas=(0.7, 0.9, 0.95, 0.99), n_boot=50).set_index("delta")["dr"]
    # δ=0.7: need >= 0.56 -> f=0.1 -> DR 0.9; δ=0.9: >= 0.72 -> f=0.2 -> 0.8;
    # δ=0.95: >= 0.76 -> f=0.5 -> 0.5; δ=0.99: >= 0.792 -> f=1.0 -> 0.0
    assert dr.to_dict() == pytest.approx({0.7: 0.9, 0.9: 0.8, 0.95: 0.5, 0.99: 0.0})
    crit = pipelines.critical_fraction(df)
    assert crit.iloc[0, -1] == 0.5  # 0.78 / 0.80 = 0.975 >= 0.95; 0.74 / 0.8 = 0.925 < 0.95
    curve = pipelines.accuracy_curve(df)
    row = curve[curve["fraction"] == 0.2].iloc[0]
    assert row["mean"] == pytest.approx(0.74) and row["relative"] == pytest.approx(0.925)
    assert row["min"] == 0.73 and row["max"] == 0.75


def test_dr_from_cka_by_hand():
    rows = [dict(mode="full", fraction=1.0, k=10, seed=None, test_accuracy=0.9, per_class_accuracy=[0.9], cka=1.0,
                 n_neurons=10)]
    for f, c in ((0.1, 0.5), (0.5, 0.92), (1.0, 1.0)):
        rows.append(dict(mode="random", fraction=f, k=int(f * 10), seed=0, test_accuracy=0.9, per_class_accuracy=[0.9],
                         n_neurons=10,
                         cka=c))
    dr = pipelines.diffused_redundancy(_table(rows), deltas=(0.5, 0.9, 0.95), source="cka", n_boot=10)
    assert dr["dr"].tolist() == pytest.approx([0.9, 0.5, 0.0])


def test_dr_on_effective_fractions_with_censoring_and_per_seed_references_by_hand():
    """d = 512: the nominal fractions 0.0005, 0.001, 0.002 are all k = 1. DR uses k/d; a value
    reached at the smallest k is a lower bound, one reached nowhere is NaN; the bootstrap
    resamples each seed's full-layer reference with its curve."""
    d = 512
    curves = {0: (0.40, 0.40, 0.40, 0.60, 0.76, 0.79), 1: (0.42, 0.42, 0.42, 0.63, 0.798, 0.83)}
    rows = [dict(mode="full", fraction=1.0, k=d, seed=s, test_accuracy=acc, per_class_accuracy=[acc], n_neurons=d)
            for s, acc in ((0, 0.80), (1, 0.84))]  # references: each seed's curve is 0.5, 0.75, 0.95 of it, then < 1
    for seed, accs in curves.items():
        for f, a in zip((0.0005, 0.001, 0.002, 0.01, 0.1, 1.0), accs):
            rows.append(dict(mode="random", fraction=f, k=max(1, int(f * d)), seed=seed, test_accuracy=a,
                             per_class_accuracy=[a], n_neurons=d))
    dr = pipelines.diffused_redundancy(_table(rows), deltas=(0.45, 0.7, 0.94, 0.999), n_boot=300).set_index("delta")
    # δ = 0.45: reached at k = 1 -> DR = 1 - 1/512 (not 1 - 0.0005), a lower bound
    assert dr.loc[0.45, "dr"] == pytest.approx(1 - 1 / d) and dr.loc[0.45, "censored"] == "at grid edge"
    # δ = 0.7: k = 5 (0.615 >= 0.574) -> 1 - 5/512, not censored
    assert dr.loc[0.7, "dr"] == pytest.approx(1 - 5 / d) and dr.loc[0.7, "censored"] == ""
    # δ = 0.94: k = 51 reaches 0.95 of its own seed's reference in every resample -> a point interval
    assert dr.loc[0.94, "dr"] == pytest.approx(1 - 51 / d)
    assert dr.loc[0.94, "dr_low"] == dr.loc[0.94, "dr_high"] == pytest.approx(1 - 51 / d)
    # δ = 0.999: the curve never reaches 0.999 x 0.82 -> NaN, "not reached"
    assert np.isnan(dr.loc[0.999, "dr"]) and dr.loc[0.999, "censored"] == "not reached"
    table = pipelines.dr_table(_table(rows), deltas=(0.45, 0.7, 0.999), n_boot=50)
    assert table.iloc[0].tolist()[0].startswith("≥ 0.998") and table.iloc[0].tolist()[2] == "not reached"
    # a single full-layer row (results of older sweeps) is a fixed reference
    one_ref = _table([r for r in rows if not (r["mode"] == "full" and r["seed"] == 1)])
    assert pipelines.diffused_redundancy(one_ref, deltas=(0.7,), n_boot=10)["dr"].iloc[0] == pytest.approx(1 - 5 / d)


def test_absent_classes_are_nan_and_left_out_of_inequality(data=None):
    import probes

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    est = probes.SubsetProbes(fractions=(0.5,), seeds=(0,), epochs=2, device="cpu").fit(X, y, n_classes=4)
    res = est.evaluate(X[:100], y[:100])  # class 3 has no sample
    per_class = np.array(res["per_class_accuracy"].iloc[0])
    assert np.isnan(per_class[3]) and not np.isnan(per_class[:3]).any()
    assert pipelines.gini(per_class) == pytest.approx(pipelines.gini(per_class[:3]))
    assert pipelines.coefficient_of_variation(per_class) == pytest.approx(np.std(per_class[:3]) / np.mean(per_class[:3]))


# ------------------------------------------------------------------ bad specs: clear errors, nothing written


def _set(key, value):
    """An edit of the spec: put ``key = value`` (TOML) at the top of its [section]."""
    section, name = key.split(".")
    return lambda s: s.replace(f"[{section}]", f"[{section}]\n{name} = {value}", 1)


@pytest.mark.parametrize("edit, error, message", [
    # the four cases found by trying the demo store as a new user
    (lambda s: s.replace("cka = true", 'cka = "false"'), errors.InvalidParameterError,
     "metrics.cka: expected true or false; got 'false' (string)"),
    (_set("probe.momentum", '"0.9"'), errors.InvalidParameterError,
     "probe.momentum: expected a number in [0, 1); got '0.9' (string)"),
    (lambda s: s.replace('cka_estimator = "biased"', 'cka_estimator = "minibatch"\ncka_batch_size = 0'),
     errors.InvalidParameterError, "metrics.cka_batch_size: expected an integer in [4, 1048576]; got 0 (integer)"),
    # unknown keys, anywhere
    (lambda s: s + "\n[extra]\nx = 1\n", errors.UnknownKeyError,
     "Unknown key extra (= {'x': 1}); allowed here: " + ", ".join(sorted(pipelines.SweepSpec.model_fields))),
    (_set("probe.momemtum", "0.5"), errors.UnknownKeyError,
     "Unknown key probe.momemtum (= 0.5); allowed here: " + ", ".join(sorted(probes.Protocol.model_fields))),
    (_set("probe.randproj_distribution", '"gaussian"'), errors.UnknownKeyError,
     "Unknown key probe.randproj_distribution"),  # a selection key: it lives in [selection]
    (lambda s: s.replace('layer = "pre_logits"', 'layer = "pre_logits"\ntrain = { limt = 7 }'),
     errors.UnknownKeyError, "Unknown key groups[0].train.limt (= 7); allowed here: limit, split, views"),
    # wrong types, out of range, empty lists, registries
    (lambda s: s.replace("epochs = 3", "epochs = true"), errors.InvalidParameterError,
     "probe.epochs: expected an integer in [1, 10000]; got True (boolean)"),
    (lambda s: s.replace("epochs = 3", "epochs = 0"), errors.InvalidParameterError,
     "probe.epochs: expected an integer in [1, 10000]; got 0 (integer)"),
    (_set("probe.solver", '"adam"'), errors.UnknownNameError,
     "probe.solver: Unknown solver 'adam'; known: knn, lbfgs, ridge, sgd"),
    # a protocol the groups' rows cannot serve: refused from the groups' sizes, before any task
    (lambda s: s.replace("epochs = 3", 'epochs = 3\nsolver = "knn"\nks = [100000]'),
     errors.IncompatibleParametersError, "ks=[100000] cannot be used here: a vote over k neighbours needs k train"),
    (lambda s: s.replace("[[groups]]\n", '[[groups]]\nname = ""\n'), errors.InvalidParameterError,
     "groups[0].name: expected a string of 1 to 80 characters (or left out); got '' (string)"),
    (lambda s: s.replace('modes = ["random", "pca"]', 'modes = ["random", "lottery"]'), errors.UnknownNameError,
     "selection.modes[1]: Unknown selection mode 'lottery'; known: pca, pca-least, prefix, random, randproj"),
    (lambda s: s.replace('modes = ["random", "pca"]', "modes = []"), errors.InvalidParameterError,
     "selection.modes: expected a non-empty list without repeats, each item one of"),
    (lambda s: s.replace("fractions = [0.1, 0.5, 1.0]", "fractions = []"), errors.IncompatibleParametersError,
     "selection.sizes=[] cannot be used here: fractions is empty and so is sizes: give at least one fraction or size"),
    (lambda s: s.replace("fractions = [0.1, 0.5, 1.0]", "fractions = [0.1, 1.5]"), errors.InvalidParameterError,
     "selection.fractions[1]: expected a number in (0, 1]; got 1.5 (float)"),
    (lambda s: s.replace("fractions = [0.1, 0.5, 1.0]", 'fractions = [0.1, "0.5"]'), errors.InvalidParameterError,
     "selection.fractions[1]: expected a number in (0, 1]; got '0.5' (string)"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [0, -2]"), errors.InvalidParameterError,
     "selection.seeds[1]: expected an integer in [0, 4294967295]; got -2 (integer)"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [0, 1.5]"), errors.InvalidParameterError,
     "selection.seeds[1]: expected an integer in [0, 4294967295]; got 1.5 (float)"),
    # degenerate values that TOML allows: refused by their declared ranges, before any work
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [9223372036854775807]"), errors.InvalidParameterError,
     "selection.seeds[0]: expected an integer in [0, 4294967295]; got 9223372036854775807 (integer)"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [1e30]"), errors.InvalidParameterError,
     "selection.seeds[0]: expected an integer in [0, 4294967295]; got 1e+30 (float)"),
    (_set("probe.lr", "inf"), errors.InvalidParameterError, "probe.lr: expected a number in (0, 1000]; got inf (float)"),
    (_set("probe.weight_decay", "inf"), errors.InvalidParameterError,
     "probe.weight_decay: expected a number in [0, 1]; got inf (float)"),
    (lambda s: s.replace("batch_size = 8", "batch_size = 1000000000000"), errors.InvalidParameterError,
     "probe.batch_size: expected an integer in [1, 1048576]; got 1000000000000 (integer)"),
    (lambda s: s.replace("epochs = 3", "epochs = 1000000000000"), errors.InvalidParameterError,
     "probe.epochs: expected an integer in [1, 10000]; got 1000000000000 (integer)"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [1, 1]"), errors.InvalidParameterError,
     "selection.seeds: expected a non-empty list without repeats"),
    (lambda s: s.replace('cka_estimator = "biased"', 'cka_estimator = "rbf"'), errors.UnknownNameError,
     "metrics.cka_estimator: Unknown CKA estimator 'rbf'; known: biased, minibatch, unbiased"),
    (lambda s: s.replace('model = "test_resnet"', 'model = "../x"'), errors.InvalidParameterError,
     "groups[0].model: expected a timm model name, or SOURCE:NAME (open_clip:, hf:, torchvision:); "
     "`featstore layers MODEL` checks one"),  # module: is Python-only: a spec cannot name one
    (lambda s: s.replace('model = "test_resnet"\n', ""), errors.MissingKeyError, "groups[0].model is required"),
    # groups that are not in the store
    (lambda s: s.replace('model = "test_resnet"', 'model = "resnet50"'), errors.GroupNotFoundError,
     "sweep group resnet50/pre_logits/"),
    (lambda s: s.replace('layer = "pre_logits"', 'layer = "pre_logits"\ntrain = { limit = 7 }'),
     errors.GroupNotFoundError, "(train): No group matching"),
], ids=lambda v: None)
def test_bad_specs_fail_before_any_work(tmp_path, spec_file, monkeypatch, edit, error, message):
    import probes

    spec_file.write_text(edit(spec_file.read_text()))
    out = tmp_path / "out"
    monkeypatch.setattr(probes, "load_training_data", lambda *a, **k: pytest.fail("a task started"))
    with pytest.raises(error) as e:
        run_sweep(spec_file, out, progress=False)
    assert message in str(e.value)
    assert not out.exists()


def test_spec_errors_on_the_command_line_are_one_line_and_exit_2(tmp_path, spec_file):
    spec_file.write_text(_set("probe.momentum", '"0.9"')(spec_file.read_text()))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "featstore.cli", "sweep", str(spec_file), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("featstore sweep: error: probe.momentum: expected a number in [0, 1); "
                                   "got '0.9' (string)")
    assert not out.exists()
    for args, text in ((["--workers", "0"], "--workers: expected an integer >= 1; got 0 (integer)"),
                       (["--workers", "two"], "--workers: expected an integer >= 1; got 'two' (string)"),
                       (["--launcher", "pbs"], "--launcher: Unknown launcher 'pbs'; known: dask, joblib, local, slurm"),
                       (["--scheduler", "tcp://x:1"], "scheduler='tcp://x:1' cannot be used here: --launcher local")):
        proc = subprocess.run([sys.executable, "-m", "featstore.cli", "sweep", str(spec_file), "--out", str(out),
                               *args], capture_output=True, text=True, cwd=REPO, timeout=600)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert text in proc.stderr, (args, proc.stderr)
        assert not out.exists()


def test_probe_keys_are_the_estimators_parameters(tmp_path, spec_file, monkeypatch):
    """[probe] takes exactly probes.Protocol (ridge_alphas included), [metrics] cka_* exactly
    probes.CKAOptions, [selection] probes.Selection; each task's estimator gets them."""
    import probes

    spec = load_spec(spec_file)
    assert set(spec.probe.model_dump()) == set(probes.Protocol.model_fields)
    assert {k for k in spec.metrics.model_dump() if k.startswith("cka_")} == {
        f"cka_{k}" for k in probes.CKAOptions.model_fields}
    assert set(probes.Selection.model_fields) - {"mode"} <= set(spec.selection.model_dump())
    spec_file.write_text(spec_file.read_text().replace("epochs = 3", 'solver = "ridge"\nridge_alphas = [0.01, 1.0]'))
    df = run_sweep(spec_file, tmp_path / "out", progress=False)
    protocol = json.loads(df["protocol"].iloc[0])
    assert protocol["solver"] == "ridge" and protocol["ridge_alphas"] == [0.01, 1.0]
    assert set(protocol) == set(probes.Protocol.model_fields)
    assert set(df["solver"]) == {"ridge"}


def test_a_preset_fills_what_the_spec_does_not_write(spec_file):
    """`preset = "original"`: the released code's values per dataset, under the keys the spec
    writes; the resolved protocol is part of the key."""
    text = spec_file.read_text()
    paper = load_spec(spec_file)
    spec_file.write_text('preset = "original"\n' + text.replace("seeds = [0, 1]\n", ""))
    original = load_spec(spec_file)
    group = original.groups[0]
    protocol = original.protocol_for(group)
    assert protocol.val_every == 5 and protocol.train_passes == "views" and protocol.weight_decay == 1e-4
    assert protocol.epochs == 3 and protocol.batch_size == 8  # written in the spec: they win
    assert original.selection_for().seeds == (1, 2, 3, 4, 5) and original.selection_for().fractions == (0.1, 0.5, 1.0)
    assert original.key() != paper.key()
    tasks = pipelines.expand_tasks(original)
    assert {t.probe.val_every for t in tasks} == {5} and {t.seed for t in tasks if t.mode == "random"} == {1, 2, 3, 4, 5}
    cifar = original.model_copy(update={"groups": (group.model_copy(update={"dataset": "cifar10"}),)})
    resolved = cifar.protocol_for(cifar.groups[0])
    assert (resolved.weight_decay, resolved.val_transform, resolved.lr_step) == (5e-4, "augmented", 20)
    assert resolved.epochs == 3  # the spec's own value still wins over the released 100
    # an image folder names the dataset whose released schedule it takes
    spec_file.write_text(spec_file.read_text().replace('dataset = "', 'preset_dataset = "imagenet"\ndataset = "', 1)
                         .replace("epochs = 3\n", "").replace("batch_size = 8\n", ""))
    imagenet = load_spec(spec_file)
    p = imagenet.protocol_for(imagenet.groups[0])
    assert (p.epochs, p.lr_step, p.batch_size, p.weight_decay) == (10, 1, 512, 1e-4)
    assert imagenet.key() != original.key()
    spec_file.write_text(spec_file.read_text().replace('preset_dataset = "imagenet"', 'preset_dataset = "imagenet1k"'))
    with pytest.raises(errors.InvalidParameterError, match=r"groups\[0\]\.preset_dataset: Unknown dataset with a released "
                                                             r"schedule 'imagenet1k'; known: cifar10, .*imagenet,"):
        load_spec(spec_file)


def test_a_pairings_own_probe_keys_change_only_its_tasks(spec_file):
    """[groups.probe] over [probe]: that pairing's protocol and task ids change, the others' do not."""
    text = spec_file.read_text()
    second = text[text.index("[[groups]]"):text.index("[selection]")]
    one = load_spec(spec_file)
    spec_file.write_text(text.replace("[selection]", second + "[groups.probe]\nweight_decay = 5e-4\n\n[selection]"))
    two = load_spec(spec_file)
    assert [two.protocol_for(g).weight_decay for g in two.groups] == [1e-4, 5e-4]
    assert two.protocol_for(two.groups[1]).epochs == 3  # [probe] still applies under the override
    ids_one = {(t.group_index, t.mode, t.seed): t.id for t in pipelines.expand_tasks(one)}
    ids_two = {(t.group_index, t.mode, t.seed): t.id for t in pipelines.expand_tasks(two)}
    assert all(ids_two[k] == v for k, v in ids_one.items())  # group 0's tasks: the same ids
    group1 = [t for k, t in ids_two.items() if k[0] == 1]
    assert group1 and not set(group1) & set(ids_one.values())
    assert {t.probe.weight_decay for t in pipelines.expand_tasks(two) if t.group_index == 1} == {5e-4}
    assert one.key() != two.key()


def test_a_sweep_over_absolute_sizes(tmp_path, spec_file):
    spec_file.write_text(spec_file.read_text().replace("fractions = [0.1, 0.5, 1.0]", "fractions = []\nsizes = [5, 20]"))
    df = run_sweep(spec_file, tmp_path / "out", progress=False)
    rnd = df[df["mode"] == "random"]
    assert sorted(set(rnd["k"])) == [5, 20] and np.allclose(rnd["fraction"], rnd["k"] / rnd["n_neurons"])
    dr = pipelines.diffused_redundancy(df, deltas=(0.5,), n_boot=5)
    assert dr["fraction"].iloc[0] in {5 / 96, 20 / 96} or np.isnan(dr["dr"].iloc[0])


def test_a_validation_split_picks_the_best_epochs(tmp_path):
    """val = { split = "val" }: the val group validates, all of train trains; Flowers102 takes
    its official val split by default."""
    import shutil

    from .conftest import make_image_folder

    tree = make_image_folder(tmp_path / "tree", split_dirs=True)
    shutil.copytree(tree / "test", tree / "val")
    store = tmp_path / "s.zarr"
    dataset = f"imagefolder:{tree}"
    featstore.build("test_resnet", weights="random", dataset=dataset, image_size=32, batch_size=8, workers=0,
                    progress=False, splits="train,val,test", store=store, dtype="float32")
    spec = {"groups": [{"model": "test_resnet", "dataset": dataset, "val": {"split": "val"}}],
            "selection": {"modes": ["prefix"], "fractions": [0.5]}, "probe": {"epochs": 2, "batch_size": 8},
            "metrics": {"cka": False}}
    df = run_sweep(load_spec(spec, store=str(store)), tmp_path / "out", progress=False)
    val_name = featstore.open(store).group(split="val").name
    assert set(df["val_group"]) == {val_name}
    no_val = {**spec, "groups": [{"model": "test_resnet", "dataset": dataset}]}
    assert set(run_sweep(load_spec(no_val, store=str(store)), tmp_path / "o2", progress=False)["val_group"]) == {None}
    flowers = pipelines.GroupTable(model="m", dataset="flowers102")
    assert flowers.val_query()["split"] == "val" and pipelines.GroupTable(model="m", dataset="cifar10").val_query() is None


def test_evaluating_on_another_dataset_with_renamed_classes(tmp_path, image_folder_splits):
    """test = { dataset = ..., class_map = ... }: the same images under other, shuffled class
    names (as ImageNetV2's 0..999 folders) give the same-dataset test's accuracy; a class the
    probes never saw is one clear error naming it."""
    import json
    import shutil

    other = tmp_path / "renamed"
    renames = {"class_0": "z_two", "class_1": "a_zero", "class_2": "m_one"}  # another name order
    for old, new in renames.items():
        shutil.copytree(image_folder_splits / "test" / old, other / "test" / new)
    (tmp_path / "map.json").write_text(json.dumps({new: old for old, new in renames.items()}))
    store = tmp_path / "s.zarr"
    kw = dict(model="test_resnet", weights="random", image_size=32, batch_size=8, workers=0, progress=False,
              store=store, dtype="float32")
    featstore.build(**kw, dataset=f"imagefolder:{image_folder_splits}", splits="train,test")
    featstore.build(**kw, dataset=f"imagefolder:{other}", splits="test")
    base = {"selection": {"modes": ["prefix"], "fractions": [0.5, 1.0]}, "probe": {"epochs": 3, "batch_size": 8},
            "metrics": {"cka": False}}
    group = {"model": "test_resnet", "dataset": f"imagefolder:{image_folder_splits}"}
    same = run_sweep(load_spec({**base, "groups": [group]}, store=str(store)), tmp_path / "o1", progress=False)
    cross = run_sweep(load_spec({**base, "groups": [{**group, "test": {
        "dataset": f"imagefolder:{other}", "class_map": str(tmp_path / "map.json")}}]}, store=str(store)),
        tmp_path / "o2", progress=False)
    assert set(cross["test_dataset"]) == {f"imagefolder:{other.resolve()}"}
    keys = ["mode", "fraction", "seed"]
    a, b = same.sort_values(keys).reset_index(drop=True), cross.sort_values(keys).reset_index(drop=True)
    np.testing.assert_array_equal(a["test_accuracy"], b["test_accuracy"])
    by_name = {**group, "test": {"dataset": f"imagefolder:{other}"}}  # the renamed classes are not train's
    with pytest.raises(errors.ClassMapError, match="3 classes the probes were not trained on: a_zero, m_one, z_two"):
        run_sweep(load_spec({**base, "groups": [by_name]}, store=str(store)), tmp_path / "o3", progress=False)
    assert not (tmp_path / "o3").exists()


def test_numeric_class_folders_evaluate_by_index_as_under_their_source_names(tmp_path):
    """ImageNetV2's case on a 12-class toy: the test images again, in a folder without split
    subfolders whose classes are named 0 ... 11 (mixed widths; listed 0, 1, 10, 11, 2, ...),
    built whole (--splits all) and mapped by-index, score what the same-dataset test scores
    (to one image: the batches differ, so the forward's float32 rounding may); position would
    have mapped 0, 1 and 10 ... wrongly."""
    import shutil

    from .conftest import make_image_folder

    names = [f"n{c:02d}" for c in range(12)]  # sorted names: index order, as WordNet ids
    source = make_image_folder(tmp_path / "source", n_classes=12, per_class=12, split_dirs=True, names=names)
    numeric = tmp_path / "numeric"
    for c, name in enumerate(names):
        shutil.copytree(source / "test" / name, numeric / str(c))
    store = tmp_path / "s.zarr"
    kw = dict(model="test_resnet", weights="random", image_size=32, batch_size=8, workers=0, progress=False,
              store=store, dtype="float32")
    featstore.build(**kw, dataset=f"imagefolder:{source}", splits="train,test")
    (whole,) = featstore.build(**kw, dataset=f"imagefolder:{numeric}", splits="all")
    assert whole.n_samples == 48 and whole.classes[:4] == ["0", "1", "10", "11"]
    base = {"selection": {"modes": ["random"], "fractions": [0.5, 1.0], "seeds": [0]},
            "probe": {"epochs": 60, "batch_size": 16, "lr": 1.0, "lr_step": 30},  # the toy's features are small
            "metrics": {"cka": False}}
    group = {"model": "test_resnet", "dataset": f"imagefolder:{source}"}
    same = run_sweep(load_spec({**base, "groups": [group]}, store=str(store)), tmp_path / "o1", progress=False)
    cross = run_sweep(load_spec({**base, "groups": [{**group, "test": {
        "dataset": f"imagefolder:{numeric}", "split": "all", "class_map": "by-index"}}]}, store=str(store)),
        tmp_path / "o2", progress=False)
    keys = ["mode", "fraction", "seed"]
    a, b = same.sort_values(keys).reset_index(drop=True), cross.sort_values(keys).reset_index(drop=True)
    assert a["test_accuracy"].min() > 0.5  # well above chance (1/12): a mis-mapped class would show
    np.testing.assert_allclose(b["test_accuracy"], a["test_accuracy"], atol=1.01 / 48)


def test_minibatch_cka_in_a_sweep_records_its_shuffle(tmp_path, spec_file):
    spec_file.write_text(spec_file.read_text().replace(
        'cka_estimator = "biased"', 'cka_estimator = "minibatch"\ncka_batch_size = 8\ncka_shuffle_seed = 4'))
    df = run_sweep(spec_file, tmp_path / "out", progress=False)
    assert set(df["cka_estimator"]) == {"minibatch"} and set(df["cka_shuffle_seed"]) == {4}
    assert df["cka"].notna().all() and not df["cka_degenerate"].any()


def test_a_changed_declared_default_changes_the_spec_key(spec_file):
    """The key covers every declared default: a new default in the estimator's (or CKA's, or
    the selection's) declaration gives another key, so a resumed sweep cannot mix protocols."""
    code = """
import sys, probes
model, name, value = sys.argv[2], sys.argv[3], float(sys.argv[4])
if model != "none":
    cls = getattr(probes, model)
    cls.model_fields[name].default = type(cls.model_fields[name].default)(value)
    cls.model_rebuild(force=True)
import pipelines
spec = pipelines.load_spec(sys.argv[1])
print(spec.key(), dict(spec.probe)["lr"], spec.metrics.cka_batch_size)
"""

    def key(*change):
        out = subprocess.run([sys.executable, "-c", code, str(spec_file), *(change or ("none", "-", "0"))],
                             capture_output=True, text=True, cwd=REPO, timeout=600, check=True).stdout.split()
        return out

    base = key()
    lr = key("Protocol", "lr", "0.2")
    batch = key("CKAOptions", "batch_size", "128")
    assert base[1:] == ["0.1", "256"] and lr[1:] == ["0.2", "256"] and batch[1:] == ["0.1", "128"]
    assert len({base[0], lr[0], batch[0]}) == 3
    assert key() == base  # and the key itself is stable


def test_bad_launcher_and_other_spec_in_out(tmp_path, spec_file, reference):
    with pytest.raises(errors.UnknownNameError, match="launcher: Unknown launcher 'pbs'; known: dask, joblib, local, slurm"):
        run_sweep(spec_file, tmp_path / "o", launcher="pbs")
    out = tmp_path / "out"
    run_sweep(spec_file, out, progress=False)
    before = tree_listing(out)
    spec_file.write_text(spec_file.read_text().replace("epochs = 3", "epochs = 4"))
    with pytest.raises(errors.OutputConflictError, match="holds results of a different sweep spec"):
        run_sweep(spec_file, out, progress=False)
    assert tree_listing(out) == before


def test_incomplete_group_and_mismatched_train_test(tmp_path, sweep_store, image_folder):
    store, dataset = sweep_store
    # a partial group (killed build) is refused with the re-run hint
    other = tmp_path / "s.zarr"
    env = {**os.environ, "FEATSTORE_FAULT": "chunk-mark:1"}
    subprocess.run([sys.executable, "-m", "featstore.cli", "build", "--model", "test_resnet", "--weights", "random",
                    "--dataset", dataset, "--image-size", "32", "--workers", "0", "--chunk-rows", "8", "--splits",
                    "train", "--store", str(other), "--dtype", "float32", "--no-progress"], env=env, cwd=REPO)
    spec2 = load_spec({"groups": [{"model": "test_resnet", "dataset": dataset}]}, store=str(other))
    with pytest.raises(errors.IncompleteGroupError, match="Re-run the same"):
        run_sweep(spec2, tmp_path / "o1", progress=False)
    # a test group built at another image size than the train group
    featstore.build("test_resnet", weights="random", dataset=dataset, image_size=40, batch_size=8, workers=0,
                    progress=False, splits="test", store=store, dtype="float32", limit=5)
    spec3 = load_spec({"groups": [{"model": "test_resnet", "dataset": dataset, "test": {"limit": 5}}]}, store=str(store))
    with pytest.raises(errors.MismatchedGroupsError, match="were built differently .*transform"):
        run_sweep(spec3, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

