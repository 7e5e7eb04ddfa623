"""`featstore rm`: named and incomplete groups, all-or-nothing, never a group being built, crash-safe."""

from __future__ import annotations

import pytest

import featstore
from featstore import errors

from .conftest import run_cli, tree_listing

BUILD = ["--model", "test_resnet", "--weights", "random", "--image-size", "32", "--batch-size", "4",
         "--workers", "0", "--chunk-rows", "8", "--no-progress"]


@pytest.fixture
def store(tmp_path, image_folder):
    """A store with a complete train and test group of one layer."""
    path = tmp_path / "s.zarr"
    run_cli("build", *BUILD, "--dataset", f"imagefolder:{image_folder}", "--splits", "train,test",
            "--store", path, check=True)
    return path


def _names(path, **query):
    return sorted(g.name for g in featstore.open(path).groups(include_incomplete=True) if g.matches(**query))


def test_rm_removes_the_named_group_and_nothing_else(store, image_folder):
    (train,), (test,) = _names(store, split="train"), _names(store, split="test")
    proc = run_cli("rm", train, "--store", store, check=True)
    assert f"removed {train} (" in proc.stdout and "1 group(s) removed" in proc.stdout
    assert _names(store) == [test]
    assert not (store / train).exists()
    assert list((store / ".featstore" / "trash").iterdir()) == []
    assert featstore.open(store).group(test).numpy().shape[0] > 0  # the other group reads as before
    run_cli("build", *BUILD, "--dataset", f"imagefolder:{image_folder}", "--splits", "train", "--store", store,
            check=True)
    assert _names(store) == [test, train]  # and the removed one can be built again


def test_unknown_name_or_a_group_being_built_changes_nothing(store):
    (train,), (test,) = _names(store, split="train"), _names(store, split="test")
    before = tree_listing(store)
    proc = run_cli("rm", test, "nope", "--store", store)
    assert proc.returncode == 2
    assert "No group 'nope'" in proc.stderr and train in proc.stderr and "nothing was removed" in proc.stderr
    assert tree_listing(store) == before
    with featstore.FeatureStore(store, mode="a").lock([train]):  # a build of train is running
        proc = run_cli("rm", test, train, "--store", store)
    assert proc.returncode == 2
    assert f"group {train!r}" in proc.stderr and "being built by pid" in proc.stderr
    assert "(nothing was removed)" in proc.stderr
    assert tree_listing(store) == before


def test_bad_requests_are_refused_before_any_change(store, tmp_path):
    before = tree_listing(store)
    proc = run_cli("rm", "--store", store)
    assert proc.returncode == 2 and "groups is required: expected the names of the groups to remove" in proc.stderr
    proc = run_cli("rm", "x", "--store", tmp_path / "missing.zarr")
    assert proc.returncode == 2 and "No feature store" in proc.stderr
    assert not (tmp_path / "missing.zarr").exists()
    with pytest.raises(errors.InvalidParameterError, match="read-only"):
        featstore.FeatureStore(store).remove(_names(store))
    assert tree_listing(store) == before


def test_rm_incomplete_clears_killed_builds_only(store, image_folder, tmp_path):
    complete = _names(store)
    # one build killed mid-way (a partial group), one killed before its new group was renamed in
    killed = run_cli("build", *BUILD, "--dataset", f"imagefolder:{image_folder}", "--splits", "train",
                     "--layers", "layer2", "--store", store, env={"FEATSTORE_FAULT": "chunk-data:2"})
    assert killed.returncode != 0
    killed = run_cli("build", *BUILD, "--dataset", f"imagefolder:{image_folder}", "--splits", "test",
                     "--layers", "layer2", "--store", store, env={"FEATSTORE_FAULT": "group-created:1"})
    assert killed.returncode != 0
    (partial,) = [n for n in _names(store) if n not in complete]
    assert len(list((store / ".featstore" / "tmp").iterdir())) == 1
    before = tree_listing(store)
    dry = run_cli("rm", "--incomplete", "--dry-run", "--store", store, check=True)
    assert f"would remove {partial}" in dry.stdout and "1 group(s) would be removed" in dry.stdout
    assert tree_listing(store) == before
    run_cli("rm", "--incomplete", "--store", store, check=True)
    assert _names(store) == complete
    assert list((store / ".featstore" / "tmp").iterdir()) == []
    assert run_cli("verify", "--store", store).returncode == 0


def test_a_killed_rm_leaves_the_group_gone_and_only_trash(store):
    (train,), (test,) = _names(store, split="train"), _names(store, split="test")
    killed = run_cli("rm", train, test, "--store", store, env={"FEATSTORE_FAULT": "remove-renamed:1"})
    assert killed.returncode != 0
    assert _names(store) == [test]  # train left the store whole; test untouched
    assert featstore.open(store).group(test).verify() == []
    assert len(list((store / ".featstore" / "trash").iterdir())) == 1
    proc = run_cli("rm", "--incomplete", "--store", store, check=True)
    assert "nothing to remove" in proc.stdout
    assert list((store / ".featstore" / "trash").iterdir()) == []
