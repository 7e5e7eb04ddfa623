"""Exceptions raised by featstore, probes and pipelines: one class per meaning.

Every exception derives from :class:`FeatstoreError` *and* from the builtin it
refines (a missing group is a ``FileNotFoundError``, a bad parameter a ``ValueError``,
...), so callers can catch either (zarr's ``GroupNotFoundError`` is the model). Each
class has one message template, ``_msg``, filled from keyword fields that are kept on
the instance (``err.fields``); nothing else words a message of that class. Two
optional fields every class takes:

``where``
    Context put in front (``"sweep group lite0/pre_logits/fashion-mnist (train)"``);
    :meth:`FeatstoreError.within` adds it to an error raised further down.
``hint``
    The fix, appended in parentheses where the template has none.

>>> raise GroupNotFoundError(name="lite0__x", store="data/featstore.zarr", known=["a", "b"])
Traceback (most recent call last):
...
featstore.errors.GroupNotFoundError: No group 'lite0__x' in data/featstore.zarr; groups: a, b
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = [
    "FeatstoreError",
    "InvalidParameterError",
    "UnknownNameError",
    "UnknownKeyError",
    "MissingKeyError",
    "IncompatibleParametersError",
    "SpecNotFoundError",
    "SpecSyntaxError",
    "NotFittedError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "DatasetNotFoundError",
    "InvalidDatasetError",
    "BadImagesError",
    "StoreError",
    "StoreNotFoundError",
    "NotAFeatureStoreError",
    "StoreNotWritableError",
    "WriteFailedError",
    "GroupNotFoundError",
    "AmbiguousGroupError",
    "IncompleteGroupError",
    "StaleGroupError",
    "CorruptGroupError",
    "GroupLockedError",
    "BuildWorkersError",
    "LockLostError",
    "MismatchedGroupsError",
    "ClassMapError",
    "InvalidFeaturesError",
    "NonFiniteFeaturesError",
    "ProbeDivergedError",
    "Float16OverflowError",
    "ResultsNotFoundError",
    "OutputConflictError",
    "CorruptResultsError",
    "SweepEndedError",
    "MissingDependencyError",
    "choices_text",
]


def choices_text(choices: Iterable[Any], limit: int = 40) -> str:
    """Format a list of valid choices for an error message (shortened when long)."""
    items = sorted({str(c) for c in choices})
    if len(items) > limit:
        head = ", ".join(items[: limit // 2])
        tail = ", ".join(items[-limit // 4 :])
        return f"{head}, ... ({len(items) - limit // 2 - limit // 4} more) ..., {tail}"
    return ", ".join(items) if items else "(none)"


def _rebuild(cls, fields):
    return cls(**fields)


class FeatstoreError(Exception):
    """Base class of every error featstore raises on purpose.

    Subclasses set ``_msg``, a ``str.format`` template over their keyword fields.
    """

    _msg = "{detail}"

    def __init__(self, **fields: Any):
        self.fields = dict(fields)
        where, hint = fields.pop("where", None), fields.pop("hint", None)
        text = self._msg.format(**self._prepare(fields))
        if where:
            text = f"{where}: {text}"
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)

    def _prepare(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Derived fields of the template (a value's type name, a joined list, ...)."""
        return fields

    def within(self, where: str) -> "FeatstoreError":
        """The same error with ``where`` put in front (re-raise it: ``raise e.within(...) from None``)."""
        fields = dict(self.fields)
        fields["where"] = f"{where}: {fields['where']}" if fields.get("where") else where
        return type(self)(**fields)

    def __reduce__(self):  # keyword-only construction survives pickling (joblib, dask)
        return _rebuild, (type(self), self.fields)


# ----------------------------------------------------------------------------- parameters


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "list", tuple: "list",
            dict: "table", type(None): "nothing"}.get(type(value), type(value).__name__)


class InvalidParameterError(FeatstoreError, ValueError):
    """A parameter (keyword argument, spec key, command-line option) has a value outside
    its declared type or range.

    Fields: ``key`` (the parameter's path, e.g. ``probe.momentum``), ``value``,
    ``expected`` (what the declaration allows).
    """

    _msg = "{key}: expected {expected}; got {value!r} ({value_type})"

    def _prepare(self, fields):
        return {**fields, "value_type": _type_name(fields.get("value"))}


class UnknownNameError(InvalidParameterError):
    """A name (model, layer, dataset, weight source, mode, launcher, ...) is not registered.

    Fields: ``kind`` (what was looked up), ``name``, ``choices`` (the registered names),
    optional ``context`` (what the name belongs to, e.g. the model of a layer).
    """

    _msg = "Unknown {kind} {name!r}{for_context}; known: {known}"

    def __init__(self, kind=None, name=None, choices=(), hint=None, context=None, **fields):
        # positional (kind, name, choices) as registries call it
        super().__init__(kind=kind, name=name, choices=sorted({str(c) for c in choices}), hint=hint or None,
                         context=context or None, **fields)
        self.kind, self.name, self.choices = kind, name, self.fields["choices"]

    def _prepare(self, fields):
        context = fields.get("context")
        return {**fields, "for_context": f" for {context}" if context else "", "known": choices_text(fields["choices"])}


class UnknownKeyError(InvalidParameterError):
    """A table (sweep spec section, keyword set) holds a key that is not declared.

    Fields: ``key`` (its path), ``value``, ``allowed`` (the declared keys).
    """

    _msg = "Unknown key {key} (= {shown}); allowed here: {allowed_text}"

    def _prepare(self, fields):
        value = fields.get("value")
        shown = "a table" if isinstance(value, (dict, list)) and len(repr(value)) > 40 else repr(value)
        return {**fields, "shown": shown, "allowed_text": ", ".join(sorted(fields["allowed"]))}


class MissingKeyError(InvalidParameterError):
    """A required key is absent. Fields: ``key``, ``expected``."""

    _msg = "{key} is required: expected {expected}"


class IncompatibleParametersError(InvalidParameterError):
    """Each value is valid alone, but not together (or not on this machine).

    Fields: ``key``, ``value``, ``reason`` (what it conflicts with and the fix).
    """

    _msg = "{key}={value!r} cannot be used here: {reason}"


class SpecNotFoundError(FeatstoreError, FileNotFoundError):
    """A spec file does not exist. Fields: ``path``, ``kind`` (``sweep``, the default, or ``build``)."""

    _msg = "{kind} spec {path!r} does not exist ({where})"

    def _prepare(self, fields):
        import os

        return {"kind": "sweep", **fields, "where": os.path.abspath(str(fields["path"]))}


class SpecSyntaxError(InvalidParameterError):
    """A spec file is not valid TOML. Fields: ``path``, ``reason``, ``kind`` (``sweep`` or ``build``)."""

    _msg = "{kind} spec {path!r} is not valid TOML: {reason}"

    def _prepare(self, fields):
        return {"kind": "sweep", **fields}


class NotFittedError(FeatstoreError, ValueError, AttributeError):
    """An estimator was used before ``fit`` (also an ``AttributeError``, as scikit-learn's).

    Fields: ``estimator`` (its class name).
    """

    _msg = "this {estimator} is not fitted yet; call fit(X, y) first"


# ----------------------------------------------------------------------------- models and data


class CheckpointError(FeatstoreError, ValueError):
    """A checkpoint cannot be read or does not fit the model.

    Fields: ``path`` (or a description of the source), ``reason``.
    """

    _msg = "checkpoint {path}: {reason}"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint could not be loaded without executing code, so it was refused.

    Fields: ``path``, ``reason`` (what the restricted unpickler refused).
    """

    _msg = ("Refused checkpoint {path!r}: it is a pickle that needs more than tensors to load (it may carry "
            "code), and featstore loads checkpoints with torch.load(weights_only=True) so that no checkpoint "
            "can run code. Convert it to safetensors or a plain state dict in a trusted environment. ({reason})")


class DatasetNotFoundError(FeatstoreError, FileNotFoundError):
    """A registered dataset's files are not on this machine.

    Fields: ``dataset``, ``looked_in``, ``how`` (how to get them).
    """

    _msg = "{dataset} not found: looked in {looked_in}. {how}"


class InvalidDatasetError(FeatstoreError, ValueError):
    """A dataset's files exist but cannot serve as one (empty split, class folders
    differing between splits, ...). Fields: ``dataset``, ``problem``."""

    _msg = "dataset {dataset!r}: {problem}"


class BadImagesError(InvalidDatasetError):
    """Image files that cannot be decoded. Fields: ``dataset``, ``files`` (["path: reason", ...]),
    ``fix`` (what to do)."""

    _msg = "dataset {dataset!r}: {n} bad image file{s}: {listed}. {fix}"

    def _prepare(self, fields):
        files = list(fields["files"])
        listed = "; ".join(files[:50]) + (f"; ... (+{len(files) - 50} more)" if len(files) > 50 else "")
        return {**fields, "n": len(files), "s": "" if len(files) == 1 else "s", "listed": listed}


# ----------------------------------------------------------------------------- the store


class StoreError(FeatstoreError, OSError):
    """Base of errors about the on-disk store and results."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists at the path. Fields: ``path``."""

    _msg = "No feature store at {path!r} ({where}); create one with `featstore build --store {path}`"

    def _prepare(self, fields):
        import os

        path = str(fields["path"])
        return {**fields, "where": path if "://" in path else os.path.abspath(os.path.expanduser(path))}


class NotAFeatureStoreError(StoreError):
    """The path holds something that featstore did not write (or another format).

    Fields: ``path``, ``reason``.
    """

    _msg = "{path!r} is not a featstore store: {reason}"


class StoreNotWritableError(StoreError, PermissionError):
    """The store path cannot be created or written. Fields: ``path``, ``reason``."""

    _msg = "store {path!r} cannot be written: {reason}; choose a path you can write, e.g. data/featstore.zarr"


class WriteFailedError(StoreError):
    """Writing a file failed (disk full, permission, I/O). Fields: ``path``, ``reason``,
    ``consequence`` (what was kept and how to resume)."""

    _msg = "writing {path} failed: {reason}; {consequence}"


class GroupNotFoundError(StoreError, FileNotFoundError):
    """No group matches a name or query. Fields: ``name`` (or the query), ``store``, ``known``."""

    _msg = "No group {name} in {store}; groups: {known_text}"

    def _prepare(self, fields):
        name = fields["name"]
        return {**fields, "name": repr(name) if isinstance(name, str) else f"matching {name}",
                "known_text": "; ".join(fields["known"]) or "(none)"}


class AmbiguousGroupError(FeatstoreError, LookupError):
    """Several groups match a keyword query. Fields: ``query``, ``matches`` (descriptions)."""

    _msg = ("{n} groups match {query}: {listed}. Add keywords (weights=, weights_sha256= a prefix, limit=, views=, "
            "dtype=) or pass the name.")

    def _prepare(self, fields):
        return {**fields, "n": len(fields["matches"]), "listed": "; ".join(fields["matches"])}


class IncompleteGroupError(StoreError, FileNotFoundError):
    """The group exists but its build has not finished (or was killed).

    Fields: ``name``, ``store``, ``state``.
    """

    _msg = ("group {name!r} in {store} is {state!r}, not complete: its build was interrupted or is running. "
            "Re-run the same `featstore build` command to finish it (finished chunks are kept).")


class StaleGroupError(StoreError):
    """A group's recorded spec or library versions no longer fit what it is read or
    resumed for. Fields: ``name``, ``store``, ``reason`` (with the fix)."""

    _msg = "group {name!r} in {store} cannot be trusted: {reason}"


class CorruptGroupError(StoreError):
    """A chunk is missing or unreadable, or the data violate the group's invariants.

    Fields: ``path``, ``name``, ``problems`` (list of str).
    """

    _msg = ("group {path} failed verification: {listed}. Rebuild it: `featstore rm {name}`, then re-run "
            "`featstore build`.")

    def _prepare(self, fields):
        problems = list(fields["problems"])
        listed = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        return {**fields, "listed": listed}


class GroupLockedError(StoreError, BlockingIOError):
    """Another process holds the build lock of a group. Fields: ``name``, ``store``, ``holder``."""

    _msg = "group {name!r} in {store} is being built by {holder}; wait for it to finish and run again"


class BuildWorkersError(StoreError):
    """A build shared by many workers did not finish: a worker failed or died and the others
    could not finish its rows. Fields: ``groups``, ``store``, ``problem``."""

    _msg = ("the build of {groups} in {store} did not finish: {problem}. Every chunk written is kept and marked; "
            "re-run the same command to build only what is missing")


class LockLostError(FeatstoreError, RuntimeError):
    """A build's lock at a URL (a lease) was taken over by another build after this one
    stalled past the lease. Fields: ``lock``, ``lease`` (seconds)."""

    _msg = ("the build lock {lock} was taken by another build after this one stalled past its {lease:.0f} s lease; "
            "nothing more was written (the chunks before it are kept and marked). Run the build again")


class MismatchedGroupsError(FeatstoreError, ValueError):
    """Groups that must describe the same extraction (a sweep's train and test) do not.

    Fields: ``first``, ``second`` (group names), ``differences``.
    """

    _msg = ("groups {first} and {second} were built differently ({differences}); build both with the same "
            "model, weights and preprocessing")


class ClassMapError(FeatstoreError, ValueError):
    """An evaluation set's classes do not map onto the classes a probe was trained on.

    Fields: ``test`` (the evaluation set), ``train`` (the training set), ``problem``.
    """

    _msg = "the classes of {test} do not map onto those of {train}: {problem}"


class InvalidFeaturesError(FeatstoreError, ValueError):
    """Features or labels are unusable (NaN/Inf, labels out of range, empty split, wrong shape).

    Fields: ``where`` (whose features), ``problem``.
    """

    _msg = "{problem}"


class NonFiniteFeaturesError(FeatstoreError, ValueError):
    """A backbone gave NaN or inf for a layer during a build (before anything of it was written).

    Fields: ``layer``, ``group``, ``where_in`` (the rows), ``count``, ``example``.
    """

    _msg = ("layer {layer} gave {count} NaN/inf values in {where_in} ({example}); nothing of them was written and "
            "group {group} stays 'building'. The weights or the inputs are broken (check the checkpoint for NaN "
            "tensors); remove the partial group with `featstore rm --incomplete`")


class Float16OverflowError(FeatstoreError, OverflowError):
    """A layer's values exceed float16's range (65,504) in a ``--dtype float16`` build.

    Fields: ``layer``, ``group``, ``where_in``, ``largest``, ``neuron``, ``count``.
    """

    _msg = ("layer {layer} holds values beyond float16's range (largest |value| {largest:.6g} > 65504, neuron "
            "{neuron}; {count} values in {where_in}): float16 would store them as inf. Nothing of them was written "
            "and group {group} stays 'building'. Build this layer with --dtype float32 (another group; remove the "
            "partial one with `featstore rm --incomplete`)")


class ProbeDivergedError(FeatstoreError, FloatingPointError):
    """Probes whose training loss became NaN or inf (SGD diverged).

    Fields: ``count``, ``total``, ``epoch``, ``examples`` (some of the draws), ``lr``,
    ``weight_decay``, ``momentum``, ``batch_size``.
    """

    _msg = ("{count} of {total} probes diverged (training loss NaN or inf in epoch {epoch}: {examples}) under lr="
            "{lr:g}, weight_decay={weight_decay:g}, momentum={momentum:g}, batch_size={batch_size}; their accuracy "
            "would be chance and any DR from it meaningless. Lower the learning rate (or standardise the features) "
            "and run again")


# ----------------------------------------------------------------------------- sweep results


class ResultsNotFoundError(StoreError, FileNotFoundError):
    """A directory holds no sweep results. Fields: ``path``."""

    _msg = "{path!r} holds no sweep results (no sweep.json); run `featstore sweep SPEC --out {path}` first"


class OutputConflictError(StoreError, FileExistsError):
    """A sweep's output directory holds something else. Fields: ``path``, ``reason``."""

    _msg = "--out {path!r} {reason}; use a new output directory"


class CorruptResultsError(StoreError):
    """A sweep output's results cannot be trusted as they are: a damaged record or results file,
    a task of another spec, rows of other groups. Fields: ``path``, ``task``, ``problem``."""

    _msg = ("results of {path}: task {task}: {problem}. Re-run the sweep (the same spec and store): it sets such "
            "results aside in set-aside/ and redoes their tasks (or read the rest with load_results(..., "
            "repair=True))")


class MissingDependencyError(FeatstoreError, ImportError):
    """A feature needs an optional dependency that is not installed.

    Fields: ``module``, ``feature``, ``extra``, ``distribution``.
    """

    _msg = "{feature} needs {module}, which is not installed: pip install '{distribution}[{extra}]'"


class SweepEndedError(FeatstoreError, RuntimeError):
    """A worker's task finished after the sweep that launched it stopped owning the output.

    Fields: ``task``, ``out``, ``reason``.
    """

    _msg = "task {task} was not recorded in {out}: {reason}; its rows are dropped (re-run the sweep to resume)"


class RemoteStoreError(StoreError):
    """An object-storage URL that cannot be reached as asked (missing bucket, refused
    credentials, no endpoint). Fields: ``url``, ``reason``, ``fix``."""

    _msg = "store {url!r}: {reason}. {fix}"
