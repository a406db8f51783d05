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

from .protocol import Channel
from .security import accept_peer, tls_context

HANDSHAKE_TIMEOUT = 5.0
MAX_HANDSHAKES = 16
LOGGED_FAILURES = 10  # lines said about failed peers before only counting them


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
                 say: callable) -> None:  # type: ignore[valid-type]
        self.sock, self.key, self.tls_dir, self.say = sock, key, tls_dir, say
        self.cond = threading.Condition()
        self.ready: list[tuple[Channel, str]] = []
        self.failures: list[str] = []
        self.dropped = 0
        self.closed = False
        self._handshaking = 0
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
            self.cond.notify_all()
        for ch, _ in left:
            ch.close()
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
                busy = self._handshaking >= MAX_HANDSHAKES
                if not busy:
                    self._handshaking += 1
            if busy:
                conn.close()
                self.failed(peer, f"more than {MAX_HANDSHAKES} connections authenticating")
                continue
            threading.Thread(target=self._handshake, args=(conn, peer), daemon=True).start()

    def _handshake(self, conn: socket.socket, peer: str) -> None:
        ch = None
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
        except TimeoutError:
            conn.close()
            self.failed(peer, f"did not authenticate within {HANDSHAKE_TIMEOUT:.0f} s")
        except (OSError, ValueError) as e:  # protocol, security and TLS errors alike
            conn.close()
            self.failed(peer, e)
        else:
            with self.cond:
                if self.closed:
                    ch.close()
                else:
                    self.ready.append((ch, peer))
                    self.cond.notify_all()
        finally:
            with self.cond:
                self._handshaking -= 1
