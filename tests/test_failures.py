"""Every failure is one line naming the path and the fix: full disks, unwritable outputs, a
reader that leaves, and files that are never left half-written."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

import featstore
import pipelines
import probes
from featstore import errors

from .conftest import REPO


def test_a_full_disk_under_the_report_keeps_the_previous_report_whole(tmp_path, reference, monkeypatch):
    import featstore.fileio as fileio
    from pipelines import _report

    monkeypatch.setattr(_report, "FIGURES", {"accuracy_vs_fraction": _report.FIGURES["accuracy_vs_fraction"]})
    out = tmp_path / "report"
    page = pipelines.write_report(reference.attrs["out"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = fileio.atomic_write

    def full(path, data, **kw):
        if str(path).endswith("report.html"):  # as atomic_write reports a failed write
            raise errors.WriteFailedError(path=str(path), reason="No space left on device",
                                          consequence=kw.get("consequence", ""))
        return real(path, data, **kw)

    monkeypatch.setattr(fileio, "atomic_write", full)
    with pytest.raises(errors.WriteFailedError, match="report.html failed: No space left on device"):
        pipelines.write_report(reference.attrs["out"], out)
    assert page.read_bytes() == before["report.html"]  # never truncated


def test_the_probes_scratch_file_on_a_full_disk_names_where_and_the_fix(monkeypatch):
    import tempfile

    import numpy as np

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: Full())
    with pytest.raises(errors.WriteFailedError, match=r"the probes' scratch file in .*No space left on device .*"
                                                      r"point TMPDIR at a disk with room"):
        probes.RowFile([np.zeros((10, 4), dtype=np.float32)])


def test_an_unwritable_sweep_output_is_refused_before_any_work(tmp_path, spec_file, monkeypatch):
    monkeypatch.setattr(probes, "load_training_data", lambda *a, **k: pytest.fail("a task started"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(errors.OutputConflictError, match=r"cannot be written \(.*a_file' is not a folder\)"):
        pipelines.run_sweep(spec_file, tmp_path / "a_file" / "out", progress=False)


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path, tiny):
    """`featstore info GROUP | head -1`: the pipe closes under the output; the command exits
    quietly (141, as a process killed by SIGPIPE), never with a BrokenPipeError traceback."""
    (g,) = featstore.build(**tiny, splits="test", store=tmp_path / "s.zarr")
    shell = f"{sys.executable} -m featstore.cli info {g.name} --store {tmp_path / 's.zarr'} | head -c 10"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("{")


def test_an_unexpected_os_error_is_one_line_naming_the_path(tmp_path, tiny, monkeypatch, capsys):
    """A write the code did not wrap (here: the store's lock file on a full disk): one line with
    the path, the reason and what to do; exit 1; no traceback."""
    import featstore.fileio as fileio
    from featstore.cli import main

    real_open = open

    def full_open(path, mode="r", *a, **k):
        if str(path).endswith(".lock") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(fileio, "open", full_open, raising=False)
    code = main(["build", "--model", "test_resnet", "--weights", "random", "--dataset", tiny["dataset"],
                 "--image-size", "32", "--workers", "0", "--splits", "test", "--no-progress",
                 "--store", str(tmp_path / "s.zarr")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert ".lock' No space left on device (OSError); free space or fix the permissions" in err
