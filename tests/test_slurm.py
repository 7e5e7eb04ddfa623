"""`featstore sweep --launcher slurm`: dask workers in SLURM jobs (dask-jobqueue), against a real
single-node SLURM started by the ``slurm`` fixture; and the options' vocabulary (no SLURM needed)."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

import pipelines
from featstore import errors
from pipelines import SlurmOptions, load_results, load_spec, run_sweep

from .conftest import run_cli
from .test_sweep import SPEC, _same, reference, spec_file, sweep_store  # noqa: F401 (fixtures)

# small jobs: the test node has 2 cores (a worker that imports torch needs more than 1 GB)
SMALL = dict(slurm_cores=1, slurm_memory="3GB", slurm_time="00:15:00", slurm_host="127.0.0.1")


def _jobs_in(out):
    """SLURM job ids whose worker logs dask-jobqueue wrote under OUT/slurm-logs."""
    return sorted({p.stem.rsplit("-", 1)[-1] for p in (out / "slurm-logs").glob("*.err")})


@pytest.mark.slurm
@pytest.mark.timeout(600)  # a sweep whose workers never come must fail, not hang the suite
def test_slurm_sweep_gives_the_local_launchers_rows(slurm, tmp_path, spec_file, reference):
    out = tmp_path / "out"
    df = run_sweep(spec_file, out, launcher="slurm", slurm_jobs=2, progress=False, **SMALL)
    _same(df, reference)
    assert len(_jobs_in(out)) >= 1  # the tasks ran in SLURM jobs (a second may start after a tiny sweep is done)
    script = next((out / "slurm-logs").glob("*.err")).read_text()
    assert "Pausing worker" not in script  # the memory policy: workers do not pause (they would hang)
    deadline = time.monotonic() + 60  # the sweep cancels its jobs as it ends (they pass through "completing")
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""  # none left


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_a_job_cancelled_mid_task_loses_no_row(slurm, tmp_path, spec_file, reference, monkeypatch):
    """The worker's first task stops mid-way (FEATSTORE_FAULT_MODE=hang at task-started) and its
    job is scancelled there; the cluster submits a replacement job, the task runs again, and
    the rows equal an uninterrupted local run's: none lost, none twice."""
    out = tmp_path / "out"
    marker = tmp_path / "hung"
    monkeypatch.setenv("FEATSTORE_FAULT", "task-started:1")
    monkeypatch.setenv("FEATSTORE_FAULT_MODE", "hang")
    monkeypatch.setenv("FEATSTORE_FAULT_ONCE", str(marker))
    seen: dict = {}

    def cancel_when_hung():  # the sweep runs in the main thread (dask installs signal handlers)
        deadline = time.monotonic() + 180
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not marker.exists():
            seen["error"] = "no worker reached a task within 180 s"
            subprocess.run(["scancel", "--user", "root"])
            return
        running = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True,
                                 text=True).stdout.split()
        seen["running"] = running
        seen["done_before"] = len(list((out / "done").glob("*"))) if (out / "done").exists() else 0
        subprocess.run(["scancel", *running], check=True)

    t = threading.Thread(target=cancel_when_hung, daemon=True)
    t.start()
    df = run_sweep(spec_file, out, launcher="slurm", slurm_jobs=1, progress=False, **SMALL)
    t.join(timeout=10)
    assert "error" not in seen, seen["error"]
    running = seen["running"]
    assert len(running) == 1
    done_before = seen["done_before"]
    assert done_before == 0  # the cancelled task was the job's first: nothing was recorded before it
    jobs = _jobs_in(out)
    assert running[0] in jobs and len(jobs) >= 2  # a replacement job ran the tasks
    _same(df, reference)
    _same(load_results(out), reference)


def test_slurm_options_are_declared_once_spec_table_and_flags(tmp_path, spec_file):
    """[slurm] in the spec (not part of its key), --slurm-* flags over it, every value checked."""
    from pipelines._sweep import check_run, slurm_options

    base = load_spec(spec_file)
    text = spec_file.read_text() + '\n[slurm]\npartition = "gpu"\njobs = 4\ngpus = 2\ntime = "1-00:00:00"\n'
    spec = load_spec(tomllib_loads(text))
    assert spec.key() == base.key()  # where rows are computed is not what they are
    opts = check_run(dict(launcher="slurm", slurm_jobs=8, slurm_memory="64GB"))
    o = slurm_options(spec, opts)
    assert (o.partition, o.jobs, o.gpus, o.time, o.memory, o.cores) == ("gpu", 8, 2, "1-00:00:00", "64GB",
                                                                        SlurmOptions().cores)
    assert set(SlurmOptions.model_fields) == {k[len("slurm_"):] for k in pipelines.SweepRun.model_fields
                                              if k.startswith("slurm_")}
    for key, value, expected in (("time", "1 hour", "SLURM time limit"), ("memory", "16", "a size with its unit"),
                                 ("jobs", 0, "greater than or equal to 1"), ("gpus", "2", "integer")):
        with pytest.raises(errors.InvalidParameterError, match=rf"slurm\.{key}.*"):
            load_spec(tomllib_loads(spec_file.read_text() + f"\n[slurm]\n{key} = {value!r}\n".replace("'", '"')))
    with pytest.raises(errors.IncompatibleParametersError, match="slurm_jobs.*not of --launcher local"):
        check_run(dict(launcher="local", slurm_jobs=2))
    with pytest.raises(errors.IncompatibleParametersError, match="workers.*--slurm-jobs"):
        check_run(dict(launcher="slurm", workers=2))


def test_slurm_job_script_carries_every_option(tmp_path):
    """The sbatch script dask-jobqueue writes from SlurmOptions: partition, account, time, memory,
    cores, one worker per GPU with --gres, the worker memory policy (no spill, no pause)."""
    from dask_jobqueue import SLURMCluster

    from featstore._slurm import cluster_options

    o = SlurmOptions(partition="gpu", account="lab", time="1-02:00:00", memory="64GB", cores=16, gpus=4,
                     host="127.0.0.1")
    with SLURMCluster(**cluster_options(o, tmp_path)) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH -t 1-02:00:00", "#SBATCH --gres=gpu:4",
                 "#SBATCH --cpus-per-task=16", "--nworkers 4", "--nthreads 1",
                 "export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False"):
        assert line in script, (line, script)
    assert re.search(r"#SBATCH --mem=6\d+G", script), script  # 64GB, as dask-jobqueue rounds it


def test_slurm_flags_on_the_command_line(tmp_path, spec_file):
    r = run_cli("sweep", str(spec_file), "--out", str(tmp_path / "o"), "--launcher", "local", "--slurm-jobs", "2")
    assert r.returncode == 2 and "--slurm-jobs" in r.stderr and "--launcher slurm" in r.stderr
    r = run_cli("sweep", str(spec_file), "--out", str(tmp_path / "o"), "--launcher", "slurm", "--slurm-time", "soon")
    assert r.returncode == 2 and "--slurm-time" in r.stderr and "'soon'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def tomllib_loads(text):
    import tomllib

    return tomllib.loads(text)
