"""Builds shared by many workers: one group filled by several processes, each row range
claimed by one worker at a time, the group bit-identical to a one-process build; a worker
killed mid-pass leaves its rows to the others (or to the re-run); bad launch options are one
error before any work."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

import featstore
from featstore import errors

from .conftest import make_image_folder, tree_listing

OPTS = dict(model="test_resnet", weights="random", image_size=32, batch_size=4, workers=0, chunk_rows=8,
            layers="pre_logits,layer2", views=1, splits="train", progress=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dist") / "tree", per_class=14)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tree):
    """The one-process build, with the threads each of two workers gets (cores // 2), so the
    kernels are the same."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        groups = featstore.build(dataset=f"imagefolder:{tree}", store=tmp_path_factory.mktemp("ref") / "s.zarr", **OPTS)
    finally:
        torch.set_num_threads(before)
    return {g.spec.layer: g for g in groups}


def _same(store, reference):
    got = {g.spec.layer: g for g in featstore.open(store).groups()}
    assert got.keys() == reference.keys()
    for layer, g in got.items():
        ref = reference[layer]
        assert g.name == ref.name and g.is_complete
        for view in range(1 + g.n_views):
            np.testing.assert_array_equal(g.numpy(view), ref.numpy(view))
        np.testing.assert_array_equal(g.labels, ref.labels)
        assert g.verify() == []
    return got


def _marks(log) -> Counter:
    """(group, view, chunk) -> how many times a worker marked it."""
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(tuple(line.split()[1:4]) for line in lines if line.startswith("chunk-mark "))


def _all_chunks(reference) -> set:
    return {(g.name, str(v), str(c)) for g in reference.values() for v in range(1 + g.n_views)
            for c in range(-(-g.n_samples // g.spec.chunk_rows))}


def test_two_local_workers_give_the_one_process_groups_bit_for_bit(tmp_path, tree, reference, monkeypatch):
    log = tmp_path / "marks.log"
    monkeypatch.setenv("FEATSTORE_FAULT_LOG", str(log))
    store = tmp_path / "s.zarr"
    # one worker per --devices entry, each with a DataLoader process (a spawned worker's loaders
    # fork, as a one-process build's do)
    featstore.build(dataset=f"imagefolder:{tree}", store=store, devices="cpu,cpu", **{**OPTS, "workers": 1})
    got = _same(store, reference)
    marks = _marks(log)
    assert set(marks) == _all_chunks(reference) and set(marks.values()) == {1}  # every chunk, each once
    timings = next(iter(got.values())).timings
    assert timings["images_this_run"] > 0 and timings["workers"] >= 1 and timings["devices"] == ["cpu"]
    assert not (store / ".featstore" / "claims").exists() or not any((store / ".featstore" / "claims").iterdir())


def test_a_worker_killed_mid_pass_leaves_its_rows_to_the_other(tmp_path, tree, reference, monkeypatch):
    """The first worker to mark a chunk is SIGKILLed right after; the other takes its claim
    (the kernel dropped the lock) and the rest: the groups are the one-process groups and no
    chunk is marked twice."""
    log = tmp_path / "marks.log"
    monkeypatch.setenv("FEATSTORE_FAULT_LOG", str(log))
    monkeypatch.setenv("FEATSTORE_FAULT", "chunk-mark:1")
    monkeypatch.setenv("FEATSTORE_FAULT_ONCE", str(tmp_path / "fired"))
    store = tmp_path / "s.zarr"
    said = []
    featstore.build(dataset=f"imagefolder:{tree}", store=store, jobs=2, log=said.append, **OPTS)
    assert (tmp_path / "fired").exists()  # one worker really died
    assert any("died" in line and "the other workers built its rows" in line for line in said), said
    _same(store, reference)
    marks = _marks(log)
    assert set(marks) == _all_chunks(reference) and set(marks.values()) == {1}
    assert len({line.split()[-1] for line in log.read_text().splitlines()}) == 2  # two processes marked chunks


def test_workers_that_all_die_leave_a_build_the_rerun_finishes(tmp_path, tree, reference, monkeypatch):
    log = tmp_path / "marks.log"
    monkeypatch.setenv("FEATSTORE_FAULT_LOG", str(log))
    monkeypatch.setenv("FEATSTORE_FAULT", "chunk-mark:2")  # every worker dies at its second mark
    store = tmp_path / "s.zarr"
    with pytest.raises(errors.BuildWorkersError, match="re-run the same command"):
        featstore.build(dataset=f"imagefolder:{tree}", store=store, jobs=2, **OPTS)
    assert all(not g.is_complete for g in featstore.open(store).groups(include_incomplete=True))
    assert featstore.open(store).groups() == []  # nothing half-done is listed
    before = _marks(log)
    monkeypatch.delenv("FEATSTORE_FAULT")
    featstore.build(dataset=f"imagefolder:{tree}", store=store, jobs=2, **OPTS)
    _same(store, reference)
    marks = _marks(log)
    assert set(marks) == _all_chunks(reference) and set(marks.values()) == {1}  # the re-run kept what was marked
    assert set(before) < set(marks)


def test_a_dask_cluster_builds_the_same_groups(tmp_path, tree, reference):
    pytest.importorskip("distributed", reason="the [dask] extra")
    store = tmp_path / "s.zarr"
    featstore.build(dataset=f"imagefolder:{tree}", store=store, launcher="dask", jobs=2, **OPTS)
    _same(store, reference)


@pytest.mark.parametrize("extra, key, message", [
    ({"launcher": "dask", "devices": "cpu,cpu"}, "devices", "--devices places --launcher local's workers"),
    ({"scheduler": "tcp://127.0.0.1:8786"}, "scheduler", "--launcher local runs no scheduler"),
    ({"slurm_partition": "gpu"}, "slurm_partition", "an option of --launcher slurm"),
    ({"jobs": 2, "store": "s3://bucket/s.zarr"}, "store", "file locks"),
    ({"launcher": "nope"}, "launcher", "local"),
    ({"jobs": 0}, "jobs", "[1, 4096]"),
])
def test_bad_launch_options_are_one_error_before_any_work(tmp_path, tree, extra, key, message):
    opts = {**OPTS, "store": tmp_path / "s.zarr", **extra}
    with pytest.raises(errors.FeatstoreError) as e:
        featstore.build(dataset=f"imagefolder:{tree}", **opts)
    assert key in str(e.value) and message in str(e.value)
    assert tree_listing(tmp_path / "s.zarr") == []


def test_a_module_from_python_builds_in_one_process_only(tmp_path, tree):
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    prep = dict(input_size=(3, 16, 16), interpolation="bilinear", crop_pct=1.0, crop_mode="center", mean=(0.5,) * 3,
                std=(0.5,) * 3)
    with pytest.raises(errors.IncompatibleParametersError, match="builds in this process only"):
        featstore.build(model=net, name="tiny", preprocess=prep, dataset=f"imagefolder:{tree}", jobs=2,
                        store=tmp_path / "s.zarr", progress=False)
    assert tree_listing(tmp_path / "s.zarr") == []


# ----------------------------------------------------------------------------- build specs

SPEC = '''
store = "s.zarr"                  # relative to this file
model = "test_resnet"
weights = "random"
image_size = 32
workers = 0
chunk_rows = 8
progress = false

[[builds]]
dataset = "imagefolder:tree"
layers = ["pre_logits", "layer2"]
splits = ["train", "test"]

[[builds]]
dataset = ["imagefolder:tree", "digits"]    # a list: one build per dataset
splits = ["test"]
limit = 20

[[builds]]
dataset = "digits"
splits = ["train"]
limit = 30
'''


@pytest.fixture
def spec_dir(tmp_path, tree):
    import shutil

    shutil.copytree(tree, tmp_path / "tree")
    (tmp_path / "builds.toml").write_text(SPEC)
    return tmp_path


def _main(*args):
    import contextlib
    import io

    from featstore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_a_build_spec_runs_every_pass_from_any_directory_and_reruns_as_a_no_op(spec_dir, tmp_path_factory,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative paths are the spec file's
    code, out, _ = _main("build", "--spec", spec_dir / "builds.toml")
    assert code == 0, out
    assert out.startswith("5 pass(es): 5 built, 0 already complete, 0 failed"), out
    s = featstore.open(spec_dir / "s.zarr")
    assert len(s.groups()) == 2 * 2 + 1 + 1 + 1
    assert {g.spec.dataset for g in s.groups()} == {f"imagefolder:{(spec_dir / 'tree').resolve()}", "digits"}
    # the same as building the entry alone
    (one,) = featstore.build(model="test_resnet", weights="random", image_size=32, workers=0, chunk_rows=8,
                             dataset="digits", splits="train", limit=30, store=spec_dir / "alone.zarr",
                             progress=False)
    np.testing.assert_array_equal(s.group(dataset="digits", split="train").numpy(), one.numpy())
    code, out, _ = _main("build", "--spec", spec_dir / "builds.toml")
    assert code == 0 and out.startswith("5 pass(es): 0 built, 5 already complete, 0 failed"), out


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("limit = 30", 'limit = "thirty"'), "builds[2].limit"),
    (lambda t: t.replace("limit = 30", "limits = 30"), "builds[2].limits"),
    (lambda t: t.replace('dataset = "digits"\nsplits = ["train"]', 'dataset = "digits"\nsplits = ["val"]'),
     "builds[2]: Unknown split 'val'"),
    (lambda t: t.replace('dataset = "imagefolder:tree"\n', 'dataset = "imagefolder:nowhere"\n'), "builds[0]"),
    (lambda t: t.replace("[[builds]]", "[[build]]"), "build"),
])
def test_a_bad_entry_is_one_error_before_any_pass(spec_dir, edit, message):
    (spec_dir / "builds.toml").write_text(edit(SPEC))
    code, out, err = _main("build", "--spec", spec_dir / "builds.toml")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert tree_listing(spec_dir / "s.zarr") == []


def test_a_pass_that_fails_is_reported_and_the_others_run(spec_dir):
    (spec_dir / "builds.toml").write_text(SPEC.replace('layers = ["pre_logits", "layer2"]', 'layers = ["nope"]'))
    code, out, _ = _main("build", "--spec", spec_dir / "builds.toml")
    assert code == 1
    assert out.startswith("5 pass(es): 3 built, 0 already complete, 2 failed"), out
    assert "failed    builds[0] test_resnet" in out and "nope" in out
    assert len(featstore.open(spec_dir / "s.zarr").groups()) == 3


def test_a_killed_spec_run_resumes(spec_dir):
    from .conftest import run_cli

    killed = run_cli("build", "--spec", spec_dir / "builds.toml", env={"FEATSTORE_FAULT": "chunk-mark:9"})
    assert killed.returncode == -9, killed.stderr
    assert len(featstore.open(spec_dir / "s.zarr").groups()) < 7
    code, out, _ = _main("build", "--spec", spec_dir / "builds.toml")
    assert code == 0 and out.startswith("5 pass(es): ") and "0 failed" in out, out
    s = featstore.open(spec_dir / "s.zarr")
    assert len(s.groups()) == 7 and len(s.groups(include_incomplete=True)) == 7
    assert all(g.verify() == [] for g in s.groups())


def test_command_line_options_override_every_entry(spec_dir):
    from featstore._buildspec import load_build_spec

    passes = load_build_spec(spec_dir / "builds.toml", overrides={"limit": 10, "store": "elsewhere.zarr"})
    assert len(passes) == 5 and {p.options["limit"] for p in passes} == {10}
    assert {p.options["store"] for p in passes} == {"elsewhere.zarr"}  # as typed: the working directory's
    assert [(p.entry, p.split) for p in passes] == [(0, "train"), (0, "test"), (1, "test"), (1, "test"), (2, "train")]


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_slurm_jobs_build_the_groups_and_a_cancelled_job_loses_nothing(slurm, tmp_path, tree, monkeypatch):
    """Two SLURM jobs (one dask worker each) share the build; the first worker to mark a chunk
    stops there (FEATSTORE_FAULT_MODE=hang) and its job is scancelled: the kernel drops its
    claim, the other worker (or a replacement job) finishes its range, and the groups equal a
    one-process build with the workers' single thread; no chunk is marked twice."""
    import subprocess
    import threading
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what each one-core job's worker uses
    try:
        ref = {g.spec.layer: g for g in featstore.build(dataset=f"imagefolder:{tree}", store=tmp_path / "ref.zarr",
                                                        **OPTS)}
    finally:
        torch.set_num_threads(before)
    marker, log = tmp_path / "hung", tmp_path / "marks.log"
    monkeypatch.setenv("FEATSTORE_FAULT", "chunk-mark:1")
    monkeypatch.setenv("FEATSTORE_FAULT_MODE", "hang")
    monkeypatch.setenv("FEATSTORE_FAULT_ONCE", str(marker))
    monkeypatch.setenv("FEATSTORE_FAULT_LOG", str(log))
    seen: dict = {}

    def cancel_when_hung():  # the build runs in the main thread (dask installs signal handlers)
        deadline = time.monotonic() + 240
        while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not marker.exists():
            seen["error"] = "no worker marked a chunk within 240 s"
            subprocess.run(["scancel", "--user", "root"])
            return
        seen["job"] = marker.read_text().split()[1]
        subprocess.run(["scancel", seen["job"]], check=True)

    t = threading.Thread(target=cancel_when_hung, daemon=True)
    t.start()
    store = tmp_path / "s.zarr"
    featstore.build(dataset=f"imagefolder:{tree}", store=store, launcher="slurm", jobs=2, slurm_cores=1,
                    slurm_memory="3GB", slurm_time="00:15:00", slurm_host="127.0.0.1", **OPTS)
    t.join(timeout=10)
    assert "error" not in seen, seen["error"]
    assert seen["job"]  # the hung worker ran in a SLURM job, which was cancelled
    _same(store, ref)
    marks = _marks(log)
    assert set(marks) == _all_chunks(ref) and set(marks.values()) == {1}
    logs = store / ".featstore" / "slurm-logs"
    assert len({p.stem.rsplit("-", 1)[-1] for p in logs.glob("*.err")}) >= 2  # the work ran in SLURM jobs


def test_a_device_that_is_not_here_is_one_error_before_any_work(tmp_path, tree):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: cuda:0 is a device this machine has")
    with pytest.raises(errors.IncompatibleParametersError, match="--devices: device='cuda:0'.*CUDA is not available"):
        featstore.build(dataset=f"imagefolder:{tree}", store=tmp_path / "s.zarr", devices="cuda:0,cuda:0", **OPTS)
    assert tree_listing(tmp_path / "s.zarr") == []
