"""Client of a VM's control socket (used by pyhyvectl and the tests)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

from ..errors import ControlFailed
from ..unixsock import MAX_PATH
from . import socket_path
from .protocol import ProtocolError, recv, send


class ClientError(ControlFailed, RuntimeError):
    pass


class ControlClient:
    def __init__(self, name: str, timeout: float | None = 30.0) -> None:
        self.name = name
        self.path = socket_path(name)
        self.timeout = timeout
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise ClientError(f"control socket path {self.path} is longer than a UNIX socket "
                              f"address allows ({MAX_PATH} bytes): use a shorter name or "
                              "PYHYVE_RUNDIR")
        self.deadline = time.monotonic() + (timeout or 30.0)
        self._connect()

    def _connect(self) -> None:
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            try:
                self.sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                raise ClientError(f"no running VM named '{self.name}' (no socket at "
                                  f"{self.path})") from None
            except PermissionError:
                self.sock.close()
                raise ClientError(f"permission denied on {self.path}") from None
            except (BlockingIOError, InterruptedError):  # backlog full: the VMM is busy
                self.sock.close()
                self._wait_busy()
            except NotADirectoryError:
                self.sock.close()
                raise ClientError(f"run directory of {self.path} is not a directory "
                                  "(check PYHYVE_RUNDIR)") from None
            except OSError as e:
                self.sock.close()
                raise ClientError(f"cannot connect to {self.path}: {e.strerror or e}") from None
        self.buf = bytearray()

    def _wait_busy(self) -> None:
        if time.monotonic() > self.deadline:
            raise ClientError(f"VM '{self.name}' is too busy to accept a control connection")
        time.sleep(0.02)

    def call(self, cmd: str, **args: object) -> dict[str, Any]:
        while True:
            try:
                # a busy VMM answers and hangs up before reading: read its reply anyway
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    send(self.sock, {"cmd": cmd, **args})
                reply = recv(self.sock, self.buf)
            except TimeoutError:
                raise ClientError(f"VM did not answer '{cmd}' in time") from None
            except (OSError, ProtocolError) as e:
                raise ClientError(f"control connection failed: {e}") from None
            if reply is None:
                raise ClientError(f"VM closed the control connection during '{cmd}'")
            if reply.get("busy"):  # every slot taken: try again until our deadline
                self.sock.close()
                self._wait_busy()
                self._connect()
                continue
            if not reply.get("ok"):
                raise ClientError(str(reply.get("error", "unknown error")))
            return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
