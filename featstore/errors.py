"""Exceptions raised by featstore, probes and pipelines.

Every exception derives from :class:`FeatstoreError` *and* from the builtin that
matches its meaning (``ValueError`` for bad values, ``FileNotFoundError`` for missing
groups, ...), so callers can catch either. Messages name the parameter, the bad value,
the valid choices and, where there is one, the fix.
"""

from __future__ import annotations

from typing import Iterable

__all__ = [
    "FeatstoreError",
    "UnknownNameError",
    "InvalidParameterError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "StoreError",
    "NotAFeatureStoreError",
    "GroupNotFoundError",
    "AmbiguousGroupError",
    "IncompleteGroupError",
    "StaleGroupError",
    "CorruptGroupError",
    "StoreNotWritableError",
    "GroupLockedError",
    "InvalidFeaturesError",
    "choices_text",
]


def choices_text(choices: Iterable[str], limit: int = 40) -> str:
    """Format a list of valid choices for an error message (shortened when long)."""
    items = sorted({str(c) for c in choices})
    if len(items) > limit:
        head = ", ".join(items[: limit // 2])
        tail = ", ".join(items[-limit // 4 :])
        return f"{head}, ... ({len(items) - limit // 2 - limit // 4} more) ..., {tail}"
    return ", ".join(items) if items else "(none)"


class FeatstoreError(Exception):
    """Base class of every error featstore raises on purpose."""


class InvalidParameterError(FeatstoreError, ValueError):
    """A parameter has a value outside its valid range or type."""


class UnknownNameError(InvalidParameterError):
    """A name (model, layer, dataset, weight source, mode, ...) is not registered.

    Parameters
    ----------
    kind : str
        What was looked up, e.g. ``"dataset"``.
    name : str
        The name given.
    choices : iterable of str
        The valid names.
    hint : str, optional
        How to list or fix, appended to the message.
    context : str, optional
        What the name belongs to, e.g. the model of a layer.
    """

    def __init__(self, kind: str, name: object, choices: Iterable[str], hint: str = "", context: str = ""):
        self.kind = kind
        self.name = name
        self.choices = sorted({str(c) for c in choices})
        where = f" for {context}" if context else ""
        msg = f"Unknown {kind} {name!r}{where}; known: {choices_text(self.choices)}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class CheckpointError(FeatstoreError, ValueError):
    """A checkpoint does not fit the model (missing/unexpected keys, shape mismatch)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint could not be loaded without executing code, so it was refused."""


class StoreError(FeatstoreError, OSError):
    """Base of errors about the on-disk store."""


class NotAFeatureStoreError(StoreError):
    """The path holds something that featstore did not write."""


class GroupNotFoundError(StoreError, FileNotFoundError):
    """No group in the store matches the request."""


class AmbiguousGroupError(FeatstoreError, LookupError):
    """Several groups match a keyword query; the message lists them."""


class IncompleteGroupError(StoreError, FileNotFoundError):
    """The group exists but its build has not finished (or was killed)."""


class StaleGroupError(StoreError):
    """A group's recorded extraction spec differs from the one requested."""


class CorruptGroupError(StoreError):
    """A chunk is missing or unreadable, or the data violate the group's invariants."""


class StoreNotWritableError(StoreError, PermissionError):
    """The store path cannot be created or written."""


class GroupLockedError(StoreError, BlockingIOError):
    """Another process holds the build lock of a group."""


class InvalidFeaturesError(FeatstoreError, ValueError):
    """Features or labels are unusable (NaN/Inf, labels out of range, empty split)."""
