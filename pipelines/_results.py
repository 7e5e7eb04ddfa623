"""A sweep's output directory: what it records, how a task commits, how results are read.

Layout::

    OUT/sweep.json              {"key": spec hash, "spec": the spec with defaults filled in,
                                 "features": per pairing, the groups it read and their keys}
    OUT/results/<task>.parquet  one task's rows
    OUT/done/<task>.json        {"task", "rows", "label", "seconds"}: the task is done
    OUT/labels/group-<i>.npy    pairing i's test labels (in train's class indices), which the
                                rows' per-sample test_correct refer to (per-class bootstraps)
    OUT/set-aside/              results a sweep found damaged or foreign, moved out of the way
    OUT/.lock                   held by the sweep writing to OUT
    OUT/.generation             the running sweep's token, host and pid

A task commits its rows with an atomic write, then its done record with another: a task
is done exactly when its record exists, so a sweep killed at any moment and re-run gives
the rows of one uninterrupted run (no duplicates, none missing). A worker commits only while
the sweep that launched it still owns OUT (its generation token is the current one, and on
the sweep's host the sweep is alive): an orphaned worker never writes into another sweep.

Results belong to one spec and one set of features: task ids include the groups' keys, and
:func:`load_results` refuses rows of tasks the recorded spec and features do not have, or of
other groups (``repair=True``, and every sweep that resumes, set them aside instead).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from featstore import faults
from featstore.errors import CorruptResultsError, OutputConflictError, ResultsNotFoundError, SweepEndedError
from featstore.fileio import atomic_write, is_temporary

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["load_results", "check_out", "prepare_out", "pending_tasks", "commit_rows", "done_count", "LOCK_NAME",
           "record_test_labels", "claim_generation", "tidy_out", "recorded_features"]

META_NAME = "sweep.json"
LOCK_NAME = ".lock"
GENERATION_NAME = ".generation"
SET_ASIDE = "set-aside"
_RESUME = "nothing of this task was recorded, and re-running the sweep resumes from the tasks already done"


def _done_record(out, task_id: str) -> Path:
    return Path(out) / "done" / f"{task_id}.json"


def _read_record(path: Path) -> dict | None:
    """A done record, or None when it is damaged (truncated, not JSON, not a record)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("rows"), int) and info.get("task") == path.stem \
        else None


def done_count(out, task) -> int | None:
    """The recorded row count of a done task, None when it is not done (or its record is damaged)."""
    record = _done_record(out, task.id)
    info = _read_record(record) if record.exists() else None
    return info["rows"] if info is not None else None


# ----------------------------------------------------------------------------- generations


def claim_generation(out: Path) -> dict:
    """Under the output lock: record this sweep run as the one owning OUT (a fresh token, this
    host and pid); its workers commit only while it still does."""
    generation = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    atomic_write(out / GENERATION_NAME, json.dumps(generation).encode(), consequence="the sweep did not start")
    return generation


def _check_generation(out: Path, generation: dict | None, task) -> None:
    """Refuse to commit when the sweep that launched this task no longer owns OUT."""
    if generation is None:
        return
    try:
        current = json.loads((out / GENERATION_NAME).read_text())
    except (OSError, ValueError):
        current = None
    why = None
    if current is None or current.get("token") != generation["token"]:
        why = "another sweep owns the output now (or it was removed)"
    elif generation["host"] == socket.gethostname() and generation["pid"] != os.getpid():
        try:
            os.kill(generation["pid"], 0)
        except ProcessLookupError:
            why = f"the sweep (pid {generation['pid']}) has ended"
        except PermissionError:
            pass  # alive, another user's
    if why:
        raise SweepEndedError(task=task.label(), out=str(out), reason=why)


def commit_rows(out, task, rows: "pd.DataFrame", generation: dict | None = None) -> int:
    """Write a task's rows, then its done record (each atomically); return the row count. With
    ``generation`` (a sweep's workers), only while that sweep still owns the output."""
    out = Path(out)
    _check_generation(out, generation, task)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "done").mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    rows.to_parquet(buf, index=False)
    atomic_write(out / "results" / f"{task.id}.parquet", buf.getvalue(), consequence=_RESUME)
    faults.point("task-rows")
    _check_generation(out, generation, task)  # a done record is what makes rows count: checked once more
    atomic_write(_done_record(out, task.id),
                 json.dumps({"task": task.id, "rows": len(rows), "label": task.label(),
                             "seconds": float(rows["seconds_task"].iloc[0])}).encode(), consequence=_RESUME)
    faults.point("task-done")
    return len(rows)


# ----------------------------------------------------------------------------- test labels


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


class TestLabels(dict):
    """Pairing -> its test labels, kept in a results frame's ``attrs``. Compared by content, so
    pandas (which compares ``attrs`` when it concatenates frames) never meets an ambiguous
    array comparison."""

    __test__ = False  # not a pytest test class, whatever its name

    def __eq__(self, other) -> bool:
        import numpy as np

        return isinstance(other, dict) and self.keys() == other.keys() and \
            all(np.array_equal(self[k], other[k]) for k in self)

    __hash__ = None


def _test_labels(out: Path) -> dict[int, "object"]:
    import numpy as np

    found = TestLabels()
    for path in sorted((out / "labels").glob("group-*.npy")):
        try:
            found[int(path.stem.split("-", 1)[1])] = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            continue  # damaged: its pairing's intervals fall back to the seeds
    return found


# ----------------------------------------------------------------------------- the output directory


def _is_ours(entry: Path) -> bool:
    """The lock and generation files, or a sweep.json write that may be in flight."""
    return entry.name in (LOCK_NAME, GENERATION_NAME) or is_temporary(entry.name, of=META_NAME)


def _read_meta(out: Path) -> dict:
    try:
        meta = json.loads((out / META_NAME).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        return meta
    except (OSError, ValueError) as e:
        raise CorruptResultsError(path=str(out), task=META_NAME,
                                  problem=f"it cannot be read ({e}); it records which spec the results belong to, so "
                                          f"nothing here can be trusted: use a new --out") from None


def recorded_features(out) -> list | None:
    """The features (per pairing: group names and keys) a sweep's output was computed from, or
    None for outputs of sweeps before they were recorded."""
    return _read_meta(Path(out)).get("features")


def _features_differ(old: list, new: list) -> str | None:
    for i, (a, b) in enumerate(zip(old, new)):
        for split, index in (("train", 0), ("test", 1), ("val", 2)):
            if a["keys"][index] != b["keys"][index]:
                return (f"pairing {i}'s {split} group is {b[split]!r} (key {b['keys'][index][:12]}) but the results were "
                        f"computed from {a[split]!r} (key {a['keys'][index][:12]}): another store or a rebuilt group")
    return None if len(old) == len(new) else f"{len(old)} pairings recorded, {len(new)} now"


def check_out(spec, out: Path, features: list | None = None) -> None:
    """Refuse an output directory holding another sweep, results of other features, or foreign
    files; writes nothing."""
    if out.exists() and not out.is_dir():
        raise OutputConflictError(path=str(out), reason="is a file")
    # List first, look for sweep.json after: a sweep records it before anything else, so an
    # entry listed while another sweep starts in this directory implies it.
    listed = [p for p in out.iterdir() if not _is_ours(p)] if out.is_dir() else []
    if (out / META_NAME).exists():
        old = _read_meta(out)
        if old.get("key") != spec.key():
            raise OutputConflictError(
                path=str(out), reason=f"holds results of a different sweep spec (key {str(old.get('key', '?'))[:12]} "
                                      f"vs {spec.key()[:12]}): another protocol, selection, metric or default; run the "
                                      f"spec that made it to resume")
        recorded = old.get("features")
        if features is not None and recorded is not None:
            why = _features_differ(recorded, features)
            if why:
                raise OutputConflictError(path=str(out), reason=f"holds results of other features: {why}; resume "
                                                                f"with the store they came from, or use a new --out")
        return
    if listed:
        raise OutputConflictError(path=str(out), reason="is a non-empty directory without a sweep.json")


def prepare_out(spec, out: Path, features: list | None = None) -> None:
    """Under the output lock: check again (another sweep may have just started it), then record
    the spec and the features it reads (an output of an older sweep gets them recorded now)."""
    check_out(spec, out, features)
    meta = out / META_NAME
    old = _read_meta(out) if meta.exists() else None
    if old is None or (features is not None and old.get("features") is None):
        doc = {"key": spec.key(), "spec": spec.to_dict(), "features": features}
        atomic_write(meta, json.dumps(doc, indent=2).encode(), consequence="the sweep did not start")


def pending_tasks(tasks, out: str | os.PathLike) -> list:
    """The tasks without a (sound) done record."""
    return [t for t in tasks if done_count(out, t) is None]


def _problems(out: Path, expected: dict | None, features: list | None, keep: dict | None = None) -> dict[str, str]:
    """Per done record (its file name's task id): what is wrong with it, for those that are not sound.
    ``keep``, when given, receives each sound task's rows (read once: :func:`load_results` uses them)."""
    import pandas as pd

    bad = {}
    for rec in sorted((out / "done").glob("*.json")) if (out / "done").is_dir() else []:
        info = _read_record(rec)
        task = rec.stem
        if info is None:
            bad[task] = f"its done record {rec.name} is damaged"
            continue
        if expected is not None and task not in expected:
            bad[task] = "it is no task of this output's spec and features (copied in from another sweep?)"
            continue
        path = out / "results" / f"{task}.parquet"
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
            bad[task] = f"results/{path.name} cannot be read ({type(e).__name__}: {str(e)[:120]})"
            continue
        if len(df) != info["rows"]:
            bad[task] = f"results/{path.name} holds {len(df)} rows, but its done record says {info['rows']}"
        elif features is not None and "train_group" in df.columns and len(df):
            pairing = features[int(df["group"].iloc[0])] if int(df["group"].iloc[0]) < len(features) else None
            if pairing is None or set(df["train_group"]) != {pairing["train"]}:
                bad[task] = (f"its rows come from train group {sorted(set(df['train_group']))[0]!r}, not the "
                             f"pairing's {pairing['train'] if pairing else '?'!r}")
        if keep is not None and task not in bad:
            keep[task] = df
    return bad


def _expected(out: Path) -> tuple[dict | None, list | None]:
    """(task id -> task of the recorded spec and features, the features), or (None, None) for an
    output whose spec or features can no longer be expanded (an older featstore's)."""
    from featstore.errors import FeatstoreError

    from ._spec import load_spec
    from ._tasks import expand_tasks

    meta = _read_meta(out)
    features = meta.get("features")
    if features is None:
        return None, None
    try:
        spec = dict(meta["spec"])
        spec.pop("resolved", None)
        tasks = expand_tasks(load_spec(spec), features)
    except (KeyError, TypeError, ValueError, FeatstoreError):
        return None, features
    return {t.id: t for t in tasks}, features


def tidy_out(out: Path, say=None) -> list[str]:
    """Under the output lock, before a sweep resumes: move every damaged or foreign result (a
    truncated record or parquet, a task of another spec, rows of other groups) to
    ``OUT/set-aside/``, so that its task runs again. Returns what was moved, one line each."""
    expected, features = _expected(out)
    moved = []
    for task, why in _problems(out, expected, features).items():
        aside = out / SET_ASIDE / uuid.uuid4().hex[:8]
        aside.mkdir(parents=True, exist_ok=True)
        for path in (out / "done" / f"{task}.json", out / "results" / f"{task}.parquet"):
            if path.exists():
                shutil.move(str(path), str(aside / path.name))
        moved.append(f"{task}: {why}; moved to {aside.relative_to(out)}/")
        if say is not None:
            say(f"featstore sweep: set aside task {task}: {why} (it runs again)")
    return moved


def load_results(out: str | os.PathLike, repair: bool = False) -> "pd.DataFrame":
    """The sweep's results as a pandas DataFrame, one row per draw (completed tasks only).

    Every done task is checked against the spec and features the output records: a damaged
    record or results file, a task the spec does not have, or rows of other groups is one
    :class:`CorruptResultsError` naming them. ``repair=True`` sets them aside instead (as a
    resumed sweep does, which then runs those tasks again).
    """
    import pandas as pd

    out = Path(out)
    if not (out / META_NAME).exists():
        raise ResultsNotFoundError(path=str(out))
    expected, features = _expected(out)
    read: dict = {}
    problems = _problems(out, expected, features, keep=read)
    if problems and not repair:
        task, why = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptResultsError(path=str(out), task=task, problem=why + more)
    if problems:
        tidy_out(out)
    frames = [read[task] for task in sorted(read)]  # the sound tasks, in the order of their records
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["group", "mode", "seed", "fraction", "draw"], na_position="first",
                        kind="stable").reset_index(drop=True)
    df.attrs["test_labels"] = _test_labels(out)  # per pairing: what test_correct refers to
    return df
