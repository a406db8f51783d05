"""Client of a VM's control socket (used by pyhyvectl and the tests)."""

from __future__ import annotations

import socket

from . import socket_path
from .protocol import ProtocolError, recv, send


class ClientError(RuntimeError):
    pass


class ControlClient:
    def __init__(self, name: str, timeout: float | None = 30.0) -> None:
        self.path = socket_path(name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise ClientError(f"no running VM named '{name}' (no socket at {self.path})") from None
        except PermissionError:
            self.sock.close()
            raise ClientError(f"permission denied on {self.path}") from None
        self.buf = bytearray()

    def call(self, cmd: str, **args: object) -> dict:
        try:
            send(self.sock, {"cmd": cmd, **args})
            reply = recv(self.sock, self.buf)
        except TimeoutError:
            raise ClientError(f"VM did not answer '{cmd}' in time") from None
        except (OSError, ProtocolError) as e:
            raise ClientError(f"control connection failed: {e}") from None
        if reply is None:
            raise ClientError(f"VM closed the control connection during '{cmd}'")
        if not reply.get("ok"):
            raise ClientError(str(reply.get("error", "unknown error")))
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
