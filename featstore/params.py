"""Declared parameters: each parameter is written once, with its type, range or choices,
default and description, in a :class:`Parameters` model (pydantic v2, strict mode).

Everything else derives from that declaration:

* validation with one clear error naming the key path, the value, its type and what
  the declaration allows (:func:`validate`); strings are never coerced into numbers or
  booleans (``"0.9"`` is not a float, ``"false"`` is not a bool);
* scikit-learn's estimator contract (keyword-only ``__init__``, ``get_params`` /
  ``set_params``) for classes deriving from :class:`Estimator`;
* keyword-only signatures of functions that take the parameters (:func:`takes`);
* command-line options (:func:`add_arguments`, :func:`parse_arguments`);
* the content hash of a sweep (``model_dump`` with the defaults filled in), so a
  changed default can never mix rows of two protocols.

Registries stay live: a field annotated ``Annotated[str, OneOf(REGISTRY, "kind")]``
accepts exactly the registry's current names, and its error lists them.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Collection, Mapping, Sequence

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from .errors import (
    IncompatibleParametersError,
    InvalidParameterError,
    MissingKeyError,
    UnknownKeyError,
    UnknownNameError,
)

__all__ = ["Parameters", "OneOf", "Unique", "Check", "Rule", "CommaList", "PathText", "Estimator", "validate", "describe",
           "field_type", "signature", "takes", "add_arguments", "parse_arguments", "defaults", "flags", "cli_key"]


SEED_MAX = 2**32 - 1
SeedValue = typing.Annotated[int, Field(ge=0, le=SEED_MAX)]
"""A seed: 0 .. 2**32 - 1, what numpy's and torch's generators both take (larger ones overflow)."""


class _Declaration(type(BaseModel)):
    """pydantic's model metaclass, with ``dir()`` (and so ``help()``) of a declaration showing its
    own fields and methods, not the ~60 that every pydantic model inherits (33k characters of
    ``help(featstore.BuildOptions)`` before)."""

    def __dir__(cls):
        own = set(cls.model_fields) if hasattr(cls, "model_fields") else set()
        for klass in cls.__mro__:
            if klass is BaseModel or klass.__module__.startswith("pydantic"):
                break
            own |= {k for k in vars(klass) if not k.startswith("_") or k in ("__init__", "__doc__")}
        return sorted(own - {"model_config"})


class Parameters(BaseModel, metaclass=_Declaration):
    """Base of every parameter declaration: strict types, unknown keys refused, immutable.

    Validate user input with :func:`validate` (featstore's errors, naming the key);
    constructing a model directly raises pydantic's ``ValidationError``.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, arbitrary_types_allowed=True,
                              use_attribute_docstrings=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        # help() shows names and defaults, and the docstring a Parameters section generated from the
        # declarations (types, ranges, defaults, descriptions), not pydantic's annotations with every
        # registry's repr inlined
        cls.__signature__ = signature(cls)
        if cls.model_fields and "\nParameters\n" not in (cls.__doc__ or ""):
            cls.__doc__ = f"{inspect.cleandoc(cls.__doc__ or '')}\n\nParameters\n----------\n{parameters_doc(cls, indent='')}"


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the registry is a live dict
class OneOf:
    """A name that must be in a registry (a dict or sequence, read at validation time).

    ``Annotated[str, OneOf(SELECTION_MODES, "selection mode")]``.
    """

    registry: Collection[str]
    kind: str

    def __get_pydantic_core_schema__(self, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def _check(self, value):
        if value not in self.registry:
            raise ValueError(f"not a registered {self.kind}")
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(repr(n) for n in sorted(self.registry))


@dataclass(frozen=True, eq=False)
class Check:
    """A value that must pass ``test(value) -> bool``; ``description`` says what passes.

    ``Annotated[str, Check(is_device_name, "auto, cpu, cuda or cuda:N")]``.
    """

    test: Callable[[Any], bool]
    description: str | Callable[[], str]
    """What passes, or a function saying it (for a registry read at validation time)."""

    def __get_pydantic_core_schema__(self, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def _check(self, value):
        if not self.test(value):
            raise ValueError(self.describe())
        return value

    def describe(self) -> str:
        return self.description() if callable(self.description) else self.description


@dataclass(frozen=True)
class CommaList:
    """A list of strings that may also be given as one comma-separated string
    (``"train,test"``), as on the command line. Only splits text into text."""

    def __get_pydantic_core_schema__(self, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(self._split, handler(source))

    @staticmethod
    def _split(value):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value


def _fspath(value):
    import os

    return os.fspath(value) if isinstance(value, os.PathLike) else value


class _PathText:
    def __get_pydantic_core_schema__(self, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(_fspath, handler(source))


PathText = typing.Annotated[str, _PathText()]
"""A filesystem path or URL, given as a string or a path-like object."""


class Rule(ValueError):
    """A rule between a parameter and the ones declared before it, raised by a validator:
    reported as an ``IncompatibleParametersError`` naming the parameter, with this text."""


@dataclass(frozen=True)
class Unique:
    """A list whose items must not repeat."""

    def __get_pydantic_core_schema__(self, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self._check, handler(source))

    @staticmethod
    def _check(value):
        seen = set()
        for item in value:
            if item in seen:
                raise ValueError(f"repeats {item!r}")
            seen.add(item)
        return value


# ----------------------------------------------------------------------------- describing


def _split_annotated(tp) -> tuple[Any, list]:
    """(bare type, metadata) of a possibly ``Annotated`` type."""
    meta: list = []
    while typing.get_origin(tp) is typing.Annotated:
        args = typing.get_args(tp)
        tp, meta = args[0], meta + list(args[1:])
    return tp, meta


def _bounds(meta) -> str:
    lo = hi = None
    for m in meta:
        if isinstance(m, FieldInfo):
            lo_hi = _bounds(m.metadata)
            if lo_hi:
                return lo_hi
        if isinstance(m, annotated_types.Ge):
            lo = ("[", m.ge)
        elif isinstance(m, annotated_types.Gt):
            lo = ("(", m.gt)
        elif isinstance(m, annotated_types.Le):
            hi = ("]", m.le)
        elif isinstance(m, annotated_types.Lt):
            hi = (")", m.lt)
        elif isinstance(m, annotated_types.Interval):
            return _bounds([x for x in (annotated_types.Ge(m.ge) if m.ge is not None else None,
                                        annotated_types.Gt(m.gt) if m.gt is not None else None,
                                        annotated_types.Le(m.le) if m.le is not None else None,
                                        annotated_types.Lt(m.lt) if m.lt is not None else None) if x is not None])
    if lo and hi:
        return f" in {lo[0]}{_number(lo[1])}, {_number(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_number(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_number(hi[1])}"
    return ""


def _number(bound) -> str:
    """A bound as people write it: integers whole (65536, 4294967295), floats short (1e-06, 0.5)."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _flat_meta(meta) -> list:
    out = []
    for m in meta:
        out += [m] + (_flat_meta(m.metadata) if isinstance(m, FieldInfo) else [])
    return out


_OMIT = " (or left out)"


def describe(tp, meta: Sequence = ()) -> str:
    """What a declared type allows, in words: ``a number in [0, 1)``, ``one of 'sgd', 'ridge'``."""
    tp, more = _split_annotated(tp)
    meta = _flat_meta(list(meta) + more)
    for m in meta:
        if isinstance(m, OneOf):
            return m.describe()
        if isinstance(m, Check):
            return m.describe()
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(describe(a) for a in args)
        return text + _OMIT if len(args) < len(typing.get_args(tp)) else text
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        empty_ok = not any(isinstance(m, annotated_types.MinLen) and m.min_length >= 1 for m in meta)
        unique = any(isinstance(m, Unique) for m in meta)
        head = "a list" if empty_ok else "a non-empty list"
        head += " without repeats" if unique else ""
        return head + (f", each item {describe(args[0])}" if args else "")
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _bounds(meta)
    if tp is float:
        return "a number" + _bounds(meta)
    if tp is str:
        if any(isinstance(m, _PathText) for m in meta):
            return "a path (a string)"
        low = max((m.min_length for m in meta if isinstance(m, annotated_types.MinLen)), default=0)
        high = min((m.max_length for m in meta if isinstance(m, annotated_types.MaxLen)), default=None)
        if high is not None:
            return f"a string of {low} to {high} characters"
        return f"a string of at least {low} character{'s' if low > 1 else ''}" if low else "a string"
    if tp is Any or tp is object:
        return "any value"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a table of " + ", ".join(tp.model_fields)
    return getattr(tp, "__name__", str(tp))


def _field_type(field: FieldInfo):
    return typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def field_type(model: type[BaseModel], name: str):
    """The declared type of one field, constraints included, to declare another field like it."""
    return _field_type(model.model_fields[name])


def _annotation_at(model: type[BaseModel], loc: Sequence) -> tuple[Any, list]:
    """The declared (type, metadata) at a validation error's location."""
    tp: Any = model
    meta: list = []
    for part in loc:
        tp, more = _split_annotated(tp)
        meta = _flat_meta(meta + more)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            if part not in tp.model_fields:
                return Any, []
            tp, meta = _field_type(tp.model_fields[part]), []
            continue
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
            tp, more = _split_annotated(tp)
            meta = _flat_meta(meta + more)
            origin = typing.get_origin(tp)
        if isinstance(part, int) and origin in (list, tuple):
            tp, meta = typing.get_args(tp)[0], []
            continue
        if isinstance(part, str) and part in ("list", "tuple", "function-after", "union"):
            continue  # pydantic's internal location steps
    return tp, meta


_ABSENT = object()


def _value_at(data: Any, loc: Sequence) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return _ABSENT
    return data


def _key_text(loc: Sequence, prefix: str) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out and not out.endswith(".") else "") + str(part)
    return out


def _plain(value):
    """numpy scalars and arrays as Python objects (a numpy int is an int); nothing else changes."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def validate(model: type[Parameters], data: Mapping[str, Any], *, prefix: str = "",
             key_format: Callable[[str], str] | None = None) -> Parameters:
    """``model(**data)`` with one featstore error for the first problem.

    Parameters
    ----------
    model : Parameters subclass
    data : mapping
        The raw values (a TOML table, keyword arguments, parsed command-line options).
    prefix : str
        Put before the key path in messages (``"probe."``, ``"SubsetProbes."``).
    key_format : callable, optional
        How a top-level key is shown (``lambda k: "--" + k.replace("_", "-")`` on the CLI).

    Raises
    ------
    UnknownKeyError, MissingKeyError, UnknownNameError, InvalidParameterError
        Naming the key path, the value, its type and what is expected.
    """
    if not isinstance(data, Mapping):
        raise InvalidParameterError(key=prefix.rstrip(".") or model.__name__, value=data,
                                    expected=describe(model))
    plain = {k: (v if model.model_fields.get(k) is not None and model.model_fields[k].annotation is Any
                 else _plain(v)) for k, v in data.items()}
    try:
        return model.model_validate(plain)
    except ValidationError as e:
        errs = e.errors()
        # a list with a bad item is also reported as too short (pydantic drops the item): keep
        # the error about the item, not the echo about its container
        errs = [er for er in errs if not any(len(o["loc"]) > len(er["loc"]) and o["loc"][:len(er["loc"])] == er["loc"]
                                             for o in errs)] or errs
        raise _translate(model, errs[0], plain, prefix, key_format, len(errs) - 1) from None


def _translate(model, err: dict, data, prefix: str, key_format, more: int):
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p in ("function-after",))]
    if key_format is not None and loc and isinstance(loc[0], str):
        key = key_format(loc[0]) + _key_text(loc[1:], "")
    else:
        key = _key_text(loc, prefix)
    hint = f"{more} more problem{'s' if more > 1 else ''} after this one" if more else None
    value = _value_at(data, loc)
    if value is _ABSENT:  # not given: the (default) value pydantic checked, if any
        value = err.get("input") if err["type"] not in ("missing", "extra_forbidden") else None
    if isinstance(value, tuple):
        value = list(value)  # shown as people write it (a list)
    if err["type"] == "extra_forbidden":
        parent, _ = _annotation_at(model, loc[:-1])
        allowed = list(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        return UnknownKeyError(key=key, value=value, allowed=allowed, hint=hint)
    tp, meta = _annotation_at(model, loc)
    expected = describe(tp, meta)
    if key_format is not None:  # on the command line an option not given is None
        expected = expected.replace(_OMIT, "")
    if err["type"] == "missing":
        return MissingKeyError(key=key, expected=expected, hint=hint)
    rule = err.get("ctx", {}).get("error")
    if isinstance(rule, Rule):
        return IncompatibleParametersError(key=key, value=value, reason=str(rule), hint=hint)
    if typing.get_origin(_split_annotated(tp)[0]) in (typing.Union, types.UnionType):  # Optional[X]: X's checks
        args = [a for a in typing.get_args(_split_annotated(tp)[0]) if a is not type(None)]
        if len(args) == 1:
            meta = meta + _split_annotated(args[0])[1]
    one_of = next((m for m in _flat_meta(meta + _split_annotated(tp)[1]) if isinstance(m, OneOf)), None)
    if one_of is not None and isinstance(value, str):
        return UnknownNameError(one_of.kind, value, one_of.registry, where=key, hint=hint)
    return InvalidParameterError(key=key, value=value, expected=expected, hint=hint)


# ----------------------------------------------------------------------------- signatures


def defaults(model: type[Parameters]) -> dict[str, Any]:
    """Every declared default, by name (required fields are left out)."""
    return {name: f.get_default(call_default_factory=True) for name, f in model.model_fields.items()
            if not f.is_required()}


def signature(model: type[Parameters], *, first_positional: bool = False,
              extra: Sequence[inspect.Parameter] = ()) -> inspect.Signature:
    """The keyword-only signature a declaration implies (names, defaults, annotations)."""
    params = []
    for i, (name, f) in enumerate(model.model_fields.items()):
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if first_positional and i == 0
                else inspect.Parameter.KEYWORD_ONLY)
        default = inspect.Parameter.empty if f.is_required() else f.get_default(call_default_factory=True)
        params.append(inspect.Parameter(name, kind, default=default))  # the docstring says the types
    return inspect.Signature(params + list(extra))


def parameters_doc(model: type[Parameters], indent: str = "    ") -> str:
    """numpydoc ``Parameters`` entries generated from the declaration."""
    lines = []
    for name, f in model.model_fields.items():
        lines.append(f"{indent}{name} : {describe(_field_type(f))}"
                     + ("" if f.is_required() else f", default {f.get_default(call_default_factory=True)!r}"))
        if f.description:
            import textwrap

            lines += textwrap.wrap(" ".join(f.description.split()), width=92, initial_indent=indent + "    ",
                                   subsequent_indent=indent + "    ")
    return "\n".join(lines)


# where a ``takes`` function's docstring wants its generated Parameters section
_PARAMETERS_HERE = "{parameters}"


def takes(model: type[Parameters], *, first_positional: bool = True, extra: Sequence[str] = ()):
    """Decorate ``fn(params: model, **extra)`` into a function with the declaration's keyword
    signature; arguments are validated (one clear error, before any work) into ``params``.

    ``extra`` names keyword arguments that are not parameters (callbacks such as ``log``):
    they are passed through unvalidated. ``{parameters}`` in ``fn``'s docstring becomes the
    numpydoc Parameters section of the declaration.
    """

    def deco(fn):
        extra_params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in extra]
        sig = signature(model, first_positional=first_positional, extra=extra_params)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind_partial(*args, **kwargs)
            except TypeError as e:
                given = set(kwargs) - set(sig.parameters)
                if given:
                    name = sorted(given)[0]
                    raise UnknownKeyError(key=f"{fn.__name__}.{name}", value=kwargs[name],
                                          allowed=list(model.model_fields)) from None
                raise TypeError(f"{fn.__name__}(): {e}") from None
            passed = {k: bound.arguments.pop(k) for k in list(bound.arguments) if k in extra}
            params = validate(model, bound.arguments, prefix=f"{fn.__name__}.")
            return fn(params, **passed)

        wrapper.__signature__ = sig  # inspect stops here, not at fn's (params) signature
        # help(fn) lists every parameter, generated from the declaration (one vocabulary), in
        # place of the pointer to it
        doc = inspect.cleandoc(fn.__doc__ or "")
        wrapper.__doc__ = doc.replace(_PARAMETERS_HERE, "Parameters\n----------\n" + parameters_doc(model, indent=""))
        return wrapper

    return deco


# ----------------------------------------------------------------------------- estimators


class Estimator:
    """scikit-learn's estimator contract from one declaration.

    A subclass sets ``_parameters`` to a :class:`Parameters` model and gets a keyword-only
    ``__init__`` that stores each argument unchanged (nothing computed, nothing checked:
    ``fit`` validates through :meth:`_validated_params`), ``get_params``, ``set_params`` and
    a ``__repr__`` listing the parameters that differ from their defaults. Instances are
    picklable and ``sklearn.base.clone`` copies them.
    """

    _parameters: ClassVar[type[Parameters]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("_parameters")
        if declared is None:
            return
        names = list(declared.model_fields)
        default = defaults(declared)

        def __init__(self, **params):
            unknown = sorted(set(params) - set(names))
            if unknown:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}; "
                                f"its parameters: {', '.join(names)}")
            for name in names:
                setattr(self, name, params[name] if name in params else default[name])

        __init__.__signature__ = signature(declared).replace(
            parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
            + list(signature(declared).parameters.values()))
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__doc__ = f"Parameters\n----------\n{parameters_doc(declared, indent='')}"
        cls.__init__ = __init__

    @classmethod
    def _get_param_names(cls) -> list[str]:
        return list(cls._parameters.model_fields)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The estimator's parameters, by name (scikit-learn's contract)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> "Estimator":
        """Set parameters by name; an unknown name is refused before anything changes."""
        names = self._get_param_names()
        for name in params:
            if name not in names:
                raise UnknownKeyError(key=f"{type(self).__name__}.{name}", value=params[name], allowed=names)
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def _validated_params(self) -> Parameters:
        """The parameters checked against the declaration (one clear error naming the key)."""
        return validate(self._parameters, self.get_params(), prefix=f"{type(self).__name__}.")

    def __repr__(self) -> str:
        default = defaults(self._parameters)
        changed = []
        for name in self._get_param_names():
            value = getattr(self, name)
            try:
                same = value == default.get(name, object())
                same = bool(same) if not hasattr(same, "all") else bool(same.all())
            except (TypeError, ValueError):
                same = False
            if not same:
                changed.append(f"{name}={value!r}" if len(repr(value)) < 60 else f"{name}=...")
        return f"{type(self).__name__}({', '.join(changed)})"


# ----------------------------------------------------------------------------- command lines


def _flag(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("flag") or "--" + name.replace("_", "-")


def _cli_kind(field: FieldInfo):
    tp, meta = _split_annotated(_field_type(field))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = _split_annotated(args[0])[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "list", _split_annotated(typing.get_args(tp)[0])[0]
    return "scalar", tp


def add_arguments(parser: argparse.ArgumentParser, model: type[Parameters], *, skip: Collection[str] = (),
                  positional: Collection[str] = ()) -> None:
    """One option per declared field: ``--name`` (or the field's ``flag``), its help, its
    default and choices in the help text. Values stay strings here: :func:`parse_arguments`
    converts them by the declared type, so a bad value reaches featstore's own checks."""
    for name, f in model.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if name in skip or extra.get("cli") is False:  # a Python-only parameter (a module, a dict)
            continue
        kind, tp = _cli_kind(f)
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        text = (f.description or "").rstrip(".")
        if tp is bool and kind == "scalar":
            if default:  # the flag turns it off: its own words (``off``), else "Turn off: ..."
                extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
                off = extra.get("off") or f"Turn off: {text[:1].lower()}{text[1:]}"
                parser.add_argument("--no-" + _flag(name, f)[2:], dest=name, action="store_false",
                                    default=argparse.SUPPRESS, help=off.replace("%", "%%"))
            else:
                parser.add_argument(_flag(name, f), dest=name, action="store_true", default=argparse.SUPPRESS,
                                    help=text)
            continue
        allowed = describe(_field_type(f)).replace(_OMIT, "")  # an option not given is None
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help_text = f"{text}; {allowed}" + (f" (default: {shown})" if default is not None else "")
        help_text = help_text.replace("%", "%%")
        if name in positional:
            parser.add_argument(name, help=help_text, **({} if f.is_required() else {"nargs": "?",
                                                                                      "default": argparse.SUPPRESS}))
        else:
            parser.add_argument(_flag(name, f), dest=name, default=argparse.SUPPRESS, metavar=name.upper(),
                                help=help_text)


def parse_arguments(model: type[Parameters], namespace: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave, converted from text by their declared types (no
    validation of ranges yet: :func:`validate` does that, naming the flag)."""
    out = {}
    for name, f in model.model_fields.items():
        if not hasattr(namespace, name):
            continue
        value = getattr(namespace, name)
        kind, tp = _cli_kind(f)
        if isinstance(value, str):
            if kind == "list":
                value = [_from_text(v.strip(), tp, _flag(name, f), f) for v in value.split(",") if v.strip()]
            else:
                value = _from_text(value, tp, _flag(name, f), f)
        out[name] = value
    return out


def _from_text(text: str, tp, flag: str, field: FieldInfo):
    """A command-line value as the declared number type (the only text a number may come from)."""
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise InvalidParameterError(key=flag, value=text,
                                        expected=describe(_field_type(field)).replace(_OMIT, "")) from None
    return text


def cli_key(flags: Mapping[str, str]) -> Callable[[str], str]:
    """``key_format`` for :func:`validate` that shows a field by its command-line flag."""
    return lambda name: flags.get(name, "--" + name.replace("_", "-"))


def flags(model: type[Parameters]) -> dict[str, str]:
    """Each field's command-line flag."""
    return {name: _flag(name, f) for name, f in model.model_fields.items()}
