"""Console backends for the UART: where guest output goes and guest input comes from."""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import socket
import sys
import termios
import threading
import tty
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import unixsock
from ..errors import BootFailed


class ConsoleError(BootFailed, ValueError):
    pass


_raw_tty = False  # a StdioConsole has the terminal in raw mode: our own lines need \r\n


def eol() -> str:
    """Line end for the VMM's own messages on the terminal the console may have in raw mode."""
    return "\r\n" if _raw_tty else "\n"


class Console:
    """Output sink plus an optional input source feeding `on_input`."""

    spec = "null"

    def __init__(self) -> None:
        self.on_input: Callable[[bytes], None] | None = None
        self.on_quit: Callable[[], None] | None = None  # the user asked to end the VM
        self.on_room: Callable[[], None] | None = None  # a reader caught up (see accepts)

    def write(self, data: bytes) -> None:
        pass

    def accepts(self, n: int) -> bool:
        """Whether `n` more bytes of output would reach the reader whole. Only a UNIX
        console's attached client can fall behind (then `on_room` is called once it took
        some): a device that can wait (virtio-console) holds its request until then; a
        UART cannot, and the console keeps the newest output instead."""
        return True

    def start_input(self, on_input: Callable[[bytes], None]) -> None:
        self.on_input = on_input

    def unsent(self) -> bytes:
        """Output accepted but not yet delivered anywhere (a socket with no client)."""
        return b""

    def requeue(self, data: bytes) -> None:
        """Take back what `unsent` returned before a save; plain consoles just write it."""
        if data:
            self.write(data)

    def close(self) -> None:
        pass


class MemoryConsole(Console):
    """Output kept in memory, for embedding pyhyve (tests, benchmarks, tools) and waiting
    on what the guest printed."""

    spec = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray()
        self.cond = threading.Condition()

    def write(self, data: bytes) -> None:
        with self.cond:
            self.buf += data
            self.cond.notify_all()

    @property
    def text(self) -> str:
        with self.cond:
            return self.buf.decode(errors="replace")

    def wait(self, ready: Callable[[bytearray], bool], timeout: float) -> bool:
        """Block until ready(output so far) holds; False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: ready(self.buf), timeout)


class StdioConsole(Console):
    """Output to stdout; input from stdin when stdin is a terminal or a pipe.

    On a terminal the console is raw, as bhyve's and QEMU's are: every key, Ctrl-C too,
    goes to the guest, and the guest's own CR LF line ends show as they are (no doubled
    CR). Ctrl-A is the escape: Ctrl-A x quits (the VM is destroyed), Ctrl-A Ctrl-A sends one
    Ctrl-A, Ctrl-A h prints this help. The terminal is restored when the VM ends.
    """

    spec = "stdio"
    ESCAPE = 0x01
    HELP = "pyhyve console: Ctrl-A x quit, Ctrl-A Ctrl-A send Ctrl-A, Ctrl-A h help"

    def __init__(self, read_stdin: bool = True) -> None:
        super().__init__()
        self.out_fd = sys.stdout.fileno()
        self.read_stdin = read_stdin
        self._tty: tuple[int, list[Any]] | None = None
        self._escaped = False
        self._wake_r, self._wake_w = os.pipe()  # close() ends the stdin reader through it

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(self.out_fd, data)

    def start_input(self, on_input: Callable[[bytes], None]) -> None:
        super().start_input(on_input)
        if not self.read_stdin:
            return
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError):
            return
        if os.isatty(fd):
            self._make_raw(fd)

        def pump() -> None:
            while True:
                try:
                    ready, _, _ = select.select([fd, self._wake_r], [], [])
                    if self._wake_r in ready:
                        return  # closed: the next console (a later VM) reads stdin now
                    data = os.read(fd, 4096)
                except (OSError, ValueError):
                    return
                if not data:
                    return
                data = self.filter(data) if self._tty else data
                if data:
                    on_input(data)

        threading.Thread(target=pump, name="console-stdin", daemon=True).start()

    def filter(self, data: bytes) -> bytes:
        """Take the escape sequences out of typed bytes (a sequence may span two reads)."""
        out = bytearray()
        for b in data:
            if self._escaped:
                self._escaped = False
                if b == self.ESCAPE:
                    out.append(b)
                elif b in b"xX":
                    if self.on_quit:
                        self.on_quit()
                elif b in b"hH?":
                    os.write(self.out_fd, f"\r\n{self.HELP}\r\n".encode())
            elif b == self.ESCAPE:
                self._escaped = True
            else:
                out.append(b)
        return bytes(out)

    def _make_raw(self, fd: int) -> None:
        global _raw_tty
        try:
            saved = termios.tcgetattr(fd)
            tty.setraw(fd, termios.TCSANOW)
        except termios.error:
            return
        self._tty = (fd, saved)
        _raw_tty = True
        atexit.register(self._restore)

    def _restore(self) -> None:
        global _raw_tty
        if self._tty is not None:
            fd, saved = self._tty
            self._tty = None
            _raw_tty = False
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    def close(self) -> None:
        self._restore()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
            os.close(self._wake_w)
            self._wake_w = -1


class FileConsole(Console):
    """Output appended to a file; no input."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.spec = f"file:{path}"
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConsoleError(f"cannot open console file {path}: {e.strerror}") from None

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class UnixConsole(Console):
    """A listening UNIX socket; one client at a time gets output and gives input.

    Output produced while no client is attached, or that a slow client has not taken yet,
    is kept (the last 64 KiB) and sent when it can be, so nothing the guest printed at boot
    is lost and a client that stops reading never blocks the guest: sends never wait
    (MSG_DONTWAIT). A device that can wait asks `accepts` first and so loses nothing to
    an attached client that is behind. A device may carry what is still unsent across a
    save (`unsent`, `requeue`).
    """

    BACKLOG = 64 * 1024

    def __init__(self, path: str) -> None:
        super().__init__()
        self.spec = f"unix:{path}"
        self.path = path
        try:
            self.sock, self.ident = unixsock.listen(path, 1, "console socket")
        except unixsock.SocketPathError as e:
            raise ConsoleError(str(e)) from None
        self.client: socket.socket | None = None
        self.pending: deque[bytes] = deque()
        self.pending_len = 0
        self.lock = threading.Lock()
        self.closed = False
        # the current client's pump's wake-up (each pump owns its pipe and closes it when
        # it ends): output left over makes it wait for the socket at once, not at its
        # next 1 s look
        self._wake_w = -1
        threading.Thread(target=self._accept, name="console-unix", daemon=True).start()

    def accepts(self, n: int) -> bool:
        with self.lock:
            self._flush()
            return self.client is None or not self.pending or \
                self.pending_len + n <= self.BACKLOG

    def _room(self) -> None:
        if self.on_room is not None:
            self.on_room()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with self.lock:  # the backlog goes out before any newer output
                if self.closed:  # closed while this one was accepted
                    c.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    return
                old, self.client, self._wake_w = self.client, c, wake_w
                self._flush()
            if old:
                old.close()
            self._room()
            threading.Thread(target=self._pump, args=(c, wake_r, wake_w), daemon=True).start()

    def _pump(self, c: socket.socket, wake_r: int, wake_w: int) -> None:
        """The client's input to the guest; and output the client could not take at once
        goes out as soon as it can (not only at the guest's next write). A client that
        closed its sending side may still read: it keeps getting output."""
        try:
            self._pump_loop(c, wake_r)
        finally:  # nobody writes to this pipe once it is no longer the current one
            with self.lock:
                if self._wake_w == wake_w:
                    self._wake_w = -1
            os.close(wake_r)
            os.close(wake_w)

    def _pump_loop(self, c: socket.socket, wake_r: int) -> None:
        reading = True
        cfd = c.fileno()
        while not self.closed:
            with self.lock:
                if self.client is not c:
                    return
                behind = bool(self.pending)
            poller = select.poll()  # not select(): a VMM may have fds past 1023
            poller.register(wake_r, select.POLLIN)
            events = (select.POLLIN if reading else 0) | (select.POLLOUT if behind else 0)
            if events:
                poller.register(cfd, events)
            try:
                ready = dict(poller.poll(1000))
            except OSError:
                return
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
            got = ready.get(cfd, 0)
            if got & select.POLLNVAL:  # closed under us: replaced, or the console closed
                return
            if got & (select.POLLOUT | select.POLLERR | select.POLLHUP) and behind:
                with self.lock:
                    moved = self.client is c and self._flush()
                if moved:
                    self._room()
            readable = got & (select.POLLIN | select.POLLERR | select.POLLHUP) and reading
            if not readable:
                continue
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            if not data:
                reading = False
            elif self.on_input:
                self.on_input(data)

    def write(self, data: bytes) -> None:
        with self.lock:
            self.pending.append(data)
            self.pending_len += len(data)
            self._flush()
            if self.pending and self.client is not None and self._wake_w >= 0:
                with contextlib.suppress(OSError):  # full: a wake-up is already there
                    os.write(self._wake_w, b"w")
            while self.pending_len > self.BACKLOG:  # keep the newest BACKLOG bytes
                extra = self.pending_len - self.BACKLOG
                if len(self.pending[0]) <= extra:
                    self.pending_len -= len(self.pending.popleft())
                else:
                    self.pending[0] = self.pending[0][extra:]
                    self.pending_len -= extra

    def _flush(self) -> bool:
        """Send what is pending, in order, as far as the client takes it now; whether
        anything moved (bytes went out, or a client that went away was dropped)."""
        moved = False
        while self.client is not None and self.pending:
            chunk = self.pending[0]
            try:
                n = self.client.send(chunk, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return moved
            except OSError:
                self.client = None
                return True
            moved = True
            self.pending_len -= n
            if n < len(chunk):
                self.pending[0] = chunk[n:]
                return moved
            self.pending.popleft()
        return moved

    def unsent(self) -> bytes:
        with self.lock:
            return b"".join(self.pending)

    def requeue(self, data: bytes) -> None:
        """Output a save carried over: it goes out before anything newer."""
        with self.lock:
            self.pending.appendleft(data[-self.BACKLOG:])
            self.pending_len += len(self.pending[0])
            self._flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        unixsock.release(self.path, self.ident)
        with self.lock:
            client, self.client = self.client, None
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):  # its pump leaves its poll and ends
                    os.write(self._wake_w, b"x")
        for sock in (self.sock, client):  # shutdown wakes the threads blocked on them
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def open_console(spec: str) -> Console:
    """stdio | file:PATH | unix:PATH | null (bhyve's `-l com1,stdio` names are accepted)."""
    if spec in ("stdio", "stdout"):
        return StdioConsole()
    if spec == "null":
        return Console()
    kind, _, arg = spec.partition(":")
    if kind == "file" and arg:
        return FileConsole(arg)
    if kind == "unix" and arg:
        return UnixConsole(arg)
    raise ConsoleError(f"bad console '{spec}': use stdio, file:PATH, unix:PATH or null")
