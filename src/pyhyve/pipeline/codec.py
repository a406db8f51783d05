"""Encoding of state values (frozen dataclasses) to bytes and back, with strict checks.

One encoding serves snapshot files and migration streams: JSON with bytes as base64,
tagged with the state type's stable NAME (a constant, never the Python class name) and its
VERSION. Decoding trusts nothing: every field must be of its declared type and nothing
else may be there. An older record is brought up to date: first the type's UPGRADES
functions (old version -> next), then defaults for fields it does not have yet. A newer
record is refused with a message naming the section, its version and ours.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import typing
from typing import Any, TypeVar

from .. import untrusted
from ..errors import RecordError

T = TypeVar("T")
MAX_STATE_BYTES = 16 << 20


class StateError(RecordError):
    pass


def _enc(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return [_enc(v) for v in value]
    return value


def encode(state: Any) -> bytes:
    cls = type(state)
    doc = {"kind": cls.NAME, "version": cls.VERSION,
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


def decode(cls: type[T], raw: bytes | memoryview, section: str = "") -> T:
    name = cls.NAME  # type: ignore[attr-defined]
    ours = cls.VERSION  # type: ignore[attr-defined]
    where = f"state section '{section}'" if section else f"{name} state"
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{where}: too large ({len(raw)} bytes)")
    try:
        doc = untrusted.loads(raw, max_depth=8)
    except untrusted.BadJson as e:
        raise StateError(f"{where}: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"kind", "version", "fields"}:
        raise StateError(f"{where}: malformed state record")
    if doc["kind"] != name:
        raise StateError(f"{where}: expected a {name} record, found {doc['kind']!r}")
    version = doc["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StateError(f"{where}: bad state version")
    if version > ours:
        raise StateError(f"{where} is {name} version {version}; this pyhyve reads {name} "
                         f"up to version {ours} (a newer pyhyve wrote it)")
    fields = doc["fields"]
    if not isinstance(fields, dict):
        raise StateError(f"{where}: malformed fields")
    for v in range(version, ours):  # bring an older record up to date, step by step
        up = getattr(cls, "UPGRADES", {}).get(v)
        if up is not None:
            try:
                fields = up(dict(fields))
            except Exception as e:  # the record is untrusted: any failure is a refusal
                raise StateError(f"{where}: cannot upgrade {name} from version {v}: "
                                 f"{type(e).__name__}: {e}") from None
            if not isinstance(fields, dict):
                raise StateError(f"{where}: upgrading {name} from version {v} gave no fields")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def since(n: str) -> int:  # the version that added field n (metadata "since", else 1)
        return int(known[n].metadata.get("since", 1))
    # a record of version v has exactly the fields added up to v (after its upgrades,
    # those of the versions it was brought to); only fields added later get defaults
    have = max(version, max((v + 1 for v in getattr(cls, "UPGRADES", {}) if v >= version),
                            default=version))
    extra = sorted(n for n in fields if n not in known or since(n) > have)
    missing = sorted(n for n in known if n not in fields and since(n) <= have)
    if extra or missing:
        raise StateError(f"{where}: fields do not match {name} version {version} "
                         f"(unexpected {extra}, missing {missing})")
    values = {n: _dec(fields[n], hints[n], f"{where}: {name}.{n}") for n in known if n in fields}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise StateError(f"{where}: {e}") from None
