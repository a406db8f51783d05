"""Listening UNIX sockets at host paths, claimed without ever removing what is not ours.

A path may be reused only when nothing is there or it is a stale socket (nobody accepts
on it). A live socket, a regular file, a directory or a link is refused: a console or
control socket path given by mistake (or by a hostile snapshot, before that was closed)
must never delete a user's file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from .errors import PyhyveError

# sun_path is 108 bytes including the terminating NUL
MAX_PATH = 107


class SocketPathError(PyhyveError, ValueError):
    """The path cannot be used for a listening socket; the message says why."""


def claim(path: str, what: str = "socket", in_use: str = "is in use by a running process") -> None:
    """Make `path` free for bind(): refuse when anything but a stale socket is there."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise SocketPathError(f"{what} path {path} is longer than the {MAX_PATH} bytes a UNIX "
                              "socket address allows")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise SocketPathError(f"cannot use {what} path {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        if e.errno == errno.EAGAIN or isinstance(e, TimeoutError):
            raise SocketPathError(f"{path} is in use (its owner is busy)") from None
        raise SocketPathError(f"cannot check {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise SocketPathError(f"{path} {in_use}")


def listen(path: str, backlog: int, what: str = "socket",
           in_use: str = "is in use by a running process") -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path`, mode 0600 from birth (no window for other users),
    and the identity of the socket file, for `release`."""
    claim(path, what, in_use)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise SocketPathError(f"cannot listen on {what} {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    sock.listen(backlog)
    st = os.lstat(path)
    return sock, (st.st_dev, st.st_ino)


def release(path: str, ident: tuple[int, int]) -> None:
    """Remove `path` only while it is still the socket file we bound, never whatever
    replaced it since."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident and stat.S_ISSOCK(st.st_mode):
            os.unlink(path)
