"""The split virtqueue (virtio 1.x, section 2.7), shared by every virtio device.

Descriptor tables and rings live in guest memory and everything in them is the guest's to
choose, so every read is checked: a head or next index past the table, a chain longer than
the table (a loop), a buffer outside guest RAM, an indirect table that is empty, ragged,
nested or chained, a readable buffer after a writable one, a chain of more than
MAX_CHAIN_BYTES, an available index that moves by more than the queue size: each is a
QueueError, on which the device sets NEEDS_RESET. Nothing is allocated from a guest number
before it is bounded, and no byte outside guest RAM is read or written.

Completions go into the used ring entry first and the used index after (x86 keeps stores
in order), through GuestMemory.write, so dirty tracking sees them. With
VIRTIO_RING_F_EVENT_IDX the device keeps avail_event current and signals the driver only as
used_event asks.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Protocol

DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768          # the spec's limit; a device offers less (QUEUE_SIZE below)
MAX_CHAIN_BYTES = 64 << 20      # one request's buffers, at most
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")


_FENCE = threading.Lock()


def _fence() -> None:
    """A full memory barrier: x86 may let a load overtake an earlier store to another
    address; a locked instruction (taking a lock is one) forbids it."""
    _FENCE.acquire()
    _FENCE.release()


class QueueError(ValueError):
    """The driver broke the ring protocol: the device needs a reset."""


class Memory(Protocol):
    def read(self, gpa: int, length: int) -> bytes: ...
    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...


@dataclass(frozen=True)
class Segment:
    gpa: int
    length: int
    writable: bool


@dataclass
class Chain:
    """One request: its head index (what the used ring names) and its buffers."""

    head: int
    readable: list[Segment] = field(default_factory=list)
    writable: list[Segment] = field(default_factory=list)

    @property
    def in_bytes(self) -> int:
        return sum(s.length for s in self.readable)

    @property
    def out_room(self) -> int:
        return sum(s.length for s in self.writable)

    def read(self, mem: Memory, limit: int = MAX_CHAIN_BYTES) -> bytes:
        """The readable buffers, concatenated (at most `limit` bytes)."""
        out = bytearray()
        for s in self.readable:
            take = min(s.length, limit - len(out))
            if take <= 0:
                break
            out += _read(mem, s.gpa, take)
        return bytes(out)

    def write(self, mem: Memory, data: bytes | memoryview, offset: int = 0) -> int:
        """Write `data` into the writable buffers from byte `offset` on; returns how much
        fitted."""
        data = memoryview(data)
        done = 0
        for s in self.writable:
            if offset >= s.length:
                offset -= s.length
                continue
            n = min(s.length - offset, len(data) - done)
            _write(mem, s.gpa + offset, data[done:done + n])
            done += n
            offset = 0
            if done == len(data):
                break
        return done


def _read(mem: Memory, gpa: int, length: int) -> bytes:
    try:
        return mem.read(gpa, length)
    except ValueError:
        raise QueueError(f"guest range {gpa:#x}+{length:#x} is not RAM") from None


def _write(mem: Memory, gpa: int, data: bytes | bytearray | memoryview) -> None:
    try:
        mem.write(gpa, data)
    except ValueError:
        raise QueueError(f"guest range {gpa:#x}+{len(data):#x} is not RAM") from None


@dataclass
class Virtqueue:
    """One queue's registers (what the transport's common config programs) and the
    device's position in its rings."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0
    vector: int = 0xFFFF           # MSI-X vector (NO_VECTOR)
    last_avail: int = 0            # next available entry the device will take (16-bit)
    next_used: int = 0             # next used entry the device will fill (16-bit)
    signalled_used: int = 0        # used index at the last interrupt (event index)
    event_idx: bool = False

    def __post_init__(self) -> None:
        if not self.size:
            self.size = self.max_size

    def reset(self) -> None:
        self.size, self.ready, self.desc, self.avail, self.used = self.max_size, False, 0, 0, 0
        self.vector, self.last_avail, self.next_used, self.signalled_used = 0xFFFF, 0, 0, 0

    def check_layout(self, mem: Memory) -> None:
        """At enable: the size is a power of two the device allows, the rings are aligned
        and in guest RAM."""
        if not 0 < self.size <= self.max_size or self.size & (self.size - 1):
            raise QueueError(f"queue size {self.size} is not a power of two up to "
                             f"{self.max_size}")
        for addr, length, align, what in ((self.desc, 16 * self.size, 16, "descriptor table"),
                                          (self.avail, 6 + 2 * self.size, 2, "available ring"),
                                          (self.used, 6 + 8 * self.size, 4, "used ring")):
            if addr % align:
                raise QueueError(f"{what} at {addr:#x} is not {align}-byte aligned")
            _read(mem, addr, length)

    def _u16(self, mem: Memory, gpa: int) -> int:
        return int(_U16.unpack(_read(mem, gpa, 2))[0])

    def pending(self, mem: Memory) -> int:
        """How many requests the driver has made available that the device has not taken."""
        n = (self._u16(mem, self.avail + 2) - self.last_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(f"available index moved by {n}, more than the queue size "
                             f"{self.size}")
        return n

    def pop(self, mem: Memory) -> Chain | None:
        """The next available request, checked, or None."""
        if not self.ready:
            return None
        if self.pending(mem) == 0:
            if not self.event_idx:
                return None
            # ask the driver to notify for the next one, then look again: a request it
            # made before it could see avail_event would otherwise wait forever
            _write(mem, self.used + 4 + 8 * self.size, _U16.pack(self.last_avail))
            _fence()
            if self.pending(mem) == 0:
                return None
        head = self._u16(mem, self.avail + 4 + 2 * (self.last_avail % self.size))
        chain = self._walk(mem, head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def _walk(self, mem: Memory, head: int) -> Chain:
        chain = Chain(head)
        table, entries, idx, indirect = self.desc, self.size, head, False
        seen, total = 0, 0
        while True:
            if idx >= entries:
                raise QueueError(f"descriptor index {idx} is outside a table of {entries}")
            seen += 1
            if seen > entries:
                raise QueueError("descriptor chain loops")
            addr, length, flags, nxt = _DESC.unpack(_read(mem, table + 16 * idx, 16))
            if flags & DESC_F_INDIRECT:
                if indirect or flags & DESC_F_NEXT:
                    raise QueueError("indirect descriptor nested or chained")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise QueueError(f"indirect table of {length} bytes")
                table, entries, idx, indirect, seen = addr, length // 16, 0, True, 0
                continue
            if length:
                _read(mem, addr, 1)
                _read(mem, addr + length - 1, 1)  # both ends in RAM (regions are contiguous)
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise QueueError(f"request of more than {MAX_CHAIN_BYTES} bytes")
                if flags & DESC_F_WRITE:
                    chain.writable.append(Segment(addr, length, True))
                elif chain.writable:
                    raise QueueError("a readable buffer follows a writable one")
                else:
                    chain.readable.append(Segment(addr, length, False))
            if not flags & DESC_F_NEXT:
                return chain
            idx = nxt

    def push(self, mem: Memory, head: int, written: int) -> None:
        """Complete request `head`, having written `written` bytes into its buffers."""
        slot = self.used + 4 + 8 * (self.next_used % self.size)
        _write(mem, slot, _USED.pack(head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        _write(mem, self.used + 2, _U16.pack(self.next_used))

    def should_signal(self, mem: Memory) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        if self.next_used == self.signalled_used:
            return False
        _fence()  # the used index is out before the driver's wishes are read
        if self.event_idx:
            event = self._u16(mem, self.avail + 4 + 2 * self.size)
            old, new = self.signalled_used, self.next_used
            want = ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            want = not self._u16(mem, self.avail) & AVAIL_F_NO_INTERRUPT
        self.signalled_used = self.next_used
        return want
