"""virtio-net (virtio 1.x, 5.1), one queue pair, on a tap device or in loop mode.

Backend spec (--net, --bind netN=...): `tap:NAME[,mac=MAC]` (an existing or new tap
interface, opened with IFF_TAP|IFF_NO_PI), or `loop[,mac=MAC]`: every frame the guest sends
comes back to it (for tests, and a guest with no network). Frames carry the 12-byte
virtio_net_hdr_v1 on the rings, no offloads; the VMM adds and strips it.

The device's worker thread polls the tap itself (`completion_fd`; `reap` reads what it
holds): a reader thread of its own handed every frame over to the worker, a thread
switch per frame that cost more than the frame. Received frames wait in the device (at
most MAX_PENDING; more are dropped and counted, as a NIC drops) until the guest offers
receive buffers; a receive request with nothing to
deliver goes back into the ring (WAIT), so no request is held across a save. The state is
the MAC and the frames not yet delivered. The MAC is the guest's: it comes from the state
at restore and migration, from `mac=` or a random locally administered one at boot, and a
clone gets a fresh one (`newmac`, set by a clone's restore) unless `mac=` says otherwise.
After a live migration the destination announces the MAC on its tap at once (three RARP
frames, as QEMU's self-announce), so switches and peers learn where the guest went.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fcntl
import json
import os
import re
import struct
import threading
from collections.abc import Callable

from ...errors import PyhyveError
from .backend import WAIT
from .queue import Chain, Memory

F_MAC, F_STATUS = 1 << 5, 1 << 16
HDR = 12
MAX_FRAME = 65536
MAX_PENDING = 256
TAP_BATCH = 64  # frames read per wake-up of the worker
RX, TX = 0, 1
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class NetError(PyhyveError, ValueError):
    pass


def random_mac() -> bytes:
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02  # unicast, locally administered
    return bytes(b)


def parse_net(spec: str) -> tuple[str, str, bytes | None, bool]:
    """-> (kind "tap"|"loop", tap name, MAC given or None, new MAC wanted)."""
    head, *opts = spec.split(",")
    kind, _, name = head.partition(":")
    if kind == "tap" and (not name or len(name) > 15 or "/" in name):
        raise NetError(f"bad net '{spec}': use tap:NAME (at most 15 characters)")
    if kind not in ("tap", "loop") or (kind == "loop" and name):
        raise NetError(f"bad net '{spec}': use tap:NAME[,mac=MAC] or loop[,mac=MAC]")
    mac, new = None, False
    for o in opts:
        if o.startswith("mac=") and _MAC.match(o[4:].lower()):
            mac = bytes.fromhex(o[4:].replace(":", ""))
        elif o == "newmac":
            new = True
        else:
            raise NetError(f"bad net option '{o}' in '{spec}'")
    return kind, name, mac, new


def rarp(mac: bytes) -> bytes:
    """A RARP request from `mac` to everyone: what QEMU announces a moved guest with."""
    return (b"\xff" * 6 + mac + b"\x80\x35" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3)
            + mac + bytes(4) + mac + bytes(4)).ljust(60, b"\0")


class Net:
    device_type = 1
    class_code = 0x020000
    queue_sizes: tuple[int, ...] = (256, 256)

    def __init__(self, spec: str) -> None:
        self.kind, self.ifname, given, self.new_mac = parse_net(spec)
        self.given = given
        self.mac = given or random_mac()
        self.pending: collections.deque[bytes] = collections.deque()
        self.dropped = 0
        self._lock = threading.Lock()
        self.kick: Callable[[int], None] = lambda queue: None  # set by the transport
        self.tap = -1
        self.completion_fd: int | None = None  # the tap: the transport polls it for reap()
        if self.kind == "tap":
            try:
                self.tap = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                fcntl.ioctl(self.tap, TUNSETIFF,
                            struct.pack("16sH14x", self.ifname.encode(), IFF_TAP | IFF_NO_PI))
            except OSError as e:
                if self.tap >= 0:
                    os.close(self.tap)
                raise NetError(f"cannot open tap {self.ifname}: {e.strerror}") from None
            self.completion_fd = self.tap

    def features(self) -> int:
        return F_MAC | F_STATUS

    def config(self) -> bytes:
        return self.mac + struct.pack("<HH", 1, 1)  # link up, one queue pair

    def config_write(self, offset: int, data: bytes) -> None:
        pass

    def reap(self, mem: Memory, limit: int) -> list[tuple[int, Chain, int]]:
        """The tap is readable (the transport polls it): take up to TAP_BATCH frames into
        the device, then let the receive queue be served. Completes no request. Always
        drains, dropping what does not fit: an unread tap would keep poll() awake."""
        frames = []
        for _ in range(TAP_BATCH):
            try:
                frames.append(os.read(self.tap, MAX_FRAME))
            except OSError:  # empty (EAGAIN), or the interface went away: nothing now
                break
        if frames:
            self._arrived(*frames)
        return []

    def _arrived(self, *frames: bytes) -> None:
        with self._lock:
            for frame in frames:
                if len(self.pending) >= MAX_PENDING:
                    self.dropped += 1
                else:
                    self.pending.append(frame)
        self.kick(RX)

    def handle(self, queue: int, chain: Chain, mem: Memory) -> int:
        if queue == TX:
            length = min(chain.in_bytes, HDR + MAX_FRAME) - HDR
            if length <= 0:
                return 0
            if self.kind == "loop":
                self._arrived(chain.read(mem, HDR + MAX_FRAME)[HDR:])
            else:  # straight from guest RAM to the tap, one writev
                views = chain.views(mem, False, HDR, length)
                with contextlib.suppress(OSError):  # a full or downed tap drops it, as a wire
                    os.writev(self.tap, views if len(views) <= 1024 else [b"".join(views)])
            return 0
        with self._lock:
            if not self.pending:
                return WAIT
            frame = self.pending.popleft()
        if chain.out_room < HDR + len(frame):  # a buffer too small for the frame: dropped
            self.dropped += 1
            return chain.write(mem, struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1))
        return chain.write(mem, struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1) + frame)

    def announce(self) -> None:
        """After a live migration: tell the new host's network where the guest is."""
        if self.tap >= 0:
            for _ in range(3):
                try:
                    os.write(self.tap, rarp(self.mac))
                except OSError:
                    return

    def reset(self) -> None:
        with self._lock:
            self.pending.clear()

    def state(self) -> bytes:
        with self._lock:
            return json.dumps({"mac": self.mac.hex(), "dropped": self.dropped,
                               "pending": [base64.b64encode(f).decode()
                                           for f in self.pending]}).encode()

    def load(self, raw: bytes) -> None:
        try:
            st = json.loads(raw)
            mac = bytes.fromhex(st["mac"])
            frames = [base64.b64decode(f, validate=True) for f in st["pending"][:MAX_PENDING]]
            dropped = int(st["dropped"])
        except (ValueError, KeyError, TypeError):
            raise ValueError("virtio-net: saved state is malformed") from None
        if len(mac) != 6 or any(len(f) > MAX_FRAME for f in frames):
            raise ValueError("virtio-net: saved state is malformed")
        if self.given is not None:
            self.mac = self.given     # the command line's MAC wins
        elif not self.new_mac:
            self.mac = mac            # the guest's own
        self.pending, self.dropped = collections.deque(frames), dropped

    def close(self) -> None:
        """(The transport has stopped its worker, the tap's only reader, before this.)"""
        if self.tap >= 0:
            os.close(self.tap)
        self.tap, self.completion_fd = -1, None
