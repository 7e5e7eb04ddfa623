"""An exclusive lock on object storage (S3): one object, a conditional put, and a lease.

Object stores have no ``flock``. S3 (and moto, and most S3-compatible stores) take
conditional writes: ``PutObject`` with ``If-None-Match: *`` creates a key only if it does not
exist, and with ``If-Match: ETAG`` replaces it only if it is still that version; both are
atomic and strongly consistent. So:

* **acquire**: put the lock object with ``If-None-Match: *``. Exactly one of several
  builds creates it. Its metadata names the holder (host, pid, since) and the lease's end.
* **renew**: a thread puts it again every third of the lease with ``If-Match`` its own ETag,
  moving the end forward. If that fails, someone took the lock after the lease ran out (this
  process stalled past it): the lock is *lost*, and :meth:`LeaseLock.check` (called before
  each chunk is written) stops the build before it writes anything more.
* **take over**: a lock whose lease has ended (its holder was killed: nothing renews it) is
  replaced with ``If-Match`` the stale ETag, so of several waiting builds exactly one wins.
* **release**: delete with ``If-Match`` its own ETag.

Why a lease rather than a lock service: nothing else to run or reach (the bucket is already
shared by everyone who builds there), and a killed build's lock frees itself. The price: the
re-run of a killed build waits out the lease (``FEATSTORE_LEASE_SECONDS``, default 60 s), and
clocks must agree to within a fraction of it (the lease's end is wall-clock time).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from .fileio import LockBusy

__all__ = ["LeaseLock", "lease_seconds"]

DEFAULT_LEASE = 60.0


def lease_seconds() -> float:
    """The lease: ``FEATSTORE_LEASE_SECONDS`` (tests shorten it), else 60 s."""
    text = os.environ.get("FEATSTORE_LEASE_SECONDS", "")
    try:
        value = float(text) if text else DEFAULT_LEASE
    except ValueError:
        from .errors import InvalidParameterError

        raise InvalidParameterError(key="FEATSTORE_LEASE_SECONDS", value=text, expected="a number of seconds > 0") \
            from None
    return value if value > 0 else DEFAULT_LEASE


def _conflict(e: BaseException) -> bool:
    """A failed condition: the key exists (If-None-Match), changed (If-Match), or a concurrent
    conditional write won (S3's 409 ConditionalRequestConflict)."""
    if isinstance(e, FileExistsError):  # how s3fs re-raises a 412
        return True
    text = f"{type(e).__name__} {e} {getattr(e, 'response', '')}"
    return any(code in text for code in ("PreconditionFailed", "412", "pre-conditions", "ConditionalRequestConflict",
                                         "409"))


def _missing(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e} {getattr(e, 'response', '')}"
    return isinstance(e, FileNotFoundError) or any(c in text for c in ("NoSuchKey", "404", "Not Found"))


class LeaseLock:
    """The lock object at ``path`` (``bucket/key``) of the s3fs filesystem ``fs``."""

    def __init__(self, fs, path: str, lease: float | None = None):
        self.fs, self.path = fs, path
        self.bucket, _, self.key = path.partition("/")
        self.lease = lease or lease_seconds()
        self.holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the object
    def _put(self, **condition) -> str | None:
        """Put the lock with its lease renewed; its new ETag, or None if the condition failed."""
        meta = {"holder": self.holder, "expires": f"{time.time() + self.lease:.3f}"}
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Metadata=meta,
                                  Body=json.dumps(meta).encode(), **condition)
        except Exception as e:  # noqa: BLE001 - s3fs re-raises botocore's errors as OSError subclasses
            if _conflict(e):
                return None
            raise
        return out["ETag"]

    def _head(self) -> tuple[str, dict] | None:
        """(ETag, metadata) of the lock as it is now, read in one request; None if absent."""
        try:
            out = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001
            if _missing(e):
                return None
            raise
        return out["ETag"], {k.lower(): v for k, v in out.get("Metadata", {}).items()}

    # ------------------------------------------------------------------ the protocol
    def acquire(self, wait: bool = True, on_wait=None) -> None:
        told = False
        while True:
            etag = self._put(IfNoneMatch="*")
            if etag is None:
                seen = self._head()
                if seen is None:
                    continue  # released in between: try again at once
                stale_etag, meta = seen
                try:
                    expired = float(meta.get("expires", "0")) < time.time()
                except ValueError:
                    expired = True  # not a lease this code wrote: treat as free once it is this old
                if expired:
                    etag = self._put(IfMatch=stale_etag)  # of several takers, one wins
            if etag is not None:
                self.etag = etag
                self._thread = threading.Thread(target=self._renew, name="featstore-lease", daemon=True)
                self._thread.start()
                return
            holder = (self._head() or ("", {}))[1].get("holder", "another build")
            if not wait:
                raise LockBusy(self.path, holder)
            if on_wait and not told:
                on_wait(holder)
                told = True
            time.sleep(min(2.0, self.lease / 4))

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception:  # noqa: BLE001 - a network blip: the next renewal tries again
                continue
            if etag is None:
                self.lost = True
                return
            self.etag = etag

    def check(self) -> None:
        """Raise if the lock was lost (called before each chunk is written)."""
        if self.lost:
            from .errors import LockLostError

            raise LockLostError(lock=self.path, lease=self.lease)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is not None and not self.lost:
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001
                if not (_conflict(e) or _missing(e)):
                    raise
        self.etag = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
