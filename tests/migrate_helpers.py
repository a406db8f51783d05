"""In-process migration harness shared by the migration tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

from pyhyve.migration.dest import ReceiveOptions, Receiver
from pyhyve.migration.protocol import HEADER, MAC_LEN, T
from pyhyve.migration.source import Migration, Options, Stats

from conftest import BIN, HUGEPAGES, HUGETLB, CaptureConsole, cli, spawn, wait_socket

KEY = b"k" * 32
OTHER_KEY = b"x" * 32


class Destination:
    """A Receiver on an ephemeral loopback port, receiving in a thread."""

    def __init__(self, key: bytes | None = KEY, name: str = "dst", **opts: object) -> None:
        self.console = CaptureConsole()
        opts.setdefault("hugepages", HUGEPAGES)
        self.receiver = Receiver(name, "127.0.0.1", 0, key,
                                 ReceiveOptions(console="null", io_timeout=10, **opts),
                                 console=self.console)
        self.port = self.receiver.port
        self.vm = None
        self.finished = False
        self.error: BaseException | str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.vm = self.receiver.receive()
            backing = self.vm.status()["memory_backing"]
            if self.receiver.opts.hugepages and backing != HUGETLB:  # no silent fallback
                vm, self.vm = self.vm, None
                vm.close()
                raise AssertionError(f"the destination got {backing}, not huge pages")
        except BaseException as e:
            self.error = e
        finally:
            with self.receiver.listener.cond:
                self.finished = True
                self.receiver.listener.cond.notify_all()

    def join(self, timeout: float = 30) -> None:
        """Until the guest runs here, or the first attempt failed (the receiver would wait
        for another: it is stopped, and `error` says why the attempt failed)."""
        rx = self.receiver
        with rx.listener.cond:
            rx.listener.cond.wait_for(lambda: self.finished or rx.failures, timeout)
        if self.thread.is_alive():
            rx.close()
            self.thread.join(10)
        assert not self.thread.is_alive(), "destination did not finish"
        if rx.failures and self.vm is None:
            self.error = rx.failures[0]


def migrate(vm, dest: Destination, key: bytes | None = KEY, port: int | None = None,
            **opts: object) -> Stats:
    opts.setdefault("io_timeout", 10.0)
    m = Migration(vm, "127.0.0.1", port or dest.port, key, Options(**opts))
    stats = m.run()
    dest.join()
    return stats


class CuttingProxy:
    """Forwards one TCP connection to `port`, cutting both directions after `limit` bytes
    have gone from the source to the destination."""

    def __init__(self, port: int, limit: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target, self.limit = port, limit
        self.forwarded = 0
        self.head = bytearray()  # the first MiB from the source, for saw()
        threading.Thread(target=self._run, daemon=True).start()

    def saw(self, needle: bytes) -> bool:
        return needle in self.head

    def _run(self) -> None:
        a, _ = self.server.accept()
        b = socket.create_connection(("127.0.0.1", self.target))

        def back() -> None:
            try:
                while data := b.recv(65536):
                    a.sendall(data)
            except OSError:
                pass

        threading.Thread(target=back, daemon=True).start()
        try:
            while data := a.recv(65536):
                room = self.limit - self.forwarded
                if len(self.head) < 1 << 20:
                    self.head += data
                b.sendall(data[:room])
                self.forwarded += min(len(data), room)
                if self.forwarded >= self.limit:
                    break
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.server.close()


@contextlib.contextmanager
def slow_cli_migration(kit: dict[str, str], rundir: str, name: str, dest: Destination,
                       ws: str = "32M", memory: str = "128M",
                       bandwidth: str = "2M") -> Iterator[subprocess.Popen]:
    """A `pyhyve run` A-B guest and a `pyhyvectl --migrate-live` of it to `dest`, capped so
    it is still running when this yields (its state is "active"); the VM is destroyed after."""
    src = spawn("pyhyve", "run", name, "-m", memory, "-k", kit["ab"], "--cmdline", f"ws={ws}",
                "--console", "null", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, name)
        mig = subprocess.Popen([os.path.join(BIN, "pyhyvectl"), "--vm", name, "--migrate-live",
                                f"127.0.0.1:{dest.port}", "--bandwidth", bandwidth,
                                "--compress", "none", "--no-auto-converge"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while "active" not in cli("pyhyvectl", "--vm", name, "--migrate-status").stdout:
            assert time.monotonic() < deadline, "the migration never became active"
            time.sleep(0.05)
        yield mig
    finally:
        cli("pyhyvectl", "--vm", name, "--destroy")
        src.wait(20)
        dest.receiver.close()


class FrameProxy:
    """Forwards one authenticated (key, no TLS) migration connection frame by frame and
    acts on the frame `rule(direction, type, n)` names ("S": source to destination, "D":
    back; n counts frames of that type and direction from 0): "cut" closes both ways
    before it, "drop" swallows it and then closes, "flip" flips one payload byte and
    forwards it. `acted` says whether the rule ever fired."""

    def __init__(self, port: int, rule: Callable[[str, int, int], str | None]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target, self.rule = port, rule
        self.acted: str | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        a, _ = self.server.accept()
        b = socket.create_connection(("127.0.0.1", self.target))
        self.socks = (a, b)
        # frames carry a MAC once their sender has authenticated: after AUTH from the
        # source, after AUTH_OK from the destination
        threading.Thread(target=self._pump, args=(b, a, "D", T.AUTH_OK), daemon=True).start()
        self._pump(a, b, "S", T.AUTH)
        self.server.close()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, last_plain: T) -> None:
        counts: dict[int, int] = {}
        mac = 0
        try:
            while True:
                header = _read_exact(src, HEADER.size)
                _, ftype, _, length = HEADER.unpack(header)
                body = bytearray(_read_exact(src, length + mac))
                n = counts.get(ftype, 0)
                counts[ftype] = n + 1
                action = self.rule(direction, ftype, n)
                if action:
                    self.acted = action
                if action in ("cut", "drop"):
                    break
                if action == "flip":
                    body[length // 2] ^= 0x01
                dst.sendall(header + body)
                if ftype == last_plain:
                    mac = MAC_LEN
        except (OSError, EOFError):
            pass
        self._close()

    def _close(self) -> None:
        with self._lock:
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)
