"""Builds straight to object storage (``--store s3://...``), against moto's S3 server on
loopback: the same group as a local build, invisible until complete, resumable after a
kill, and one build at a time per group through a lease lock made of conditional writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import featstore
from featstore import errors

pytestmark = pytest.mark.s3

BUILD = dict(model="test_resnet", weights="random", image_size=32, batch_size=4, workers=0, chunk_rows=8,
             splits="train", progress=False)


@pytest.fixture(scope="module")
def local_group(tmp_path_factory, image_folder):
    (g,) = featstore.build(dataset=f"imagefolder:{image_folder}", store=tmp_path_factory.mktemp("lb") / "s.zarr",
                           **BUILD)
    return g


def _args(image_folder, store):
    return ["build", "--model", "test_resnet", "--weights", "random", "--image-size", "32", "--batch-size", "4",
            "--workers", "0", "--chunk-rows", "8", "--splits", "train", "--no-progress", "--dataset",
            f"imagefolder:{image_folder}", "--store", str(store)]


def _same(url, local_group):
    (g,) = featstore.open(url).groups()
    assert g.name == local_group.name and g.is_complete
    np.testing.assert_array_equal(g.numpy(), local_group.numpy())
    np.testing.assert_array_equal(g.labels, local_group.labels)
    assert g.verify() == []


def test_a_build_straight_to_s3_equals_the_local_build(s3, image_folder, local_group):
    bucket, _ = s3
    url = f"{bucket}/s.zarr"
    featstore.build(dataset=f"imagefolder:{image_folder}", store=url, **BUILD)
    _same(url, local_group)
    import fsspec

    fs = fsspec.filesystem("s3")
    assert not fs.exists(f"{url}/.featstore/locks/{local_group.name}.lock")  # released


def test_a_killed_s3_build_is_never_listed_the_next_waits_out_its_lease_and_resumes(s3, image_folder, local_group,
                                                                                    monkeypatch, tmp_path):
    """One build hangs mid-pass holding the lock; a build that will not wait is refused naming
    the holder; the hung one is SIGKILLed (its lock stays, its lease runs out: nothing renews
    it); its partial group is never listed as complete; the re-run waits out the lease, takes
    the lock over and finishes the same group."""
    bucket, _ = s3
    url = f"{bucket}/s.zarr"
    monkeypatch.setenv("FEATSTORE_LEASE_SECONDS", "3")
    marker = tmp_path / "hung"
    env = {**os.environ, "FEATSTORE_FAULT": "chunk-mark:2", "FEATSTORE_FAULT_MODE": "hang",
           "FEATSTORE_FAULT_ONCE": str(marker), "PYTHONPATH": str(Path(featstore.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "featstore.cli", *_args(image_folder, url)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no chunk marked in 120 s"
        s = featstore.open(url)
        assert s.groups() == [] and [g.state for g in s.groups(include_incomplete=True)] == ["building"]
        with pytest.raises(errors.GroupLockedError, match=f"pid {proc.pid}"):
            featstore.build(dataset=f"imagefolder:{image_folder}", store=url, wait=False, **BUILD)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    said = []
    t0 = time.monotonic()
    featstore.build(dataset=f"imagefolder:{image_folder}", store=url, log=said.append, **BUILD)
    assert any("being built by" in line for line in said), said  # it waited for the dead build's lease
    assert time.monotonic() - t0 >= 1.0
    _same(url, local_group)


def test_of_many_builds_taking_over_an_expired_lock_exactly_one_wins(s3, monkeypatch):
    """The lease protocol itself: a lock held, refused to another; once its holder stops
    renewing, the lease runs out and of eight takers at once exactly one gets it; the old
    holder's renewal then fails (it would stop writing)."""
    import fsspec

    from featstore._lease import LeaseLock
    from featstore.fileio import LockBusy

    bucket, _ = s3
    fs = fsspec.filesystem("s3")
    path = f"{bucket[len('s3://'):]}/locks/g.lock"
    first = LeaseLock(fs, path, lease=1.5)
    first.acquire(wait=False)
    with pytest.raises(LockBusy, match="pid"):
        LeaseLock(fs, path, lease=1.5).acquire(wait=False)
    first._stop.set()  # as if killed: nothing renews it any more
    first._thread.join()
    time.sleep(2.0)
    won, lost = [], []
    barrier = threading.Barrier(8)

    def take(i):
        lk = LeaseLock(fs, path, lease=30)
        barrier.wait()
        try:
            lk.acquire(wait=False)
            won.append(lk)
        except LockBusy:
            lost.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert first._put(IfMatch=first.etag) is None  # the old holder can no longer renew
    first.lost = True
    with pytest.raises(errors.LockLostError, match="taken by another build"):
        first.check()
    won[0].release()
    assert not fs.exists(path)


@pytest.mark.parametrize("url, message", [("memory://x/s.zarr", "s3:// URL"), ("gcs://b/s.zarr", "s3:// URL")])
def test_a_store_url_a_build_cannot_lock_is_one_error_before_any_work(image_folder, url, message):
    with pytest.raises(errors.IncompatibleParametersError, match=message):
        featstore.build(dataset=f"imagefolder:{image_folder}", store=url, **BUILD)
