"""One place that names JSON fields: frozen dataclasses with snake_case fields <-> camelCase objects.

    @dataclass(frozen=True)
    class Entry:
        image_digest: str                                  # "imageDigest"
        other: tuple[Entry, ...] = field(default=(), metadata=OMIT_EMPTY)   # left out when empty
        ty: str | None = field(default=None, metadata=rename("type"))

    to_dict(entry)           -> {"imageDigest": ..., "type": ...}
    from_dict(Entry, obj)    -> Entry(...); unknown keys and wrong types raise ValueError

Supported field types: str, int, bool, float, None unions (`X | None`), tuples/lists of one type,
dict[str, X], Literal and nested dataclasses. (mkosi's `Config` dict factory and bootc's serde
`rename_all = "camelCase"` + `skip_serializing_if` are the models.)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

OMIT_EMPTY: Mapping[str, Any] = types.MappingProxyType({"omit_empty": True})

T = TypeVar("T")


def rename(name: str, omit_empty: bool = False) -> Mapping[str, Any]:
    """Field metadata: serialise under `name` instead of the camelCase form."""
    return types.MappingProxyType({"json": name, "omit_empty": omit_empty})


def camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(p[:1].upper() + p[1:] for p in rest)


def json_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("json") or camel(f.name))


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, tuple | list | dict) and not value)


def to_dict(obj: Any) -> Any:
    """The JSON value of `obj` (dataclasses become dicts with camelCase keys, tuples lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("omit_empty") and _empty(value):
                continue
            out[json_name(f)] = to_dict(value)
        return out
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any, where: str = "$") -> T:
    """Build `cls` from a JSON value, checking every type; ValueError names the JSON path at fault."""
    value: T = _convert(cls, data, where)
    return value


def _convert(tp: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, data, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: no type of {tp} fits")
    if origin is typing.Literal:
        if data not in typing.get_args(tp):
            raise ValueError(f"{where}: {data!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return data
    if origin in (tuple, list):
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list, got {type(data).__name__}")
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis][:1] or [Any]
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {json_name(f): f for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}")
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[f.name] = _convert(hints[f.name], data[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing field {name!r}")
        return tp(**kwargs)
    if tp is float and isinstance(data, int | float) and not isinstance(data, bool):
        return float(data)
    if tp in (str, int, bool):
        if type(data) is not tp:
            raise ValueError(f"{where}: expected {tp.__name__}, got {type(data).__name__}")
        return data
    if tp is type(None):
        if data is not None:
            raise ValueError(f"{where}: expected null")
        return None
    raise TypeError(f"jsonmodel: unsupported field type {tp!r}")
