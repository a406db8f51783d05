"""virtio-vsock (virtio 1.x, 5.10) to host UNIX sockets, in Firecracker's style.

Backend spec (--vsock, --bind vsock0=...): `cid=N,uds=PATH`.
- Host to guest: a host program connects to PATH and writes `CONNECT <port>\\n`; the device
  asks the guest (REQUEST to that port); when the guest accepts, the program reads
  `OK <host port>\\n` and the connection carries bytes both ways; if it refuses, the
  program's socket is closed.
- Guest to host: the guest connects to CID 2 (the host), port P; the device connects to
  the UNIX socket `PATH_P`, and accepts (RESPONSE) or refuses (RST).

Streams honour the credit the guest announces (buf_alloc, fwd_cnt, counted modulo 2^32):
the device never sends more than the guest has room for, and announces its own (what it
has written to the host sockets). Host sockets are non-blocking and only the poller thread
waits on them: a host service that accepts or reads slowly holds its own stream, never the
device, a pause or a save. Packets for the guest wait in the device (WAIT: the receive
request goes back to the ring); host sockets are read only while fewer than MAX_QUEUED
wait, and the guest's own transmissions wait in its ring while more than MAX_BACKLOG do,
so nothing grows without bound. A guest that closes a stream first has its last bytes
delivered (the socket is closed once they are taken). Half-closes pass through both ways,
as on a TCP socket: a guest's SHUTDOWN with SEND becomes the host program's EOF once its
last bytes are taken (shutdown(SHUT_WR)), with RCV the program's further writes fail
(SHUT_RD); a program's EOF becomes a SHUTDOWN with SEND for the guest, which may still
write back. The stream ends when both directions have (or at RST, or a full SHUTDOWN).

Connections do not survive a restore or a migration (the host sockets are not in the
snapshot): the device state holds none, and after a restore or migration the
guest gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue, as the specification asks,
so it drops its connections and opens new ones.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import PyhyveError
from .backend import WAIT
from .queue import Chain, Memory

HOST_CID = 2
HDR = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = (
    1, 2, 3, 4, 5, 6, 7)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2  # the sender will receive / send no more
SHUTDOWN_BOTH = 3
BUF_ALLOC = 256 << 10   # what we take from the guest before the host sockets drain it
MAX_QUEUED = 256        # packets waiting for the guest before host sockets are left unread
MAX_BACKLOG = 1024      # ... before the guest's own transmissions wait in its ring
MAX_CONNS = 1024
READ_CHUNK = 16 << 10
RX, TX, EVENT = 0, 1, 2
EVENT_TRANSPORT_RESET = 0
_SPEC = re.compile(r"^cid=(\d+),uds=(.+)$")


class VsockError(PyhyveError, ValueError):
    pass


def parse_vsock(spec: str) -> tuple[int, str]:
    m = _SPEC.match(spec)
    if not m or not 3 <= int(m.group(1)) < 1 << 32:
        raise VsockError(f"bad vsock '{spec}': use cid=N,uds=PATH with 3 <= N < 2^32")
    return int(m.group(1)), m.group(2)


@dataclass
class Conn:
    sock: socket.socket
    host_port: int
    guest_port: int
    connected: bool = False      # the guest accepted (or we accepted its request)
    peer_buf: int = 0            # the guest's buf_alloc and fwd_cnt: its credit
    peer_fwd: int = 0
    sent: int = 0                # bytes we sent the guest (mod 2^32)
    received: int = 0            # bytes the guest sent us that the socket took (mod 2^32)
    outbuf: bytearray | None = None  # for the host program, not yet taken (OK line first)
    early: bytes = b""           # what a host program sent right after its CONNECT line
    closing: int = 0             # 0, or the guest's op (SHUTDOWN/RST) once outbuf drains
    guest_shut: int = 0          # SHUTDOWN flags the guest sent so far (a half-close)
    host_eof: bool = False       # the host program sent its EOF (the guest was told)

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def room(self) -> int:
        """What the guest can still take (its credit)."""
        return self.peer_buf - ((self.sent - self.peer_fwd) & 0xFFFF_FFFF)


class Vsock:
    device_type = 19
    class_code = 0x078000
    queue_sizes: tuple[int, ...] = (256, 256, 16)

    def __init__(self, spec: str) -> None:
        self.cid, self.uds = parse_vsock(spec)
        self.kick: Callable[[int], None] = lambda queue: None  # set by the transport
        self.queued: collections.deque[bytes] = collections.deque()
        self.conns: dict[tuple[int, int], Conn] = {}  # (host port, guest port)
        self.events = 0                  # transport resets the guest has yet to see
        self._held: list[Conn] = []      # host CONNECTs waiting for the guest to see a reset
        self._tx_waiting = False
        self._next_port = (1 << 30) + random.randrange(1 << 20)  # not reused across runs
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poller: threading.Thread | None = None
        self.listener: socket.socket | None = None
        self._ident: tuple[int, int] | None = None
        self._closed = False
        self._pending_hello: dict[socket.socket, bytes] = {}
        from ...unixsock import SocketPathError, listen

        try:  # at build: a bad path fails the VM before it runs
            self.listener, self._ident = listen(self.uds, 16, "vsock socket")
            self.listener.setblocking(False)
        except SocketPathError as e:
            os.close(self._stop_r)
            os.close(self._stop_w)
            raise VsockError(str(e)) from None

    # --- virtio -----------------------------------------------------------------------
    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return struct.pack("<Q", self.cid)

    def config_write(self, offset: int, data: bytes) -> None:
        pass

    def start(self) -> None:
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="vsock", daemon=True)
            self._poller.start()
        if self.events:
            self.kick(EVENT)

    def handle(self, queue: int, chain: Chain, mem: Memory) -> int:
        if queue == EVENT:
            with self._lock:
                if not self.events:
                    return WAIT
                self.events -= 1
                if not self.events:  # the guest knows: host CONNECTs may go on
                    for c in self._held:
                        self._queue(self._packet(c, OP_REQUEST))
                    self._held.clear()
            self.kick(RX)
            return chain.write(mem, struct.pack("<I", EVENT_TRANSPORT_RESET))
        if queue == TX:
            with self._lock:
                if len(self.queued) >= MAX_BACKLOG:  # the guest is not reading: it waits
                    self._tx_waiting = True
                    return WAIT
            self._from_guest(chain.read(mem, HDR.size + BUF_ALLOC))
            return 0
        kick_tx = False
        with self._lock:
            if not self.queued:
                return WAIT
            pkt = self.queued[0]
            if chain.out_room < len(pkt):
                if chain.out_room <= HDR.size or HDR.unpack_from(pkt)[6] != OP_RW:
                    return 0  # a buffer too small even for a header: given back empty
                # data in pieces the guest's buffers hold (Linux offers 4 KiB ones)
                take = chain.out_room - HDR.size
                fields = list(HDR.unpack_from(pkt))
                fields[4] = take
                self.queued[0] = HDR.pack(*fields[:4], len(pkt) - HDR.size - take,
                                          *fields[5:]) + pkt[HDR.size + take:]
                pkt = HDR.pack(*fields) + pkt[HDR.size:HDR.size + take]
            else:
                self.queued.popleft()
            if self._tx_waiting and len(self.queued) < MAX_BACKLOG // 2:
                self._tx_waiting, kick_tx = False, True
        if kick_tx:
            self.kick(TX)
        self._wake_poller()
        return chain.write(mem, pkt)

    def reset(self) -> None:
        with self._lock:
            for c in [*self.conns.values(), *self._held]:
                c.sock.close()
            self.conns.clear()
            self._held.clear()
            self.queued.clear()

    # --- packets ----------------------------------------------------------------------
    def _packet(self, c: Conn, op: int, data: bytes = b"", flags: int = 0) -> bytes:
        return HDR.pack(HOST_CID, self.cid, c.host_port, c.guest_port, len(data), TYPE_STREAM,
                        op, flags, BUF_ALLOC, c.received & 0xFFFF_FFFF) + data

    def _queue(self, pkt: bytes) -> None:
        """Under the lock."""
        self.queued.append(pkt)

    def _from_guest(self, raw: bytes) -> None:
        if len(raw) < HDR.size:
            return
        (_src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack_from(raw)
        data = raw[HDR.size:HDR.size + length]
        with self._lock:
            c = self.conns.get((dst_port, src_port))
            if dst_cid != HOST_CID or typ != TYPE_STREAM:
                if op != OP_RST:
                    self._reply_rst(src_port, dst_port)
                return
            if c is not None:
                c.peer_buf, c.peer_fwd = buf_alloc, fwd_cnt
            if op == OP_REQUEST and c is None:
                self._guest_connects(src_port, dst_port)
            elif c is None or op == OP_REQUEST or c.closing:
                if op != OP_RST and c is None:
                    self._reply_rst(src_port, dst_port)
            elif op == OP_RESPONSE and not c.connected:
                c.connected = True
                c.outbuf = bytearray(f"OK {c.host_port}\n".encode()) + (c.outbuf or b"")
                self._flush(c)
                if c.early and c.key in self.conns:
                    c.sent = (c.sent + len(c.early)) & 0xFFFF_FFFF
                    self._queue(self._packet(c, OP_RW, c.early))
                    c.early = b""
            elif op == OP_RW and c.connected:
                c.outbuf = (c.outbuf or bytearray()) + data
                if len(c.outbuf) > BUF_ALLOC + 64:  # more than the credit we gave
                    self._drop(c, rst=True)
                else:
                    self._flush(c)
            elif op == OP_CREDIT_REQUEST:
                self._queue(self._packet(c, OP_CREDIT_UPDATE))
            elif op == OP_RST or (op == OP_SHUTDOWN and (c.guest_shut | flags) & SHUTDOWN_BOTH
                                  == SHUTDOWN_BOTH):
                c.closing = op  # once the host program has what the guest sent
                self._flush(c)
            elif op == OP_SHUTDOWN:
                c.guest_shut |= flags & SHUTDOWN_BOTH
                if flags & SHUTDOWN_RCV:  # the guest takes no more: the program's writes fail
                    with contextlib.suppress(OSError):
                        c.sock.shutdown(socket.SHUT_RD)
                self._flush(c)  # with SEND: the program's EOF, after the last bytes
        self.kick(RX)
        self._wake_poller()

    def _flush(self, c: Conn) -> None:
        """Give the host program what it takes now, never waiting (under the lock); the
        guest's credit grows by what it took. A closing stream ends once drained."""
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self._drop(c, rst=True)
                return
            del c.outbuf[:n]
            before = c.received
            c.received = (c.received + n) & 0xFFFF_FFFF
            if before // (BUF_ALLOC // 4) != c.received // (BUF_ALLOC // 4):
                self._queue(self._packet(c, OP_CREDIT_UPDATE))
        if c.closing:
            self._drop(c, rst=c.closing == OP_SHUTDOWN)
        elif c.guest_shut & SHUTDOWN_SEND:
            if c.host_eof:  # both directions have ended
                self._drop(c, rst=True)
                return
            with contextlib.suppress(OSError):  # everything the guest sent is taken: EOF
                c.sock.shutdown(socket.SHUT_WR)

    def _reply_rst(self, guest_port: int, host_port: int) -> None:
        if len(self.queued) < MAX_BACKLOG:  # a flood of strays gets no answer past that
            self._queue(HDR.pack(HOST_CID, self.cid, host_port, guest_port, 0, TYPE_STREAM,
                                 OP_RST, 0, 0, 0))

    def _guest_connects(self, guest_port: int, host_port: int) -> None:
        """The guest's REQUEST to host port P: connect to PATH_P without waiting (under
        the lock): a service that is not accepting now is refused (RST)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            if len(self.conns) >= MAX_CONNS:
                raise OSError("too many connections")
            s.connect(f"{self.uds}_{host_port}")
        except OSError:
            s.close()
            self._reply_rst(guest_port, host_port)
            return
        c = Conn(s, host_port, guest_port, connected=True)
        self.conns[c.key] = c
        self._queue(self._packet(c, OP_RESPONSE))

    def _drop(self, c: Conn, rst: bool) -> None:
        """Under the lock: this connection (the object, not another one on its ports)."""
        if self.conns.get(c.key) is c:
            del self.conns[c.key]
        with contextlib.suppress(OSError):
            c.sock.close()
        if rst:
            self._queue(self._packet(c, OP_RST))

    # --- host side: one thread watching the listener and every connection ---------------
    def _wake_poller(self) -> None:
        with contextlib.suppress(OSError):  # full: it is awake already
            os.write(self._stop_w, b"w")

    def _poll(self) -> None:
        while not self._closed:
            poller = select.poll()
            watch: dict[int, tuple[str, object]] = {}
            with self._lock:
                poller.register(self._stop_r, select.POLLIN)
                if self.listener is not None:
                    watch[self.listener.fileno()] = ("listen", None)
                for s in self._pending_hello:
                    watch[s.fileno()] = ("hello", s)
                room = len(self.queued) < MAX_QUEUED
                for c in self.conns.values():
                    fd = c.sock.fileno()
                    events = 0
                    if c.connected and room and c.room() > 0 and not c.closing and \
                            not c.host_eof and not c.guest_shut & SHUTDOWN_RCV:
                        events |= select.POLLIN
                    if c.outbuf:
                        events |= select.POLLOUT
                    if events:
                        poller.register(fd, events)
                        watch[fd] = ("conn", c)
                for fd, (kind, _) in watch.items():
                    if kind != "conn":
                        poller.register(fd, select.POLLIN)
            try:
                ready = poller.poll()
            except OSError:
                continue
            for fd, ev in ready:
                if fd == self._stop_r:
                    with contextlib.suppress(OSError):
                        os.read(self._stop_r, 4096)  # a wake-up: look again
                    continue
                kind, obj = watch.get(fd, ("", None))
                if kind == "listen":
                    self._accept()
                elif kind == "hello" and isinstance(obj, socket.socket):
                    self._hello(obj)
                elif kind == "conn" and isinstance(obj, Conn):
                    self._ready(obj, ev)

    def _ready(self, c: Conn, ev: int) -> None:
        with self._lock:
            if self.conns.get(c.key) is not c:
                return  # gone (or another connection on the same ports) since
            if ev & (select.POLLOUT | select.POLLHUP | select.POLLERR) and c.outbuf:
                self._flush(c)  # (a program that went away: the send fails, RST)
            reading = not c.host_eof and not c.guest_shut & SHUTDOWN_RCV
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and reading:
            self._host_data(c)
        self.kick(RX)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            s, _ = self.listener.accept()
        except OSError:
            return
        s.setblocking(False)
        with self._lock:
            if len(self._pending_hello) + len(self.conns) >= MAX_CONNS:
                s.close()
                return
            self._pending_hello[s] = b""

    def _hello(self, s: socket.socket) -> None:
        """A host program's `CONNECT <port>\\n` (at most 32 bytes before the newline; what
        follows it goes to the guest once it accepts)."""
        try:
            chunk = s.recv(64)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        with self._lock:
            buf = self._pending_hello.get(s, b"") + chunk
            nl = buf.find(b"\n")
            if not chunk or (nl < 0 and len(buf) >= 32) or nl >= 32:
                self._pending_hello.pop(s, None)
                s.close()
                return
            if nl < 0:
                self._pending_hello[s] = buf
                return
            del self._pending_hello[s]
            m = re.match(rb"^CONNECT (\d{1,10})$", buf[:nl])
            if not m or int(m.group(1)) >= 1 << 32:
                s.close()
                return
            self._next_port += 1
            c = Conn(s, self._next_port, int(m.group(1)), early=buf[nl + 1:])
            self.conns[c.key] = c
            if self.events:  # the guest has yet to hear of a reset: after it
                self._held.append(c)
            else:
                self._queue(self._packet(c, OP_REQUEST))
        self.kick(RX)

    def _host_data(self, c: Conn) -> None:
        with self._lock:
            if self.conns.get(c.key) is not c or not c.connected or c.closing or c.host_eof:
                return
            room = c.room()
        if room <= 0:
            return  # no credit now: a later poll, not an EOF
        try:
            data = c.sock.recv(min(READ_CHUNK, room))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        with self._lock:
            if self.conns.get(c.key) is not c:
                return
            if not data:  # the host program's EOF (it may still read): tell the guest
                c.host_eof = True
                if c.guest_shut & SHUTDOWN_SEND and not c.outbuf:  # both ways ended
                    self._drop(c, rst=False)
                    self._queue(self._packet(c, OP_SHUTDOWN, flags=SHUTDOWN_BOTH))
                else:
                    self._queue(self._packet(c, OP_SHUTDOWN, flags=SHUTDOWN_SEND))
            else:
                c.sent = (c.sent + len(data)) & 0xFFFF_FFFF
                self._queue(self._packet(c, OP_RW, data))

    # --- state ------------------------------------------------------------------------
    def state(self) -> bytes:
        return b""  # connections do not survive a save (module docstring)

    def load(self, raw: bytes) -> None:
        if raw:
            raise ValueError("vsock: unexpected saved state")
        self.events += 1  # the guest learns of the reset when it runs again

    def close(self) -> None:
        self._closed = True
        self._wake_poller()
        if self._poller is not None:
            self._poller.join(5)
            if self._poller.is_alive():
                return  # still inside a call on these fds: leave them to process exit
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
            if self._ident is not None:
                from ...unixsock import release
                release(self.uds, self._ident)
        with self._lock:
            for c in [*self.conns.values(), *self._held]:
                c.sock.close()
            for s in self._pending_hello:
                s.close()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
