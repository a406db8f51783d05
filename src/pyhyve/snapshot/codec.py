"""Encoding of state values (frozen dataclasses) to bytes and back, with strict checks.

One encoding serves snapshot files and migration streams: JSON with bytes as base64,
tagged with the state's kind and version. Decoding trusts nothing: every field must be
present, of its declared type, and nothing else may be there.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import typing
from typing import Any, TypeVar

T = TypeVar("T")
MAX_STATE_BYTES = 16 << 20


class StateError(ValueError):
    pass


def _enc(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return [_enc(v) for v in value]
    return value


def encode(state: Any) -> bytes:
    cls = type(state)
    doc = {"kind": cls.__name__, "version": cls.VERSION,
           "fields": {f.name: _enc(getattr(state, f.name)) for f in dataclasses.fields(state)}}
    return json.dumps(doc, separators=(",", ":")).encode()


def _dec(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bytes:
        if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
            raise StateError(f"{where}: expected bytes")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise StateError(f"{where}: bad base64") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise StateError(f"{where}: expected a boolean")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**64:
            raise StateError(f"{where}: expected a 64-bit integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise StateError(f"{where}: expected a string")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise StateError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_dec(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise StateError(f"{where}: expected {len(args)} items")
        return tuple(_dec(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    raise StateError(f"{where}: unsupported type {tp}")


def decode(cls: type[T], raw: bytes | memoryview) -> T:
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{cls.__name__}: state too large ({len(raw)} bytes)")
    try:
        doc = json.loads(bytes(raw))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StateError(f"{cls.__name__}: state is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"kind", "version", "fields"}:
        raise StateError(f"{cls.__name__}: malformed state record")
    if doc["kind"] != cls.__name__:
        raise StateError(f"expected {cls.__name__} state, found {doc['kind']!r}")
    version = doc["version"]
    if not isinstance(version, int) or version < 1:
        raise StateError(f"{cls.__name__}: bad state version")
    if version > cls.VERSION:  # type: ignore[attr-defined]
        raise StateError(f"{cls.__name__} state version {version} is newer than this "
                         f"pyhyve understands ({cls.VERSION})")  # type: ignore[attr-defined]
    fields = doc["fields"]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if not isinstance(fields, dict) or set(fields) != set(names):
        raise StateError(f"{cls.__name__}: fields do not match (got {sorted(fields)})"
                         if isinstance(fields, dict) else f"{cls.__name__}: malformed fields")
    values = {n: _dec(fields[n], hints[n], f"{cls.__name__}.{n}") for n in names}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise StateError(f"{cls.__name__}: {e}") from None
