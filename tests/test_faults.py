"""Fault injection not covered elsewhere: failing writes, concurrent sweeps, corrupt groups."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

import featstore
import pipelines
import probes
from featstore import errors

from .conftest import REPO, tree_listing
from .test_sweep import _same


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied")])
def test_failed_write_during_build_is_a_clear_error_and_resumable(tmp_path, tiny, monkeypatch, code, text):
    import zarr.storage

    store = tmp_path / "s.zarr"
    (ref,) = featstore.build(**tiny, splits="train", store=tmp_path / "ref.zarr")
    real_set = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def failing_set(self, key, value):
        if "/features/c/" in f"/{key}":
            calls["n"] += 1
            if calls["n"] >= 3:
                raise OSError(code, text)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    with pytest.raises(errors.StoreError, match=f"{text}.*re-run the same command"):
        featstore.build(**tiny, splits="train", store=store)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    s = featstore.open(store)
    assert s.groups() == []  # nothing complete is listed
    (partial,) = s.groups(include_incomplete=True)
    import zarr

    done = zarr.open_array(str(store / partial.name / "progress"))[:]
    assert done.sum() == 2  # the chunks written before the failure are recorded, no more
    assert not list(store.rglob("*.partial"))
    (g,) = featstore.build(**tiny, splits="train", store=store)
    np.testing.assert_array_equal(g.numpy(), ref.numpy())


def test_failed_result_write_leaves_results_as_they_were(tmp_path, spec_file, reference, monkeypatch):
    out = tmp_path / "out"
    real = pipelines._sweep._atomic_write_bytes
    state = {"n": 0}

    def failing(path, data):
        if path.suffix == ".parquet":
            state["n"] += 1
            if state["n"] == 2:
                tmp = path.with_name(f".{path.name}.x.tmp")
                tmp.write_bytes(data[: len(data) // 2])  # a half-written file, as a full disk leaves it
                tmp.unlink()
                raise errors.StoreError(f"writing {path} failed: No space left on device")
        return real(path, data)

    monkeypatch.setattr(pipelines._sweep, "_atomic_write_bytes", failing)
    with pytest.raises(errors.StoreError, match="No space left"):
        pipelines.run_sweep(spec_file, out, progress=False)
    first = pipelines.load_results(out)
    assert first["task"].nunique() == 1  # the task before the failure, and nothing of the failed one
    assert sorted(p.name for p in (out / "results").iterdir()) == [f"{first['task'].iloc[0]}.parquet"]
    monkeypatch.setattr(pipelines._sweep, "_atomic_write_bytes", real)
    _same(pipelines.run_sweep(spec_file, out, progress=False), reference)


def test_atomic_write_cleans_up_on_os_error(tmp_path, monkeypatch):
    target = tmp_path / "x.parquet"

    def boom(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(errors.StoreError, match="nothing of this task was recorded"):
        pipelines._sweep._atomic_write_bytes(target, b"data")
    assert tree_listing(tmp_path) == []


def test_two_sweeps_into_one_output_do_not_corrupt_it(tmp_path, spec_file, reference):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "featstore.cli", "sweep", str(spec_file), "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    errs = "".join(e for _, e in outs)
    assert "another sweep is writing to" in errs and "already done" in errs
    _same(pipelines.load_results(out), reference)


def test_sweep_into_an_output_another_sweep_is_just_creating(tmp_path, spec_file, reference):
    """What the second of two sweeps started at once sees: the lock and the spec record in flight."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").touch()
    (out / ".sweep.json.1234abcd.tmp").write_text("{")
    _same(pipelines.run_sweep(spec_file, out, progress=False), reference)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".draft.tmp").write_text("mine too")  # a hidden temporary file that is not a sweep's
    for path, listing in ((foreign, ["notes.txt"]), (hidden, [".draft.tmp"])):
        with pytest.raises(errors.InvalidParameterError, match="non-empty directory without a sweep.json"):
            pipelines.run_sweep(spec_file, path, progress=False)
        assert tree_listing(path) == listing


def test_probes_and_cka_refuse_a_corrupt_group(tmp_path, tiny):
    store = tmp_path / "s.zarr"
    (g,) = featstore.build(**tiny, splits="train", store=store)
    (store / g.name / "features" / "c" / "1" / "0").unlink()
    g = featstore.open(store).group(g.name)
    with pytest.raises(errors.CorruptGroupError, match=rf"{store / g.name}.*chunk 1 .*missing"):
        probes.SubsetProbes(epochs=1).fit(g)
    with pytest.raises(errors.CorruptGroupError, match="missing"):
        probes.subset_cka(g, [np.arange(3)])
