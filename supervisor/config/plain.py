"""Frozen config records to JSON-ready plain data and back, driven by their type hints.

What a new master needs to adopt a running one is written this way (see docs/design.md, "The
master itself"): dataclasses become dicts, enums their values, tuples lists.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_plain(item) for item in value]
    return value


def from_plain(kind: type[T], data: Any) -> T:
    return typing.cast(T, _read(kind, data))


def _read(kind: Any, data: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        return _read(next(arg for arg in typing.get_args(kind) if arg is not type(None)), data)
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_read(args[0], item) for item in data)
        return tuple(_read(arg, item) for arg, item in zip(args, data, strict=True))
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        # A field this code has and the data lacks takes its default; one the data has and this code
        # does not is dropped: records written by an older or newer version still read.
        return kind(**{f.name: _read(hints[f.name], data[f.name]) for f in dataclasses.fields(kind) if f.name in data})
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(data)
    return data
