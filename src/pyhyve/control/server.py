"""The VMM side of the control socket: accepts clients, dispatches commands to handlers."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from .. import unixsock
from ..errors import ControlFailed, PyhyveError
from . import socket_path
from .protocol import ProtocolError, recv, send

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(ControlFailed, RuntimeError):
    pass


MAX_CLIENTS = 64      # connections served at once; more are told so and closed
IDLE_TIMEOUT = 30.0   # seconds a client may sit without sending a request
RETRY_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED,
                errno.EINTR)


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
        self.clients = 0
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        """Accept until closed. Running out of descriptors or memory is waited out (the
        clients holding them time out), never a reason to stop serving control."""
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError as e:
                if self.closed or e.errno not in RETRY_ERRNOS:
                    return
                time.sleep(0.05)
                continue
            with self.cond:
                busy = self.clients >= MAX_CLIENTS
                if not busy:
                    self.clients += 1
            if busy:
                with contextlib.suppress(OSError):
                    conn.settimeout(0.5)
                    send(conn, {"ok": False, "busy": True,
                                "error": f"too many control connections (at most {MAX_CLIENTS} "
                                         "at once)"})
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread could be started: drop this client only
                conn.close()
                with self.cond:
                    self.clients -= 1

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_one(conn)
        finally:
            with self.cond:
                self.clients -= 1

    def _serve_one(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while True:
                try:  # a whole request within IDLE_TIMEOUT; no limit while handling it
                    msg = recv(conn, buf, time.monotonic() + IDLE_TIMEOUT)
                except ProtocolError as e:
                    with contextlib.suppress(OSError):
                        send(conn, {"ok": False, "error": str(e)})
                    return
                except OSError:
                    return
                if msg is None:
                    return
                conn.settimeout(None)
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

    def dispatch(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg.get("cmd")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        try:
            out = handler(msg)
        except PyhyveError as e:  # the user's or the host's: reported, the VMM keeps running
            return {"ok": False, "error": str(e) or type(e).__name__}
        except OSError as e:
            return {"ok": False, "error": e.strerror or str(e)}
        except Exception as e:  # a bug: the VMM keeps running, the traceback goes to stderr
            traceback.print_exc()
            return {"ok": False, "error": f"internal error (a bug in pyhyve): "
                                          f"{type(e).__name__}: {e}"}
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
