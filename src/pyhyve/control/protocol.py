"""Newline-delimited JSON over a UNIX stream socket, one request and one reply at a time.

Request: {"cmd": NAME, ...arguments}. Reply: {"ok": true, ...} or {"ok": false, "error": MSG}.
Lines are bounded so a confused or hostile client cannot make the VMM buffer without end.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from .. import untrusted
from ..errors import ControlFailed

MAX_LINE = 64 * 1024


class ProtocolError(ControlFailed, ValueError):
    pass


def send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def recv(sock: socket.socket, buf: bytearray, deadline: float | None = None) -> dict[str, Any] | None:
    """Next message from `sock` (None at EOF); `buf` carries bytes between calls. With a
    `deadline` (time.monotonic()), the whole message must arrive by then: a byte now and
    then does not keep a connection alive (TimeoutError)."""
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise ProtocolError("control message too long")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("control request not completed in time")
            sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    if len(line) > MAX_LINE:
        raise ProtocolError("control message too long")
    try:
        obj = untrusted.loads(line, max_depth=4)
    except untrusted.BadJson as e:
        raise ProtocolError(f"control message is {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control message is not an object")
    return obj
