"""Check a composed config against type annotations, before anything runs.

A schema is a dataclass (fields with annotations and `help` metadata) or, for a mapping with a
`_target_`, the target's own signature: its parameters and their annotations. Annotations may be
`int`, `float`, `bool`, `str`, `Literal[...]`, unions, `list[...]`, `dict[K, V]`, nested dataclasses,
and `Annotated[T, Range(...)]` / `Annotated[T, Pattern(...)]` for values a type cannot express.
Every failure is a DeliftInputError naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from delift.errors import DeliftInputError


@dataclass(frozen=True)
class Range:
    """A numeric interval; `low_open` / `high_open` exclude the bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


@dataclass(frozen=True)
class Pattern:
    """A string matching `regex` in full; `allowed` says it in words."""

    regex: str
    allowed: str

    def holds(self, value) -> bool:
        return re.fullmatch(self.regex, value) is not None

    def describe(self) -> str:
        return self.allowed


class Target:
    """Annotation for a node instantiated from `_target_`: checked against that callable's signature."""


def _fail(path: str, value, allowed: str):
    raise DeliftInputError(f"{value!r} is not allowed; expected {allowed}", field=path)


def _origin_args(annotation):
    return typing.get_origin(annotation), typing.get_args(annotation)


def describe(annotation) -> str:
    """What an annotation allows, in words (for errors and the configuration reference)."""
    origin, args = _origin_args(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any value"
    if origin is Annotated:
        patterns = [a for a in args[1:] if isinstance(a, Pattern)]
        if patterns:  # the pattern says it all (it is a string)
            return patterns[0].describe()
        return f"{describe(args[0])} {', '.join(a.describe() for a in args[1:] if hasattr(a, 'describe'))}".strip()
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        members = [describe(a) for a in args if a is not type(None)]
        return " or ".join(members) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, Sequence):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if annotation is Target:
        return "a mapping with a _target_"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    if annotation is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             Mapping: "a mapping", list: "a list", tuple: "a list"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check(path: str, value, annotation) -> None:
    """Raise a DeliftInputError unless `value` fits `annotation`; recurses into mappings and lists."""
    origin, args = _origin_args(annotation)
    if isinstance(value, Mapping) and "_target_" in value:  # whatever the parameter's type, Hydra builds it
        return check_target(path, value)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return
    if origin is Annotated:
        check(path, value, args[0])
        for constraint in args[1:]:
            if hasattr(constraint, "holds") and value is not None and not constraint.holds(value):
                _fail(path, value, describe(annotation))
        return
    if origin is Literal:
        if value not in args:
            _fail(path, value, describe(annotation))
        return
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return check(path, value, member)
            except DeliftInputError as err:
                errors.append(err)
        # One member of the union takes this kind of value: its message is the precise one.
        fitting = [e for e in errors if e.field != path]
        if len(fitting) == 1:
            raise fitting[0]
        _fail(path, value, describe(annotation))
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(path, value, describe(annotation))
        for i, item in enumerate(value):
            check(f"{path}[{i}]", item, args[0] if args else Any)
        return
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        if not isinstance(value, Mapping):
            _fail(path, value, describe(annotation))
        for key, item in value.items():
            if args:
                check(f"{path}.{key}", key, args[0])
                check(f"{path}.{key}", item, args[1])
        return
    if annotation is Target:
        if value != {}:  # an empty group option (judge=none) builds nothing
            _fail(path, value, "a mapping with a _target_")
        return
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            _fail(path, value, "a mapping")
        check_fields(path, value, annotation)
        return
    if annotation is type(None):
        if value is not None:
            _fail(path, value, "null")
        return
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(path, value, "true or false")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "an integer")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "a number")
    elif annotation is str:
        if not isinstance(value, str):
            _fail(path, value, "a string")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def closest(word: str, options) -> str | None:
    """The option of `options` nearest to a misspelt `word` (difflib), or None when none is near."""
    matches = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(path: str, key: str, options) -> str:
    match = closest(key, options)
    return f"; did you mean `{_join(path, match)}`?" if match else ""


def field_key(f: dataclasses.Field) -> str:
    """The config key of a dataclass field (`key` metadata for keys that are Python keywords)."""
    return f.metadata.get("key", f.name)


def check_fields(path: str, node: Mapping, schema) -> None:
    """A mapping against a dataclass schema: every key known, every value of its field's type."""
    hints = typing.get_type_hints(schema, include_extras=True)
    fields = {field_key(f): f for f in dataclasses.fields(schema)}
    # Plain values before groups: a bad `seed` is reported as seed, not as a group interpolating it.
    for key, value in sorted(node.items(), key=lambda item: isinstance(item[1], Mapping)):
        if key not in fields:
            raise DeliftInputError(f"unknown key; the keys here are {', '.join(sorted(fields))}"
                                   f"{_did_you_mean(path, key, fields)}", field=_join(path, key))
        check(_join(path, key), value, hints[fields[key].name])


def target_parameters(target: str) -> tuple[dict[str, inspect.Parameter], dict, bool]:
    """A `_target_`'s parameters, their resolved annotations, and whether it takes **kwargs."""
    from hydra.utils import get_object

    obj = get_object(target)
    function = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # noqa: BLE001 - annotations naming what this interpreter cannot resolve: check keys only
        hints = {}
    parameters = dict(inspect.signature(obj).parameters)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {k: p for k, p in parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return named, hints, open_ended


def check_target(path: str, node: Mapping) -> None:
    """A `_target_` mapping against its callable: known keys; types where delift owns the callable
    (third-party signatures describe their own conventions, e.g. Lightning's `precision`)."""
    target = node["_target_"]
    try:
        parameters, hints, open_ended = target_parameters(target)
    except (ImportError, AttributeError, ValueError) as err:
        raise DeliftInputError(f"{target!r} cannot be imported ({err})", field=_join(path, "_target_")) from err
    own = target.startswith("delift.")
    for key, value in node.items():
        if key.startswith("_"):  # Hydra's own keys: _target_, _convert_, _partial_, _recursive_
            continue
        if key not in parameters:
            if open_ended:
                continue
            raise DeliftInputError(f"unknown key for {target}; its keys are {', '.join(sorted(parameters))}"
                                   f"{_did_you_mean(path, key, parameters)}", field=_join(path, key))
        check(_join(path, key), value, hints.get(key, Any) if own else Any)
