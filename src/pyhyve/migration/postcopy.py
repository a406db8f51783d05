"""Post-copy: the guest runs on the destination before all of its memory is there.

At the switch the source pauses its guest for good and tells the destination which pages
are still to come (POSTCOPY); the destination drops whatever it holds of them, routes
first touches of guest RAM to a page server (machine/uffd.py), and starts the guest. The
source then pushes those pages in page order, and a page the guest waits for (REQ) goes
first; the destination says DONE when it has them all, and only then does the source let
its VM go.

From the switch until DONE the guest's only complete copy is split between the hosts, so
a cut connection must lose nothing: the destination's guest simply waits on any page it
lacks (it goes on where it has its pages), the destination keeps listening, and the
source -- whose guest stays paused, its memory intact -- reconnects every RETRY_S with the
session named in HELLO (RESUME), is told which pages are still missing (NEED), and goes
on. docs/migration-protocol.md has the whole failure model.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import PyhyveError
from ..machine.dirty import runs_of
from ..machine.memory import PAGE
from ..machine.uffd import UffdError
from ..pipeline.pages import decode_runs, encode_runs, page_flags
from .encoding import Decoder
from .listen import HANDSHAKE_TIMEOUT
from .protocol import (
    LIMITS,
    MAX_PAGES_PER_FRAME,
    MEM_HEADER,
    Channel,
    Enc,
    PeerError,
    ProtocolError,
    T,
)

if TYPE_CHECKING:
    import numpy as np

    from ..machine.memory import GuestMemory
    from ..machine.uffd import PageServer
    from .listen import Listener

PUSH_PAGES = 512   # a background frame: 2 MiB, so a request waits behind at most that
RETRY_S = 0.5      # between the source's reconnection attempts
SESSION_HEX = 32
MAX_ASKED = 64     # requests taken before serving them (a flood cannot grow a list)
LINGER_S = 10.0    # the destination answers a late RESUME this long after DONE


class NotStarted(PyhyveError):
    """The destination says it never ran the guest: it is the source's again."""


def new_session() -> str:
    return secrets.token_hex(SESSION_HEX // 2)


def valid_session(value: object) -> bool:
    return isinstance(value, str) and len(value) == SESSION_HEX and \
        all(c in "0123456789abcdef" for c in value)


def send_range(ch: Channel, mem: GuestMemory, first: int, count: int,
               compress: Callable[[memoryview], tuple[int, bytes | memoryview]],
               pace: Callable[[int], None] = lambda n: None) -> int:
    """Pages [first, first+count) as MEM frames (zero pages as ZERO records), `pace`d
    (the bandwidth cap). The source guest is paused for good: the bytes hold still while
    they are sent and MACed."""
    sent = 0
    for off, n in mem.pieces(first * PAGE, (first + count) * PAGE, MAX_PAGES_PER_FRAME * PAGE):
        data = mem.file_view(off, n)
        nz = page_flags(data)
        base = off // PAGE
        for s, k in runs_of(nz):
            enc, body = compress(data[s * PAGE:(s + k) * PAGE])
            ch.send(T.MEM, MEM_HEADER.pack(base + s, k, enc), body)
            pace(len(body))
            sent += k
        for s, k in runs_of(~nz):
            ch.send(T.MEM, MEM_HEADER.pack(base + s, k, Enc.ZERO))
            sent += k
    return sent


def need_runs(missing: np.ndarray) -> bytes:
    """NEED's runs of the missing pages; if too scattered for one frame, 2 MiB-granular
    (pages the destination has already are then sent again and skipped there)."""
    raw = encode_runs(runs_of(missing))
    if len(raw) <= LIMITS[T.NEED]:
        return raw
    n = len(missing)
    coarse = missing[:n // 512 * 512].reshape(-1, 512).any(axis=1).repeat(512)
    import numpy as np

    return encode_runs(runs_of(np.concatenate([coarse, missing[n // 512 * 512:]])))


def runs_mask(raw: bytes, total_pages: int) -> np.ndarray:
    """A POSTCOPY or NEED frame's runs as a bool mask (ProtocolError if malformed)."""
    import numpy as np

    try:
        runs = decode_runs(raw, total_pages)
    except ValueError:
        raise ProtocolError("malformed page runs") from None
    mask = np.zeros(total_pages, dtype=bool)
    for p, n in runs:
        mask[p:p + n] = True
    return mask


class PostcopySource:
    """The source after the switch: pushes `pending` (bool per file page) until DONE,
    reconnecting after a cut. `connect` opens and authenticates a new channel."""

    def __init__(self, ch: Channel, mem: GuestMemory, pending: np.ndarray, session: str,
                 connect: Callable[[], Channel],
                 compress: Callable[[memoryview], tuple[int, bytes | memoryview]],
                 recover_timeout: float, on_state: Callable[[str, str], None],
                 pace: Callable[[int], None] = lambda n: None) -> None:
        self.ch, self.mem, self.session, self.pace = ch, mem, session, pace
        self.left = pending.copy()
        self.connect, self.compress = connect, compress
        self.recover_timeout, self.on_state = recover_timeout, on_state
        self.requests = 0
        self.reconnects = 0
        self.pages_sent = 0
        self.dest_failed = False  # it said ERROR: nothing to recover
        self._base, self._bytes_before = ch.bytes_sent, 0

    def run(self, cut: str = "") -> None:
        """Until DONE. `cut`: the connection broke already (between GO and RUNNING)."""
        if cut:
            self.ch.close()
            self._reconnect(cut)
        while True:
            try:
                self._serve()
                return
            except PeerError as e:  # the destination failed on its own: no reconnection
                self.ch.close()     # mends that, and its guest has lost its memory
                self.dest_failed = True
                raise ProtocolError(f"the destination's post-copy failed: {e}") from None
            except (ProtocolError, OSError) as e:
                self.ch.close()
                self._reconnect(str(e) or type(e).__name__)

    @property
    def bytes_sent(self) -> int:
        """Bytes sent since the switch, on every connection."""
        return self._bytes_before + self.ch.bytes_sent - self._base

    @property
    def pages_left(self) -> int:
        return int(self.left.sum())

    def _serve(self) -> None:
        import numpy as np

        ch, total = self.ch, len(self.left)
        cursor = 0
        while True:
            asked: list[tuple[int, int]] = []
            while len(asked) < MAX_ASKED and ch.readable(0):
                f = ch.recv(T.REQ, T.DONE)
                if f.type == T.DONE:
                    return
                if len(f.payload) != MEM_HEADER.size:
                    raise ProtocolError("malformed REQ frame")
                first, count, _ = MEM_HEADER.unpack(bytes(f.payload))
                if not 0 < count <= MAX_PAGES_PER_FRAME or first + count > total:
                    raise ProtocolError("REQ outside guest memory")
                asked.append((first, count))
            if asked:
                for first, count in asked:  # the guest waits on these: even if sent before
                    self.pages_sent += send_range(ch, self.mem, first, count, self.compress,
                                                  self.pace)
                    self.left[first:first + count] = False
                    self.requests += 1
                    cursor = first + count  # the push goes on from where the guest is
                continue
            ahead = np.flatnonzero(self.left[cursor:cursor + 4 * PUSH_PAGES])
            if len(ahead) == 0:
                rest = np.flatnonzero(self.left)
                if len(rest) == 0:  # all sent: the destination answers DONE
                    ch.readable(0.5)
                    continue
                cursor = int(rest[0])
            else:
                cursor += int(ahead[0])
            end = min(total, cursor + PUSH_PAGES)
            for p, n in runs_of(self.left[cursor:end], cursor):
                self.pages_sent += send_range(ch, self.mem, p, n, self.compress, self.pace)
            self.left[cursor:end] = False
            cursor = end

    def _reconnect(self, why: str) -> None:
        self.on_state("postcopy: reconnecting", why)
        deadline = time.monotonic() + self.recover_timeout
        while True:
            try:
                ch = self.connect()
                try:
                    ch.send_json(T.RESUME, {"session": self.session})
                    need = ch.recv(T.NEED, T.REFUSE)
                    if need.type == T.REFUSE:
                        if need.json(max_depth=1).get("not_started") == self.session:
                            raise NotStarted("the destination never started the guest (its "
                                             "GO was cut short)")
                        raise PeerError(str(need.json(max_depth=1).get("reason"))[:200])
                    self.left = runs_mask(bytes(need.payload), len(self.left))
                except BaseException:
                    ch.close()
                    raise
                self._bytes_before += self.ch.bytes_sent - self._base
                self.ch, self._base = ch, ch.bytes_sent
                self.reconnects += 1
                self.on_state("postcopy", "")
                return
            except NotStarted:
                raise
            except (PyhyveError, OSError, ConnectionError) as e:  # refused, unreachable,
                why = str(e) or type(e).__name__                  # failed to authenticate
            if time.monotonic() >= deadline:
                sent_all = not self.left.any()
                raise ProtocolError(
                    f"post-copy cut off and the destination did not come back within "
                    f"{self.recover_timeout:.0f} s ({why})"
                    + ("; every page had been sent, but the destination did not confirm: if "
                       "its guest runs, this one may be destroyed" if sent_all else ""))
            time.sleep(RETRY_S)


class PostcopyDest:
    """The destination after the switch, on its own thread: asks for the pages the guest
    waits on, places what arrives, and waits for the source to come back after a cut."""

    def __init__(self, server: PageServer, ch: Channel, listener: Listener, session: str,
                 io_timeout: float, say: Callable[[str], None]) -> None:
        self.server, self.ch, self.listener = server, ch, listener
        self.session, self.io_timeout, self.say = session, io_timeout, say
        self.ch.mem_sink = None  # never straight into guest RAM: the pages are missing there
        self.error: BaseException | None = None
        self.reconnects = 0
        self.done = threading.Event()
        self._decoder = Decoder()
        self._scratch: bytearray | None = None  # decoded frames, before UFFDIO_COPY
        self._thread = threading.Thread(target=self._run, name="postcopy", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        server = self.server
        outstanding: set[int] = set()  # blocks the guest waits on
        requested: set[int] = set()    # ... asked for on this connection
        ch: Channel | None = self.ch
        total = len(server.missing)
        try:
            while server.left:
                if ch is None:
                    ch = self._wait_for_source(outstanding)
                    requested = set()
                try:
                    # the source reconnects when its side of this connection broke, even
                    # if ours looks alive (a silent partition): take the newer one
                    newer = self.listener.next(time.monotonic()) if self.listener.ready else None
                    if newer is not None:
                        ch.close()
                        ch = self._resume(*newer)
                        requested = set()
                        if ch is None:
                            continue
                    self._wait(ch)
                    while True:  # a fault is asked for before the next frame is taken
                        outstanding.update(server.take_faults())
                        for b in sorted(outstanding - requested):
                            count = min(server.FAULT_BLOCK, total - b)
                            ch.send(T.REQ, MEM_HEADER.pack(b, count, 0))
                            requested.add(b)
                        if not (server.left and ch.readable(0)):
                            break
                        self._mem(ch.recv(T.MEM), total)
                        outstanding = {b for b in outstanding
                                       if server.missing[b:b + server.FAULT_BLOCK].any()}
                except UffdError:
                    raise  # ours, not the connection's: no reconnection mends it
                except (ProtocolError, OSError) as e:
                    self.say(f"post-copy: connection to the source lost ({e}); the guest "
                             "waits on its missing pages until the source reconnects")
                    if ch is not None:
                        ch.close()
                    ch = None
            server.finish()
            if ch is not None:
                self._done_on(ch)
            self.done.set()
            self.say(f"post-copy: every page is here ({server.faults_served} guest faults, "
                     f"{server.prepared_missing} device accesses waited for pages)")
            self._linger()
        except BaseException as e:  # the guest waits on us: say why it will wait forever
            self.error = e
            why = (f"the VM was closed with {server.left} pages still to come"
                   if server.aborted else f"post-copy failed here: {e}")
            self.say(f"post-copy stopped: {why}" if server.aborted
                     else f"post-copy failed: {e}")
            if ch is not None:  # and tell the source, which would otherwise wait for DONE
                self._last_word(ch, T.ERROR, {"reason": why[:500]})
        finally:
            self.listener.close()

    def _done_on(self, ch: Channel) -> None:
        self._last_word(ch, T.DONE, {})

    @staticmethod
    def _last_word(ch: Channel, kind: T, body: dict[str, object]) -> None:
        """`kind` (DONE or ERROR), then read what the source still sends until it closes:
        closing with its pages unread would reset the connection, and the last word with
        it (the source would take a cut for it and reconnect in vain)."""
        with contextlib.suppress(ProtocolError, OSError, ValueError):
            ch.send_json(kind, body)
            ch.sock.settimeout(5.0)
            ch.sock.shutdown(socket.SHUT_WR)
            while ch.sock.recv(1 << 16):
                pass
        ch.close()

    def _linger(self) -> None:
        """A while after DONE, answer a source that missed it (the connection broke just
        then) with an empty NEED and DONE again, so it does not wait in vain."""
        deadline = time.monotonic() + LINGER_S
        while time.monotonic() < deadline and not self.listener.closed:
            got = self.listener.next(min(deadline, time.monotonic() + 0.2))
            if got is None:
                continue
            ch = self._resume(*got)
            if ch is not None:
                self._done_on(ch)

    def _wait(self, ch: Channel) -> None:
        """Until the source sent something or the guest faulted (or 0.2 s passed: then
        the listener is looked at again)."""
        pending = getattr(ch.sock, "pending", None)
        if pending is not None and pending():
            return
        select.select([ch.sock.fileno(), self.server.fileno()], [], [], 0.2)

    def _mem(self, f: object, total: int) -> None:
        from .protocol import Frame

        assert isinstance(f, Frame)
        if len(f.payload) < MEM_HEADER.size:
            raise ProtocolError("short MEM frame")
        first, count, enc = MEM_HEADER.unpack_from(f.payload)
        if not 0 < count <= MAX_PAGES_PER_FRAME or first + count > total:
            raise ProtocolError("MEM frame outside guest memory")
        body = memoryview(f.payload)[MEM_HEADER.size:]
        if enc == Enc.RAW:  # placed from where it was received
            data = self._decoder.decode(enc, body, count * PAGE)
            assert data is not None
            self.server.deliver(first, data)
            return
        if self._scratch is None:  # one 8 MiB buffer, faulted in once
            self._scratch = bytearray(MAX_PAGES_PER_FRAME * PAGE)
        out = memoryview(self._scratch)[:count * PAGE]
        self._decoder.into(enc, body, C.addressof(C.c_char.from_buffer(out)), len(out))
        self.server.deliver(first, out)

    def _wait_for_source(self, outstanding: set[int]) -> Channel:
        """Serve zero-page faults and note the others while the source is away; take its
        reconnection (RESUME with our session) and tell it what is still missing."""
        while True:
            outstanding.update(self.server.take_faults())
            got = self.listener.next(time.monotonic() + 0.1)
            if got is None:
                if self.listener.closed:
                    raise ProtocolError("stopped waiting for the source")
                continue
            ch = self._resume(*got)
            if ch is not None:
                return ch

    def _resume(self, ch: Channel, peer: str) -> Channel | None:
        """A reconnection: RESUME with our session, answered with NEED (None if it was
        not the source, or broke)."""
        try:
            ch.sock.settimeout(HANDSHAKE_TIMEOUT)
            resume = ch.recv(T.RESUME).json(max_depth=1)
            if resume.get("session") != self.session:
                ch.send_json(T.ERROR, {"reason": "not this migration's session"})
                raise ProtocolError("a RESUME for another session")
            ch.mem_sink = None
            ch.sock.settimeout(self.io_timeout)
            ch.send(T.NEED, need_runs(self.server.missing))
        except (ProtocolError, PeerError, OSError) as e:
            self.listener.failed(peer, f"post-copy reconnection failed: {e}")
            ch.close()
            return None
        self.reconnects += 1
        self.say(f"post-copy: the source is back ({peer})")
        return ch
