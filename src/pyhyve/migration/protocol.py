"""Framing of the migration stream (see docs/migration-protocol.md).

A frame is a 16-byte header (magic "PHMG", type u16, flags u16, payload length u64, all
little-endian), the payload, and, once the peers have authenticated without TLS, a 32-byte
MAC: BLAKE3 in keyed mode (a PRF; ~8 GB/s here against ~2 GB/s for HMAC-SHA256) over
(direction, sequence number, header, payload) under the session key.
Lengths are checked against a per-type limit before anything is allocated, so hostile
bytes cost at most one bounded buffer.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import blake3

from .. import untrusted
from ..errors import PyhyveError

MAGIC = b"PHMG"
HEADER = struct.Struct("<4sHHQ")
MAC_LEN = 32
PROTOCOL_VERSION = 2  # 2: READY/GO hand-over before RUNNING
PAGE = 4096
MAX_PAGES_PER_FRAME = 2048                 # 8 MiB of guest memory
MEM_HEADER = struct.Struct("<QII")         # first file page, page count, encoding


class T(IntEnum):
    CHALLENGE = 1   # dst -> src: {"auth": "key"|"none", "nonce": hex}
    AUTH = 2        # src -> dst: {"nonce": hex, "proof": hex}
    AUTH_OK = 3     # dst -> src: {"proof": hex}
    HELLO = 4       # src -> dst: protocol version, VM config, CPUID, host facts, options
    ACCEPT = 5      # dst -> src: {}
    REFUSE = 6      # either way: {"reason": str}
    MEM = 7         # src -> dst: MEM_HEADER + data (raw, zstd or lz4) or nothing (zero)
    ROUND = 8       # src -> dst: {"round": n, "pages": n}
    STATE = 9       # src -> dst: u16 name length, name, encoded state section
    COMPLETE = 10   # src -> dst: {"devices": [...], "stats": {...}}
    RUNNING = 11    # dst -> src: {}: the guest runs on the destination
    ERROR = 12      # either way: {"reason": str}
    RUNS = 13       # src -> dst: the (page, count) runs round 0 will send, for prefaulting
    READY = 14      # dst -> src: {}: the state is loaded; the guest starts only on GO
    GO = 15         # src -> dst: {}: the source gives the guest up: start it
    POSTCOPY = 16   # src -> dst: runs of the pages that come after the switch (post-copy)
    REQ = 17        # dst -> src: MEM_HEADER (first page, count, 0): the guest waits on these
    DONE = 18       # dst -> src: {}: every page is in; the source may let go
    RESUME = 19     # src -> dst, on a new connection: {"session": hex}: go on after a cut
    NEED = 20       # dst -> src: runs of the pages still missing, answering RESUME


class Enc(IntEnum):
    RAW = 0
    ZSTD = 1
    LZ4 = 2
    ZERO = 3


LIMITS = {T.CHALLENGE: 4096, T.AUTH: 4096, T.AUTH_OK: 4096, T.HELLO: 1 << 20,
          T.ACCEPT: 4096, T.REFUSE: 65536, T.MEM: MEM_HEADER.size + MAX_PAGES_PER_FRAME * PAGE,
          T.ROUND: 4096, T.STATE: 16 << 20, T.COMPLETE: 1 << 20, T.RUNNING: 4096,
          T.ERROR: 65536, T.RUNS: 16 << 20, T.READY: 4096, T.GO: 4096,
          T.POSTCOPY: 16 << 20, T.REQ: MEM_HEADER.size, T.DONE: 4096, T.RESUME: 4096,
          T.NEED: 16 << 20}


class ProtocolError(PyhyveError, ConnectionError):
    """The peer sent something that is not a valid frame here, or went away."""


class PeerError(PyhyveError, ConnectionError):
    """The peer reported a failure (REFUSE or ERROR) with a reason."""


@dataclass
class Frame:
    type: T
    payload: bytes | memoryview
    direct: bool = False  # MEM data already written into guest memory

    def json(self, max_depth: int = 4) -> dict[str, Any]:
        """The payload as a JSON object; deep nesting, huge numbers and bad bytes are a
        ProtocolError (before authentication callers allow only flat objects: depth 1)."""
        try:
            obj = untrusted.loads(self.payload, max_depth=max_depth)
        except untrusted.BadJson as e:
            raise ProtocolError(f"{self.type.name} frame is {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.type.name} frame is not a JSON object")
        return obj


class Channel:
    """One side of a migration connection."""

    def __init__(self, sock: socket.socket, outgoing: bytes, incoming: bytes) -> None:
        self.sock = sock
        self.key: bytes | None = None
        self.out_dir, self.in_dir = outgoing, incoming
        self.out_seq = self.in_seq = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._head = bytearray(MEM_HEADER.size)
        self._big: bytearray | None = None  # reused for MEM frames not received in place
        # MEM frames: given (first page, count, encoding, data length), may return a
        # writable view (guest memory) to receive the data into directly, skipping a copy.
        self.mem_sink: Callable[[int, int, int, int], memoryview | None] | None = None

    def enable_mac(self, key: bytes) -> None:
        self.key = key

    def _mac(self, direction: bytes, seq: int, header: bytes, parts: list[Any]) -> bytes:
        assert self.key is not None
        m = blake3.blake3(direction + seq.to_bytes(8, "little") + header, key=self.key)
        for p in parts:
            m.update(p)
        return m.digest()

    def send(self, ftype: T, *parts: bytes | memoryview) -> None:
        length = sum(len(p) for p in parts)
        if length > LIMITS[ftype]:
            raise ValueError(f"{ftype.name} frame of {length} bytes is over its limit")
        header = HEADER.pack(MAGIC, ftype, 0, length)
        bufs = [header, *parts]
        if self.key is not None:
            bufs.append(self._mac(self.out_dir, self.out_seq, header, list(parts)))
        self.out_seq += 1
        try:
            for b in bufs:
                self.sock.sendall(b)
        except TimeoutError:
            raise ProtocolError("timed out sending to the peer") from None
        except OSError as e:
            raise ProtocolError(f"connection lost: {e.strerror or e}") from None
        self.bytes_sent += length + HEADER.size

    def send_json(self, ftype: T, obj: dict[str, Any]) -> None:
        self.send(ftype, json.dumps(obj, separators=(",", ":")).encode())

    def _read_exact(self, n: int, into: bytearray | memoryview | None = None) -> memoryview:
        view, got = memoryview(into if into is not None else bytearray(n))[:n], 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise ProtocolError("timed out waiting for the peer") from None
            except OSError as e:
                raise ProtocolError(f"connection lost: {e.strerror or e}") from None
            if k == 0:
                raise ProtocolError("the peer closed the connection")
            got += k
        return view

    def recv(self, *expected: T) -> Frame:
        """The next frame. A MEM frame's payload is a view of a reused buffer, valid until
        the next recv(); when mem_sink placed its data in guest memory already, the payload
        is only the 16-byte record header and `direct` is set. Others are bytes."""
        header = bytes(self._read_exact(HEADER.size))
        magic, ftype, flags, length = HEADER.unpack(header)
        if magic != MAGIC:
            raise ProtocolError("bad frame magic: not a pyhyve migration stream")
        try:
            kind = T(ftype)
        except ValueError:
            raise ProtocolError(f"unknown frame type {ftype}") from None
        if flags != 0 or length > LIMITS[kind]:
            raise ProtocolError(f"{kind.name} frame of {length} bytes is over its limit")
        direct = False
        if kind == T.MEM and length >= MEM_HEADER.size:
            head = self._read_exact(MEM_HEADER.size, self._head)
            first, count, enc = MEM_HEADER.unpack_from(head)
            rest = length - MEM_HEADER.size
            dest = self.mem_sink(first, count, enc, rest) if self.mem_sink else None
            if dest is not None and len(dest) == rest:
                self._read_exact(rest, dest)
                payload: bytes | memoryview = head
                parts: list[bytes | memoryview] = [head, dest]
                direct = True
            else:
                if self._big is None:  # 8 MiB: only touched when a frame needs it
                    self._big = bytearray(LIMITS[T.MEM])
                self._big[:MEM_HEADER.size] = head
                self._read_exact(rest, memoryview(self._big)[MEM_HEADER.size:])
                payload = memoryview(self._big)[:length]
                parts = [payload]
        else:
            payload = bytes(self._read_exact(length)) if length else b""
            parts = [payload]
        if self.key is not None:
            mac = bytes(self._read_exact(MAC_LEN))
            if not hmac.compare_digest(mac, self._mac(self.in_dir, self.in_seq, header, parts)):
                raise ProtocolError("frame authentication failed (tampered or wrong key)")
        self.in_seq += 1
        self.bytes_received += length + HEADER.size
        if kind in (T.REFUSE, T.ERROR) and kind not in expected:
            reason = Frame(kind, payload).json(max_depth=1).get("reason", "no reason given")
            raise PeerError(str(reason)[:1000])
        if expected and kind not in expected:
            raise ProtocolError(f"expected {'/'.join(e.name for e in expected)}, got {kind.name}")
        return Frame(kind, payload, direct)

    def readable(self, timeout: float) -> bool:
        """Has the peer sent something (bytes TLS holds decrypted count too)?"""
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        try:
            return bool(select.select([self.sock], [], [], timeout)[0])
        except (OSError, ValueError):  # closed under us: the next recv says so
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
