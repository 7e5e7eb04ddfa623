"""A sweep's results belong to one spec and one set of features: orphaned workers, another
store, foreign or damaged results, duplicate pairings, and the cost of task ids."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

import featstore
import pipelines
from featstore import errors
from pipelines import load_results, load_spec, run_sweep

from .conftest import REPO
from .test_sweep import SPEC


def _spec(path, store, dataset, epochs=3, seeds=(0, 1)):
    path.write_text(SPEC.format(store=store, dataset=dataset).replace("epochs = 3", f"epochs = {epochs}")
                    .replace("seeds = [0, 1]", f"seeds = {list(seeds)}"))
    return path


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def test_sigterm_stops_a_joblib_sweeps_workers_and_a_new_spec_gets_only_its_rows(tmp_path, sweep_store):
    """`kill` (SIGTERM) on a joblib sweep: it exits 143 saying how to resume, its loky workers
    die with it and commit nothing more; a sweep of another spec into the same (emptied) path
    then holds only its own rows."""
    import psutil

    store, dataset = sweep_store
    long = _spec(tmp_path / "a.toml", store, dataset, epochs=400, seeds=range(8))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "featstore.cli", "sweep", str(long), "--out", str(out),
                             "--launcher", "joblib", "--workers", "2", "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "done").is_dir() or not list((out / "done").iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    workers = _descendants(proc.pid)
    assert workers  # loky's worker processes are running tasks
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by SIGTERM; re-run the same command to resume" in err
    gone = psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=15)[1]
    assert not gone, [p.cmdline() for p in gone]  # no worker outlives the sweep
    shutil.rmtree(out)
    other = _spec(tmp_path / "b.toml", store, dataset, epochs=1)
    df = run_sweep(other, out, progress=False)
    time.sleep(1)  # an orphan would have committed by now
    df = load_results(out)
    assert set(df["protocol"].map(lambda p: json.loads(p)["epochs"])) == {1}
    assert len(df) == len(run_sweep(other, tmp_path / "again", progress=False))


def test_a_worker_of_a_sweep_that_ended_never_commits(tmp_path, spec_file, reference):
    """Commits are tied to the sweep run that owns the output (its generation): a worker whose
    sweep has died, or whose output another sweep took over, records nothing."""
    from pipelines._results import claim_generation, commit_rows

    out = tmp_path / "out"
    out.mkdir()
    task = pipelines.expand_tasks(load_spec(spec_file))[0]
    rows = reference[reference["task"] == reference["task"].iloc[0]]
    mine = claim_generation(out)
    claim_generation(out)  # another sweep takes over the output
    with pytest.raises(errors.SweepEndedError, match="another sweep owns the output now"):
        commit_rows(out, task, rows, mine)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    current = json.loads((out / ".generation").read_text())
    with pytest.raises(errors.SweepEndedError, match=rf"the sweep \(pid {dead.pid}\) has ended"):
        commit_rows(out, task, rows, {**current, "pid": dead.pid})
    assert not (out / "done").exists() or not list((out / "done").iterdir())


def test_resuming_against_another_store_is_refused_naming_the_group(tmp_path, sweep_store, tiny):
    """The same query in another store (random features vs others): the output records the
    groups' keys, so the resume is refused before any work, naming the pairing."""
    store, dataset = sweep_store
    spec = _spec(tmp_path / "s.toml", store, dataset)
    out = tmp_path / "out"
    run_sweep(spec, out, progress=False)
    other = tmp_path / "other.zarr"
    featstore.build("test_resnet", weights="random", seed=5, dataset=dataset, image_size=32, batch_size=8, workers=0,
                    progress=False, splits="train,test", store=other, dtype="float32")
    with pytest.raises(errors.OutputConflictError, match=r"holds results of other features: pairing 0's train group "
                                                         r"is .* but the results were computed from .*another store"):
        run_sweep(load_spec(spec, store=str(other)), out, progress=False)


def test_foreign_and_damaged_results_are_named_then_set_aside_by_the_sweep(tmp_path, spec_file, reference,
                                                                           sweep_store):
    """Another sweep's task copied in, a truncated or garbage parquet, a deleted parquet and a
    truncated done record: load_results names the first (one error, no traceback); re-running
    the sweep sets them aside and redoes their tasks, to the rows of one clean run."""
    out = tmp_path / "out"
    shutil.copytree(reference.attrs["out"], out)
    foreign_out = tmp_path / "foreign"
    run_sweep(_spec(tmp_path / "f.toml", *sweep_store, epochs=2), foreign_out, progress=False)
    stranger = sorted((foreign_out / "done").glob("*.json"))[0]
    shutil.copy(stranger, out / "done" / stranger.name)
    shutil.copy(foreign_out / "results" / f"{stranger.stem}.parquet", out / "results")
    with pytest.raises(errors.CorruptResultsError, match="no task of this output's spec and features"):
        load_results(out)
    shutil.rmtree(out)
    shutil.copytree(reference.attrs["out"], out)
    done = sorted((out / "done").glob("*.json"))
    results = out / "results"
    (results / f"{done[0].stem}.parquet").write_bytes((results / f"{done[0].stem}.parquet").read_bytes()[:100])
    (results / f"{done[1].stem}.parquet").write_bytes(b"garbage")
    (results / f"{done[2].stem}.parquet").unlink()
    done[3].write_text(done[3].read_text()[:10])
    with pytest.raises(errors.CorruptResultsError, match=r"results of .*: task \w+: .* \(and 3 more\)\. Re-run the "
                                                         r"sweep"):
        load_results(out)
    again = run_sweep(spec_file, out, progress=False)
    assert len(list((out / "set-aside").iterdir())) == 4
    from .test_sweep import _same

    _same(again, reference)


def test_a_damaged_sweep_record_is_one_error_naming_it(tmp_path, spec_file, reference):
    out = tmp_path / "out"
    shutil.copytree(reference.attrs["out"], out)
    (out / "sweep.json").write_text('{"key": "abc", "spe')
    for call in (lambda: load_results(out), lambda: run_sweep(spec_file, out, progress=False)):
        with pytest.raises(errors.CorruptResultsError, match=r"task sweep\.json: it cannot be read .*use a new --out"):
            call()


def test_a_repeated_pairing_is_refused(spec_file):
    text = spec_file.read_text()
    table = text[text.index("[[groups]]"):text.index("[selection]")]
    spec_file.write_text(text.replace("[selection]", table + "[selection]"))
    with pytest.raises(errors.IncompatibleParametersError, match=r"groups\[1\] repeats the pairing .* of groups\[0\]"):
        load_spec(spec_file)


def test_task_ids_cost_the_same_however_many_seeds(spec_file):
    """20,000 seeds: 40,000 tasks and their ids in seconds (each id hashes the shared selection
    once per sweep, not once per task)."""
    text = spec_file.read_text().replace("seeds = [0, 1]", f"seeds = {list(range(20_000))}")
    spec_file.write_text(text)
    t0 = time.perf_counter()
    tasks = pipelines.expand_tasks(load_spec(spec_file))
    ids = {t.id for t in tasks}
    assert len(ids) == len(tasks) == 2 * 20_000 + 1  # random and the reference per seed, pca once
    assert time.perf_counter() - t0 < 30
