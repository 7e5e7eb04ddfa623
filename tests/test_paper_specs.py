"""The specs under sweeps/ that express the paper's experiments: every one is valid against the
declarations, and the offline ones run on the embedded default (tiny limits, short protocol)."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

import featstore
import pipelines

from .conftest import REPO

SPECS = sorted(p for p in (REPO / "sweeps").glob("*.toml") if not p.name.endswith(".build.toml"))
BUILD_SPECS = sorted((REPO / "sweeps").glob("*.build.toml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_spec_is_valid_and_expands(path):
    spec = pipelines.load_spec(path)
    tasks = pipelines.expand_tasks(spec)
    assert tasks and {t.group_index for t in tasks} == set(range(len(spec.pairings())))


@pytest.mark.parametrize("path", BUILD_SPECS, ids=lambda p: p.name)
def test_every_build_spec_builds_the_groups_its_sweep_reads(path):
    """Each sweeps/X.build.toml is valid, and every group sweeps/X.toml reads (train, test, val
    of each pairing) is one of its passes' groups: same model, dataset, split, layer, and the
    limit, views and weights the sweep asks for."""
    from featstore import BuildOptions
    from featstore._buildspec import load_build_spec

    passes = [BuildOptions(**p.options) for p in load_build_spec(path, check_data=False)]  # data: elsewhere
    sweep = pipelines.load_spec(path.with_name(path.name.replace(".build.toml", ".toml")))
    for g in sweep.pairings():
        queries = [g.train_query(), g.test_query()] + ([g.val_query()] if g.val_query() else [])
        for q in queries:
            def builds(o, q=q):
                return (o.model == q["model"] and o.dataset == q["dataset"] and o.splits == (q["split"],)
                        and q["layer"] in o.layers
                        and all(getattr(o, k) == q[k] for k in ("limit", "views", "weights") if k in q))
            assert any(builds(o) for o in passes), (path.name, q)


def _quick(path, store, **limits):
    """The spec as written, run small: its groups at tiny limits, 2 seeds, 3 epochs."""
    raw = tomllib.loads(path.read_text())
    for g in raw["groups"]:
        g["train"], g["test"] = {"limit": limits["train"]}, {"limit": limits["test"]}
    raw["selection"]["seeds"] = [0, 1]
    raw["probe"] = {**raw.get("probe", {}), "epochs": 3}
    return pipelines.load_spec(raw, store=str(store))


@pytest.mark.slow
def test_the_depth_spec_runs_offline(tmp_path):
    store = tmp_path / "s.zarr"
    spec = _quick(REPO / "sweeps" / "paper_depth_lite0.toml", store, train=200, test=100)
    layers = [g.layer for g in spec.pairings()]
    for split, limit in (("train", 200), ("test", 100)):
        featstore.build(layers=layers, splits=split, limit=limit, store=store, progress=False)
    df = pipelines.run_sweep(spec, tmp_path / "out", progress=False)
    assert df.groupby("group")["layer"].first().tolist() == layers
    pipelines.write_report(tmp_path / "out", tmp_path / "report")
    assert (tmp_path / "report" / "dr_across_depth.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_sizes_spec_runs_offline(tmp_path, demo_store):
    spec = _quick(REPO / "sweeps" / "paper_sizes_lite0.toml", demo_store, train=5000, test=1000)
    df = pipelines.run_sweep(spec, tmp_path / "out", progress=False)
    for mode in ("random", "prefix"):
        assert sorted(set(df[df["mode"] == mode]["k"])) == [8, 16, 32, 64, 128, 256, 512, 1024]
    prefix = df[df["mode"] == "prefix"].sort_values("k")
    assert list(prefix["neurons"].iloc[0]) == list(range(8))  # the first k neurons
    assert np.allclose(df["fraction"], df["k"] / df["n_neurons"])
