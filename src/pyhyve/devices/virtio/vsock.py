"""virtio-vsock (virtio 1.x, 5.10) to host UNIX sockets, in Firecracker's style.

Backend spec (--vsock, --bind vsock0=...): `cid=N,uds=PATH`.
- Host to guest: a host program connects to PATH and writes `CONNECT <port>\\n`; the device
  asks the guest (REQUEST to that port); when the guest accepts, the program reads
  `OK <host port>\\n` and the connection carries bytes both ways; if it refuses, the
  program's socket is closed.
- Guest to host: the guest connects to CID 2 (the host), port P; the device connects to
  the UNIX socket `PATH_P`, and accepts (RESPONSE) or refuses (RST).

Streams honour the credit the guest announces (buf_alloc, fwd_cnt): the device never sends
more than the guest has room for, and announces its own (what it has written to the host
sockets). Packets for the guest wait in the device (WAIT: the receive request goes back to
the ring) and are read from host sockets only while fewer than MAX_QUEUED wait, so nothing
grows without bound. Connections do not survive a restore or a migration (the host sockets
are not in the snapshot): the device state holds none, and after a restore or migration the
guest gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue, as the specification asks,
so it drops its connections and opens new ones.
"""

from __future__ import annotations

import collections
import contextlib
import os
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
SHUTDOWN_BOTH = 3
BUF_ALLOC = 256 << 10   # what we take from the guest before the host sockets drain it
MAX_QUEUED = 256        # packets waiting for the guest
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
    sent: int = 0                # bytes we sent the guest
    received: int = 0            # bytes the guest sent us, written to the socket
    greeting: bool = False       # host-initiated: "OK <port>\n" owed to the program
    outbuf: bytearray | None = None  # the guest's bytes the host program has not taken


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
        self._next_port = 1 << 30
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._poller: threading.Thread | None = None
        self.listener: socket.socket | None = None
        self._ident: tuple[int, int] | None = None
        self._closed = False
        self._pending_hello: dict[socket.socket, bytes] = {}
        from ...unixsock import SocketPathError, listen

        try:  # at build: a bad path fails the VM before it runs
            self.listener, self._ident = listen(self.uds, 16, "vsock socket")
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
            return chain.write(mem, struct.pack("<I", EVENT_TRANSPORT_RESET))
        if queue == TX:
            self._from_guest(chain.read(mem, HDR.size + BUF_ALLOC))
            return 0
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
        self._wake_poller()
        return chain.write(mem, pkt)

    def reset(self) -> None:
        with self._lock:
            for c in self.conns.values():
                c.sock.close()
            self.conns.clear()
            self.queued.clear()

    def transport_reset(self) -> None:
        """After a restore or migration: every connection is gone; tell the guest."""
        self.reset()
        with self._lock:
            self.events += 1
        self.kick(EVENT)

    # --- packets ----------------------------------------------------------------------
    def _packet(self, c: Conn, op: int, data: bytes = b"", flags: int = 0) -> bytes:
        return HDR.pack(HOST_CID, self.cid, c.host_port, c.guest_port, len(data), TYPE_STREAM,
                        op, flags, BUF_ALLOC, c.received) + data

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
            key = (dst_port, src_port)
            c = self.conns.get(key)
            if dst_cid != HOST_CID or typ != TYPE_STREAM:
                if op != OP_RST:
                    self._reply_rst(src_port, dst_port)
                return
            if c is not None:
                c.peer_buf, c.peer_fwd = buf_alloc, fwd_cnt
            if op == OP_REQUEST and c is None:
                self._guest_connects(src_port, dst_port)
            elif c is None or op == OP_REQUEST:
                if op != OP_RST:
                    self._reply_rst(src_port, dst_port)
            elif op == OP_RESPONSE and not c.connected:
                c.connected, c.greeting = True, True
            elif op == OP_RW and c.connected:
                c.outbuf = (c.outbuf or bytearray()) + data
                if len(c.outbuf) > BUF_ALLOC:  # more than the credit we gave: a broken peer
                    self._drop(c, rst=True)
                else:
                    self._flush(c)
            elif op == OP_CREDIT_REQUEST:
                self._queue(self._packet(c, OP_CREDIT_UPDATE))
            elif (op == OP_SHUTDOWN and flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH) or op == OP_RST:
                self._drop(c, rst=op != OP_RST)
        self.kick(RX)
        self._wake_poller()

    def _flush(self, c: Conn) -> None:
        """Give the host program what it takes now, never waiting for it (under the
        lock); the credit the guest sees grows by what it took."""
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self._drop(c, rst=True)
                return
            del c.outbuf[:n]
            before, c.received = c.received, c.received + n
            if before // (BUF_ALLOC // 4) != c.received // (BUF_ALLOC // 4):
                self._queue(self._packet(c, OP_CREDIT_UPDATE))

    def _reply_rst(self, guest_port: int, host_port: int) -> None:
        self._queue(HDR.pack(HOST_CID, self.cid, host_port, guest_port, 0, TYPE_STREAM,
                             OP_RST, 0, 0, 0))

    def _guest_connects(self, guest_port: int, host_port: int) -> None:
        """The guest's REQUEST to host port P: connect to PATH_P (under the lock; a UNIX
        connect does not block)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if len(self.conns) >= MAX_CONNS:
                raise OSError("too many connections")
            s.connect(f"{self.uds}_{host_port}")
        except OSError:
            s.close()
            self._reply_rst(guest_port, host_port)
            return
        c = Conn(s, host_port, guest_port, connected=True)
        self.conns[(host_port, guest_port)] = c
        self._queue(self._packet(c, OP_RESPONSE))

    def _drop(self, c: Conn, rst: bool) -> None:
        """Under the lock."""
        self.conns.pop((c.host_port, c.guest_port), None)
        with contextlib.suppress(OSError):
            c.sock.close()
        if rst:
            self._queue(self._packet(c, OP_RST))

    # --- host side: a thread watching the listener and every connection ---------------
    def _wake_poller(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"w")

    def _poll(self) -> None:
        while True:
            with self._lock:
                room = len(self.queued) < MAX_QUEUED
                readers: list[int | socket.socket] = [self._stop_r]
                if self.listener is not None:
                    readers.append(self.listener)
                readers += list(self._pending_hello)
                by_sock = {c.sock: c for c in self.conns.values()
                           if c.connected and room and c.sent - c.peer_fwd < c.peer_buf}
                blocked = {c.sock: c for c in self.conns.values() if c.outbuf}
                for c in self.conns.values():
                    if c.greeting:  # the guest accepted a host program's CONNECT
                        c.greeting = False
                        with contextlib.suppress(OSError):
                            c.sock.sendall(f"OK {c.host_port}\n".encode())
            readers += list(by_sock)
            try:
                ready, writable, _ = select.select(readers, list(blocked), [])
            except (OSError, ValueError):
                return
            if writable:
                with self._lock:
                    for w in writable:
                        if (blocked[w].host_port, blocked[w].guest_port) in self.conns:
                            self._flush(blocked[w])
                self.kick(RX)
            if self._closed:
                return
            if self._stop_r in ready:
                os.read(self._stop_r, 4096)  # only a wake-up: look at the credit again
            for r in ready:
                if r is self.listener:
                    self._accept()
                elif isinstance(r, socket.socket) and r in self._pending_hello:
                    self._hello(r)
                elif isinstance(r, socket.socket) and r in by_sock:
                    self._host_data(by_sock[r])

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            s, _ = self.listener.accept()
        except OSError:
            return
        with self._lock:
            if len(self._pending_hello) + len(self.conns) >= MAX_CONNS:
                s.close()
                return
            self._pending_hello[s] = b""

    def _hello(self, s: socket.socket) -> None:
        """A host program's `CONNECT <port>\\n` (at most 32 bytes)."""
        try:
            chunk = s.recv(32)
        except OSError:
            chunk = b""
        with self._lock:
            buf = self._pending_hello.get(s, b"") + chunk
            if not chunk or (b"\n" not in buf and len(buf) >= 32):
                self._pending_hello.pop(s, None)
                s.close()
                return
            if b"\n" not in buf:
                self._pending_hello[s] = buf
                return
            del self._pending_hello[s]
            m = re.match(rb"^CONNECT (\d{1,10})\n", buf)
            if not m or int(m.group(1)) >= 1 << 32:
                s.close()
                return
            self._next_port += 1
            c = Conn(s, self._next_port, int(m.group(1)))
            self.conns[(c.host_port, c.guest_port)] = c
            self._queue(self._packet(c, OP_REQUEST))
        self.kick(RX)

    def _host_data(self, c: Conn) -> None:
        with self._lock:
            room = c.peer_buf - (c.sent - c.peer_fwd)
        try:
            data = c.sock.recv(min(READ_CHUNK, max(0, room)))
        except OSError:
            data = b""
        with self._lock:
            if (c.host_port, c.guest_port) not in self.conns:
                return
            if not data:  # the host program closed: tell the guest
                self._drop(c, rst=False)
                self._queue(self._packet(c, OP_SHUTDOWN, flags=SHUTDOWN_BOTH))
            else:
                c.sent += len(data)
                self._queue(self._packet(c, OP_RW, data))
        self.kick(RX)

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
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
            if self._ident is not None:
                from ...unixsock import release
                release(self.uds, self._ident)
        if self._poller is not None:
            self._poller.join(5)
        with self._lock:
            for c in self.conns.values():
                c.sock.close()
            for s in self._pending_hello:
                s.close()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
