"""Fault-injection points for the crash-safety tests.

Inactive unless the environment variable ``FEATSTORE_FAULT`` is set to
``POINT:N``: the process then kills itself with SIGKILL (no cleanup, no atexit, like
a power cut or the OOM killer) the N-th time it reaches ``POINT``. Points:

``group-created``  a new group is fully created in the temporary folder, not yet renamed
``chunk-data``     a chunk's features are on disk but not yet marked in ``progress``
``chunk-mark``     a chunk is marked done
``finish``         every chunk of a group is done; its ``complete`` state is not yet written
``task-rows``      a sweep task's rows are committed, its done record is not yet written
``task-done``      a sweep task's done record is written
``remove-renamed`` ``featstore rm`` moved a group into the trash, not yet deleted
``push-file``      ``featstore push`` uploaded one more file of a group, not yet its metadata
``fit-started``    a sweep's fit (its tasks not done before, trained together) starts on a worker
``task-started``   a sweep task's own work starts: its fit has trained, its rows are not yet made

With ``FEATSTORE_FAULT_LOG=PATH`` each :func:`record` appends one line (``EVENT WHAT pid``) to
PATH, from every process (O_APPEND: lines never interleave), for tests that count what was
done (each chunk marked exactly once across a build's workers).

With ``FEATSTORE_FAULT_ONCE=PATH`` the fault fires only while PATH does not exist (it
is created just before the kill, holding the process's pid and SLURM job id), so a restarted worker process does not die again.
With ``FEATSTORE_FAULT_MODE=hang`` the process does not kill itself: it stops there (sleeps
until something else kills it: ``scancel``, a lost node) after creating ``FEATSTORE_FAULT_ONCE``'s
PATH, which tells the test that it is there.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def record(event: str, what: str) -> None:
    path = os.environ.get("FEATSTORE_FAULT_LOG")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {what} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def point(name: str) -> None:
    spec = os.environ.get("FEATSTORE_FAULT")
    if not spec:
        return
    where, _, nth = spec.partition(":")
    if where != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        once = os.environ.get("FEATSTORE_FAULT_ONCE")
        if once:
            try:
                fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            # who stopped here: the pid, and the SLURM job it runs in (a test cancels that job)
            os.write(fd, f"{os.getpid()} {os.environ.get('SLURM_JOB_ID', '')}".encode())
            os.close(fd)
        if os.environ.get("FEATSTORE_FAULT_MODE") == "hang":
            import time

            while True:
                time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)
