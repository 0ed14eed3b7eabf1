"""Dataclasses from recorded JSON, every field checked against its declared type.

A recorded document (doctor facts, a queue snapshot) is user input: `"12"` where a number
belongs, or a list where a name belongs, must be a located error (`nvml.gpus[0].index:
expected an integer, got '12'`), not a `TypeError` three calls later. Unknown keys are
ignored (a newer recorder may add some); a missing key takes the field's default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")


class TypedLoadError(ValueError):
    """Where in the document a value has the wrong type."""


def shown(value: Any) -> str:
    """A value as an error line quotes it: its repr, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(tp: Any, value: Any, where: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(option, value, where)
            except TypedLoadError as exc:
                errors.append(str(exc))
        raise TypedLoadError(
            errors[0] if len(errors) == 1 else f"{where}: unexpected {shown(value)}"
        )
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise TypedLoadError(f"{where}: expected a list, got {shown(value)}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        out = [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise TypedLoadError(f"{where}: expected an object, got {shown(value)}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _check(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return load(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypedLoadError(f"{where}: expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypedLoadError(f"{where}: expected an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypedLoadError(f"{where}: expected a number, got {shown(value)}")
        if not math.isfinite(value):
            raise TypedLoadError(f"{where}: expected a finite number, got {shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypedLoadError(f"{where}: expected a string, got {shown(value)}")
        return value
    raise TypeError(f"typedload cannot check {tp!r} ({where})")  # a deskgpu bug, not input


def load(cls: type[T], data: Any, where: str) -> T:
    """`cls(**data)` with every field's type checked; `where` names the document's path."""
    if not isinstance(data, dict):
        raise TypedLoadError(f"{where}: expected an object, got {shown(data)}")
    hints = _hints(typing.cast(Any, cls))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypedLoadError(f"{where}: `{f.name}` is missing")
            continue
        kwargs[f.name] = _check(
            hints[f.name], data[f.name], f"{where}.{f.name}" if where else f.name
        )
    return cls(**kwargs)
