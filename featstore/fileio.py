"""The two file primitives the store and the sweeps share: an atomic write and a lock.

``atomic_write``
    Writes a file whole or not at all: the bytes go to a temporary file beside it,
    are flushed to disk, then renamed over the target (or hard-linked, when the target
    must not be replaced). A reader never sees half a file; a failed write leaves the
    target as it was and no temporary file behind.
``locked``
    An exclusive ``fcntl`` lock on a file, which the kernel releases when its holder
    dies (a SIGKILLed build or sweep never leaves a stale lock). The holder writes who
    it is into the file, so a second process can say whom it is waiting for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import WriteFailedError

__all__ = ["atomic_write", "locked", "is_temporary", "LockBusy"]

_TMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{12}\.tmp")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def is_temporary(entry: str, of: str | None = None) -> bool:
    """Whether a directory entry is an :func:`atomic_write` in flight (of file ``of``)."""
    m = _TMP.fullmatch(entry)
    return m is not None and (of is None or m.group("name") == of)


def atomic_write(path: str | os.PathLike, data: bytes, *, replace: bool = True,
                 consequence: str = "the file was left as it was") -> bool:
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path : path
    data : bytes
    replace : bool
        Replace an existing file (``os.replace``). With False the file is hard-linked
        into place and an existing one is kept: two processes creating the same file
        race safely, the first one wins.
    consequence : str
        What a failure means for the caller's work (put into the error message).

    Returns
    -------
    bool
        True when this call's bytes are now the file, False when ``replace=False`` found
        the file already there.

    Raises
    ------
    WriteFailedError
        Naming the path and the reason (disk full, permission denied, ...).
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    except OSError as e:
        raise WriteFailedError(path=str(path), reason=e.strerror or str(e), consequence=consequence) from e
    finally:
        tmp.unlink(missing_ok=True)


class LockBusy(Exception):
    """Raised by :func:`locked` with ``wait=False`` when another process holds the lock;
    ``holder`` says who (callers turn it into their own error)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, wait: bool = True,
           on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    Parameters
    ----------
    path : path
        The lock file. Its content names the holder (pid, host, since when).
    wait : bool
        Block until the lock is free; with False, raise :class:`LockBusy` at once.
    on_wait : callable, optional
        ``on_wait(holder)`` is called once, before blocking, when the lock is taken.
    """
    path = Path(path)
    f = open(path, "a+")
    held = False
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                raise LockBusy(path, holder) from None
            if on_wait:
                on_wait(holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        held = True
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield
    finally:
        if held:  # a busy lock's file names its holder: leave it
            with contextlib.suppress(Exception):
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
