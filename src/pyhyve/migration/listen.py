"""The destination's front door: listen, authenticate concurrently, hand over one peer.

Anyone who can reach the port can connect, so nothing a peer does before it has proven
the key may cost more than a bounded thread for a few seconds: every connection gets its
own handshake thread (at most MAX_HANDSHAKES at once; more are closed at once) with a
short deadline, and pre-authentication frames are small, flat JSON. A peer that fails is
dropped and counted; the listener keeps waiting for the real source until its deadline.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Callable

from .protocol import Channel
from .security import accept_peer, tls_context

HANDSHAKE_TIMEOUT = 5.0  # for the whole handshake, not per read: trickling bytes buys nothing
MAX_HANDSHAKES = 64
MAX_PER_ADDRESS = 4      # so one host cannot take every slot
MAX_READY = 4            # authenticated peers waiting for the receiver
LOGGED_FAILURES = 10     # lines said about failed peers before only counting them


def listen_address(host: str, port: int) -> socket.socket:
    """A listening TCP socket; host "" means every address (IPv6 and IPv4 where the host
    has both), a literal or name picks its own family."""
    if not host:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    return socket.create_server(addr, family=family)


class Listener:
    def __init__(self, sock: socket.socket, key: bytes | None, tls_dir: str | None,
                 say: Callable[[str], None]) -> None:
        self.sock, self.key, self.tls_dir, self.say = sock, key, tls_dir, say
        self.cond = threading.Condition()
        self.ready: list[tuple[Channel, str]] = []
        self.failures: list[str] = []
        self.dropped = 0
        self.closed = False
        self._handshaking = 0
        self._per_address: dict[str, int] = {}
        self._in_handshake: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="migration-listen", daemon=True)
        self._thread.start()

    def failed(self, peer: str, why: object) -> None:
        """Record a peer (or an attempt) that failed; say so, a bounded number of times."""
        with self.cond:
            self.failures.append(f"{peer}: {why}")
            del self.failures[:-100]
            self.dropped += 1
            n = self.dropped
            self.cond.notify_all()
        if n <= LOGGED_FAILURES:
            self.say(f"dropped {peer}: {why}; still waiting")
        elif n % 100 == 0:
            self.say(f"{n} connections dropped so far; still waiting")

    def next(self, deadline: float) -> tuple[Channel, str] | None:
        """The next authenticated peer, or None at the deadline or when closed."""
        with self.cond:
            self.cond.wait_for(lambda: self.ready or self.closed,
                               max(0.0, deadline - time.monotonic()))
            return self.ready.pop(0) if self.ready else None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            left, self.ready = self.ready, []
            busy = list(self._in_handshake)
            self.cond.notify_all()
        for ch, _ in left:
            ch.close()
        for conn in busy:  # their threads end at once, and say nothing more
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _accept(self) -> None:
        self.sock.settimeout(0.5)  # to notice close()
        while not self.closed:
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.closed:
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                               errno.ECONNABORTED, errno.EINTR):
                    time.sleep(0.05)
                    continue
                return
            peer = f"{addr[0]}:{addr[1]}"
            with self.cond:
                mine = self._per_address.get(addr[0], 0)
                busy = self._handshaking >= MAX_HANDSHAKES or mine >= MAX_PER_ADDRESS
                if not busy:
                    self._handshaking += 1
                    self._per_address[addr[0]] = mine + 1
            if busy:
                conn.close()
                self.failed(peer, "too many connections authenticating at once")
                continue
            threading.Thread(target=self._handshake, args=(conn, peer, addr[0]),
                             daemon=True).start()

    def _handshake(self, conn: socket.socket, peer: str, address: str) -> None:
        ch = None
        # a second descriptor of the same socket: shutting it down ends the handshake's
        # reads even after TLS has taken the first one over
        raw = conn.dup()
        with self.cond:
            self._in_handshake.add(raw)
        expired = threading.Event()

        def expire() -> None:  # one deadline for the whole handshake
            expired.set()
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
        timer = threading.Timer(HANDSHAKE_TIMEOUT, expire)
        timer.daemon = True
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        timer.start()
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_dir:
                try:
                    conn = tls_context(self.tls_dir, server=True).wrap_socket(conn, server_side=True)
                except (OSError, ValueError) as e:
                    raise ConnectionError(f"TLS handshake failed ({e}); is the source using "
                                          "--tls-dir with the same certificate?") from None
            ch = Channel(conn, b"D", b"S")
            accept_peer(ch, self.key, bool(self.tls_dir))
        except (OSError, ValueError) as e:  # protocol, security and TLS errors alike
            timer.cancel()
            conn.close()
            if not self.closed:
                self.failed(peer, f"did not authenticate within {HANDSHAKE_TIMEOUT:g} s"
                            # the socket's own timeout may beat the timer to it
                            if expired.is_set() or time.monotonic() >= deadline else e)
        else:
            timer.cancel()
            with self.cond:
                keep = not self.closed and not expired.is_set() and len(self.ready) < MAX_READY
                if keep:
                    self.ready.append((ch, peer))
                    self.cond.notify_all()
            if not keep:
                ch.close()
                if not self.closed:
                    self.failed(peer, "too many authenticated peers waiting")
        finally:
            with self.cond:
                self._handshaking -= 1
                self._in_handshake.discard(raw)
                raw.close()
                left = self._per_address.get(address, 1) - 1
                if left:
                    self._per_address[address] = left
                else:
                    self._per_address.pop(address, None)
