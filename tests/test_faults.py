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
    """The second task's rows hit a full disk mid-write: the first task stays recorded, nothing
    of the second is left, and a re-run finishes the sweep."""
    from featstore import fileio

    out = tmp_path / "out"
    real_fsync = os.fsync
    state = {"n": 0}

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if fileio.is_temporary(name) and ".parquet." in name:
            state["n"] += 1
            if state["n"] == 2:  # the rows are half on disk in the temporary file: the disk fills up
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(errors.WriteFailedError, match="No space left on device; nothing of this task was recorded"):
        pipelines.run_sweep(spec_file, out, progress=False)
    assert state["n"] == 2  # the failure really happened during a task's rows
    first = pipelines.load_results(out)
    assert first["task"].nunique() == 1  # the task before the failure, and nothing of the failed one
    assert sorted(p.name for p in (out / "results").iterdir()) == [f"{first['task'].iloc[0]}.parquet"]
    monkeypatch.setattr(fileio.os, "fsync", real_fsync)
    _same(pipelines.run_sweep(spec_file, out, progress=False), reference)


@pytest.mark.parametrize("replace", [True, False])
def test_atomic_write_cleans_up_on_os_error(tmp_path, monkeypatch, replace):
    from featstore import fileio

    target = tmp_path / "x.parquet"

    def boom(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", boom)
    with pytest.raises(errors.WriteFailedError, match=f"writing {target} failed: No space left on device; it is lost"):
        fileio.atomic_write(target, b"data", replace=replace, consequence="it is lost")
    assert tree_listing(tmp_path) == []


def test_atomic_write_without_replace_keeps_the_first(tmp_path):
    from featstore import fileio

    target = tmp_path / "zarr.json"
    assert fileio.atomic_write(target, b"first", replace=False) is True
    assert fileio.atomic_write(target, b"second", replace=False) is False
    assert target.read_bytes() == b"first" and tree_listing(tmp_path) == ["zarr.json"]
    assert fileio.atomic_write(target, b"third") is True and target.read_bytes() == b"third"


def test_a_busy_lock_names_its_holder_and_keeps_its_record(tmp_path):
    from featstore import fileio

    lock = tmp_path / "x.lock"
    code = ("import sys, time; from featstore import fileio\n"
            "with fileio.locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(fileio.LockBusy) as busy:
            with fileio.locked(lock, wait=False):
                pass
        assert busy.value.holder.startswith(f"pid {holder.pid} on ")
        assert lock.read_text().startswith(f"pid {holder.pid} on ")  # the failed try did not erase it
    finally:
        holder.kill()
        holder.wait()
    with fileio.locked(lock, wait=False):  # the kernel released a killed holder's lock
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")


def test_two_sweeps_into_one_output_do_not_corrupt_it(tmp_path, spec_file, reference):
    """A second sweep into an output another sweep is writing waits for it (and says so); when the
    first dies mid-sweep, the second takes over: the rows are exactly one run's. Deterministic:
    the first stops inside its second task (FEATSTORE_FAULT_MODE=hang) until the second is seen
    waiting, then is SIGKILLed."""
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "featstore.cli", "sweep", str(spec_file), "--out", str(out), "--no-progress"]
    marker = tmp_path / "first-is-inside-its-second-task"
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "FEATSTORE_FAULT": "task-started:2", "FEATSTORE_FAULT_MODE": "hang",
                                  "FEATSTORE_FAULT_ONCE": str(marker)})
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), first.communicate(timeout=10)[1]
        err_path = tmp_path / "second.err"
        with open(err_path, "w") as err:
            second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=REPO)
            while "is writing to" not in err_path.read_text() and second.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "another sweep (pid " in err_path.read_text(), err_path.read_text()  # it waits
            assert second.poll() is None
            first.kill()  # the first dies holding the output's lock, one task done
            first.wait(timeout=60)
            assert second.wait(timeout=600) == 0, err_path.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    assert "1 of " in err_path.read_text() and "already done" in err_path.read_text()
    _same(pipelines.load_results(out), reference)


def test_sweep_into_an_output_another_sweep_is_just_creating(tmp_path, spec_file, reference):
    """What the second of two sweeps started at once sees: the lock and the spec record in flight."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").touch()
    (out / ".sweep.json.0123456789ab.tmp").write_text("{")  # fileio.atomic_write's temporary name
    _same(pipelines.run_sweep(spec_file, out, progress=False), reference)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".draft.tmp").write_text("mine too")  # a hidden temporary file that is not a sweep's
    for path, listing in ((foreign, ["notes.txt"]), (hidden, [".draft.tmp"])):
        with pytest.raises(errors.OutputConflictError, match="non-empty directory without a sweep.json"):
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
