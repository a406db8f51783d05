"""The VMM side of the control socket: accepts clients, dispatches commands to handlers."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
from collections.abc import Callable

from . import socket_path
from .protocol import ProtocolError, recv, send

Handler = Callable[[dict], dict]


class ControlError(RuntimeError):
    pass


def _claim(path: str) -> None:
    """Refuse when a live VMM owns `path`; remove a stale socket left by a dead one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise ControlError(f"cannot check {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"a VM with this name is already running (socket {path})")


class ControlServer:
    def __init__(self, name: str, handlers: dict[str, Handler]) -> None:
        self.path = socket_path(name)
        self.handlers = handlers
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ControlError(f"cannot create run directory {directory}: {e.strerror}") from None
        _claim(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            self.sock.bind(self.path)
        except OSError as e:
            raise ControlError(f"cannot bind control socket {self.path}: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock.listen(8)
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
