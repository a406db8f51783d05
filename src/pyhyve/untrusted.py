"""Reading what we do not control: host files named by a user (kernels, keys, snapshot
metadata) and JSON from untrusted bytes (snapshot metadata, control requests, migration
frames), each with a size or nesting bound and one error type.

The standard parser raises RecursionError on deep nesting and a plain ValueError on an
integer of more than 4300 digits; callers that catch only JSONDecodeError let both escape
as tracebacks. Here both, and anything nested deeper than `max_depth`, are BadJson.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from typing import Any

from .errors import PyhyveError


class BadJson(PyhyveError, ValueError):
    pass


class BadFile(PyhyveError, ValueError):
    """A host file that cannot be used; the message names it and says why."""


def read_file(path: str, limit: int, what: str = "file") -> bytes:
    """The whole of a regular file of at most `limit` bytes. A FIFO, device or directory
    is refused before any read (a FIFO would block, /dev/zero would never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BadFile(f"{what} {path} does not exist") from None
    except OSError as e:
        raise BadFile(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadFile(f"{what} {path} is not a regular file")
        if st.st_size > limit:
            raise BadFile(f"{what} {path} is {st.st_size} bytes, more than the {limit} "
                          "this can be")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise BadFile(f"{what} {path} is more than {limit} bytes")
        return data
    except OSError as e:
        raise BadFile(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _depth(obj: Any, limit: int) -> bool:
    """True when `obj` nests no deeper than `limit` (iterative: no recursion to exhaust)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = o.values()
        elif not isinstance(o, list):
            continue
        if d > limit:
            return False
        stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))
    return True


def loads(raw: bytes | bytearray | memoryview | str, max_depth: int = 16) -> Any:
    try:
        obj = json.loads(bytes(raw) if not isinstance(raw, str) else raw)
    except RecursionError:
        raise BadJson("nested too deeply") from None
    except UnicodeDecodeError:
        raise BadJson("not UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadJson(f"not valid JSON ({e.msg})") from None
    except ValueError as e:  # e.g. an integer over the 4300-digit limit
        raise BadJson(f"not acceptable JSON ({e})") from None
    if not _depth(obj, max_depth):
        raise BadJson(f"nested deeper than {max_depth} levels")
    return obj


class Fields:
    """Typed reads of fields from a parsed, untrusted JSON object: each returns the value
    with its type checked (so callers use it as such) or raises `error(what is wrong)`."""

    def __init__(self, error: Callable[[str], Exception]) -> None:
        self.error = error

    def need(self, cond: bool, what: str) -> None:
        if not cond:
            raise self.error(what)

    def obj(self, d: dict[str, Any], key: str) -> dict[str, Any]:
        v = d.get(key)
        if not isinstance(v, dict):
            raise self.error(f"'{key}' is missing")
        return v

    def array(self, d: dict[str, Any], key: str, max_len: int) -> list[Any]:
        v = d.get(key)
        if not isinstance(v, list) or len(v) > max_len:
            raise self.error(f"'{key}' is missing or too long")
        return v

    def integer(self, d: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 63) -> int:
        v = d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.error(f"'{key}' is missing or out of range")
        return v

    def text(self, d: dict[str, Any], key: str) -> str:
        v = d.get(key)
        if not isinstance(v, str):
            raise self.error(f"'{key}' is missing or not a string")
        return v

    def opt_text(self, d: dict[str, Any], key: str) -> str | None:
        v = d.get(key)
        if v is not None and not isinstance(v, str):
            raise self.error(f"'{key}' is not a string")
        return v
