"""A sweep's output directory: what it records, how a task commits, how results are read.

Layout::

    OUT/sweep.json              {"key": spec hash, "spec": the spec with defaults filled in}
    OUT/results/<task>.parquet  one task's rows
    OUT/done/<task>.json        {"task", "rows", "label", "seconds"}: the task is done
    OUT/labels/group-<i>.npy    pairing i's test labels (in train's class indices), which the
                                rows' per-sample test_correct refer to (per-class bootstraps)
    OUT/.lock                   held by the sweep writing to OUT

A task commits its rows with an atomic write, then its done record with another: a task
is done exactly when its record exists, so a sweep killed at any moment and re-run gives
the rows of one uninterrupted run (no duplicates, none missing).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from featstore import faults
from featstore.errors import CorruptResultsError, OutputConflictError, ResultsNotFoundError
from featstore.fileio import atomic_write, is_temporary

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["load_results", "check_out", "prepare_out", "pending_tasks", "commit_rows", "done_count", "LOCK_NAME",
           "record_test_labels"]

META_NAME = "sweep.json"
LOCK_NAME = ".lock"
_RESUME = "nothing of this task was recorded, and re-running the sweep resumes from the tasks already done"


def _done_record(out, task_id: str) -> Path:
    return Path(out) / "done" / f"{task_id}.json"


def done_count(out, task) -> int | None:
    """The recorded row count of a done task, None when it is not done."""
    record = _done_record(out, task.id)
    return json.loads(record.read_text())["rows"] if record.exists() else None


def commit_rows(out, task, rows: "pd.DataFrame") -> int:
    """Write a task's rows, then its done record (each atomically); return the row count."""
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "done").mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    rows.to_parquet(buf, index=False)
    atomic_write(out / "results" / f"{task.id}.parquet", buf.getvalue(), consequence=_RESUME)
    faults.point("task-rows")
    atomic_write(_done_record(out, task.id),
                 json.dumps({"task": task.id, "rows": len(rows), "label": task.label(),
                             "seconds": float(rows["seconds_task"].iloc[0])}).encode(), consequence=_RESUME)
    faults.point("task-done")
    return len(rows)


def _labels_file(out, group_index: int) -> Path:
    return Path(out) / "labels" / f"group-{int(group_index)}.npy"


def record_test_labels(out, group_index: int, labels) -> None:
    """Write a pairing's test labels once (every task of the pairing has the same; atomic)."""
    import numpy as np

    path = _labels_file(out, group_index)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.asarray(labels, dtype=np.int64), allow_pickle=False)
    atomic_write(path, buf.getvalue(), consequence=_RESUME)


def _test_labels(out: Path) -> dict[int, "object"]:
    import numpy as np

    found = {}
    for path in sorted((out / "labels").glob("group-*.npy")):
        found[int(path.stem.split("-", 1)[1])] = np.load(path, allow_pickle=False)
    return found


def _is_ours(entry: Path) -> bool:
    """The lock file, or a sweep.json write that may be in flight."""
    return entry.name == LOCK_NAME or is_temporary(entry.name, of=META_NAME)


def check_out(spec, out: Path) -> None:
    """Refuse an output directory holding another sweep or foreign files; writes nothing."""
    if out.exists() and not out.is_dir():
        raise OutputConflictError(path=str(out), reason="is a file")
    # List first, look for sweep.json after: a sweep records it before anything else, so an
    # entry listed while another sweep starts in this directory implies it.
    listed = [p for p in out.iterdir() if not _is_ours(p)] if out.is_dir() else []
    meta = out / META_NAME
    if meta.exists():
        old = json.loads(meta.read_text())
        if old.get("key") != spec.key():
            raise OutputConflictError(
                path=str(out), reason=f"holds results of a different sweep spec (key {old.get('key', '?')[:12]} vs "
                                      f"{spec.key()[:12]}): another protocol, selection, metric or default; run the "
                                      f"spec that made it to resume")
        return
    if listed:
        raise OutputConflictError(path=str(out), reason="is a non-empty directory without a sweep.json")


def prepare_out(spec, out: Path) -> None:
    """Under the output lock: check again (another sweep may have just started it), then record the spec."""
    check_out(spec, out)
    meta = out / META_NAME
    if not meta.exists():
        atomic_write(meta, json.dumps({"key": spec.key(), "spec": spec.to_dict()}, indent=2).encode(),
                     consequence="the sweep did not start")


def pending_tasks(tasks, out: str | os.PathLike) -> list:
    """The tasks without a done record."""
    return [t for t in tasks if not _done_record(out, t.id).exists()]


def load_results(out: str | os.PathLike) -> "pd.DataFrame":
    """The sweep's results as a pandas DataFrame, one row per draw (completed tasks only)."""
    import pandas as pd

    out = Path(out)
    if not (out / META_NAME).exists():
        raise ResultsNotFoundError(path=str(out))
    frames = []
    for rec in sorted((out / "done").glob("*.json")):
        info = json.loads(rec.read_text())
        df = pd.read_parquet(out / "results" / f"{info['task']}.parquet")
        if len(df) != info["rows"]:
            raise CorruptResultsError(path=str(out), task=info["task"],
                                      problem=f"{len(df)} rows, but its done record says {info['rows']}")
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["group", "mode", "seed", "fraction", "draw"], na_position="first",
                        kind="stable").reset_index(drop=True)
    df.attrs["test_labels"] = _test_labels(out)  # per pairing: what test_correct refers to
    return df
