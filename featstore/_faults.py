"""Fault-injection points for the crash-safety tests.

Inactive unless the environment variable ``FEATSTORE_FAULT`` is set to
``POINT:N``: the process then kills itself with SIGKILL (no cleanup, no atexit, like
a power cut or the OOM killer) the N-th time it reaches ``POINT``. Points:

``group-created``  a new group is fully created in the temporary folder, not yet renamed
``chunk-data``     a chunk's features are on disk but not yet marked in ``progress``
``chunk-mark``     a chunk is marked done
``finish``         every chunk of a group is done; its ``complete`` state is not yet written
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("FEATSTORE_FAULT")
    if not spec:
        return
    where, _, nth = spec.partition(":")
    if where != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
