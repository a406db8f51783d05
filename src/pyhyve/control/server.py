"""The VMM side of the control socket: accepts clients, dispatches commands to handlers."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable

from .. import unixsock
from . import socket_path
from .protocol import ProtocolError, recv, send

Handler = Callable[[dict], dict]


class ControlError(RuntimeError):
    pass


class ControlServer:
    def __init__(self, name: str, handlers: dict[str, Handler]) -> None:
        self.path = socket_path(name)
        self.handlers = handlers
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ControlError(f"cannot create run directory {directory}: {e.strerror}") from None
        try:
            self.sock, self.ident = unixsock.listen(
                self.path, 128, "control socket",
                "is the control socket of a running VM: a VM with this name is already running")
        except unixsock.SocketPathError as e:
            raise ControlError(str(e)) from None
        self.closed = False
        self.inflight = 0
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while True:
                try:
                    msg = recv(conn, buf)
                except ProtocolError as e:
                    with contextlib.suppress(OSError):
                        send(conn, {"ok": False, "error": str(e)})
                    return
                except OSError:
                    return
                if msg is None:
                    return
                with self.cond:
                    self.inflight += 1
                try:
                    reply = self.dispatch(msg)
                    try:
                        send(conn, reply)
                    except OSError:
                        return
                finally:
                    with self.cond:
                        self.inflight -= 1
                        self.cond.notify_all()

    def dispatch(self, msg: dict) -> dict:
        cmd = msg.get("cmd")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        try:
            out = handler(msg)
        except Exception as e:  # a handler's failure is reported, the VMM keeps running
            return {"ok": False, "error": str(e) or type(e).__name__}
        return {"ok": True, **out}

    def close(self, drain: float = 10.0) -> None:
        """Stop accepting; let requests in flight (a suspend, a migration) send their reply."""
        self.closed = True
        with self.cond:
            self.cond.wait_for(lambda: self.inflight == 0, drain)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        unixsock.release(self.path, self.ident)
