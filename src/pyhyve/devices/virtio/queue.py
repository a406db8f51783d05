"""The split virtqueue (virtio 1.x, section 2.7), shared by every virtio device.

Descriptor tables and rings live in guest memory and everything in them is the guest's to
choose, so every read is checked: a head or next index past the table, a chain longer than
the table (a loop), a buffer outside guest RAM, an indirect table that is empty, ragged,
nested or chained, a readable buffer after a writable one, a chain of more than
MAX_CHAIN_BYTES, an available index that moves by more than the queue size: each is a
QueueError, on which the device sets NEEDS_RESET. Nothing is allocated from a guest number
before it is bounded, and no byte outside guest RAM is read or written.

Completions go into the used ring entry first and the used index after (x86 keeps stores
in order), and dirty tracking is told of them. With VIRTIO_RING_F_EVENT_IDX the device keeps
avail_event current and signals the driver only as used_event asks.

The rings are reached through views of guest RAM taken (and checked) once per layout, not
one lookup per access: the ring code runs for every request, in Python. A field the running
driver reads is stored with one slice assignment (one copy of the packed bytes), never
struct.pack_into: that zero-fills the field before writing it, and a driver polling the used
index sees it go to 0 for an instant, takes that for new completions, and reads a stale
entry (a kit guest caught exactly this).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

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
    epoch: int  # changes when views of guest RAM must be taken again (post-copy)

    def read(self, gpa: int, length: int) -> bytes: ...
    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...
    def span(self, gpa: int, length: int) -> memoryview: ...
    def address(self, gpa: int, length: int) -> int: ...
    def mark_written(self, gpa: int, length: int) -> None: ...


class Segment(NamedTuple):  # a tuple: made for every descriptor of every request
    gpa: int
    length: int
    writable: bool
    host: int = 0  # its host address when the chain was walked (0: look it up)


class Chain:
    """One request: its head index (what the used ring names) and its buffers. A plain
    class with slots: one is made for every request, in Python."""

    __slots__ = ("epoch", "head", "in_bytes", "out_room", "readable", "writable")

    def __init__(self, head: int, readable: list[Segment] | None = None,
                 writable: list[Segment] | None = None, epoch: int = -1,
                 in_bytes: int = -1, out_room: int = -1) -> None:
        self.head = head
        self.readable = readable if readable is not None else []
        self.writable = writable if writable is not None else []
        self.epoch = epoch  # the memory's epoch its host addresses belong to (-1: none)
        # the buffers' sizes, readable and writable (the walk counts them as it goes)
        self.in_bytes = in_bytes if in_bytes >= 0 else sum(s.length for s in self.readable)
        self.out_room = out_room if out_room >= 0 else sum(s.length for s in self.writable)

    def __repr__(self) -> str:
        return f"Chain({self.head}, {self.readable}, {self.writable})"

    def read(self, mem: Memory, limit: int = MAX_CHAIN_BYTES) -> bytes:
        """The readable buffers, concatenated (at most `limit` bytes)."""
        if self.readable and self.readable[0].length >= limit:  # a header in its own buffer
            return _read(mem, self.readable[0].gpa, limit)
        out = bytearray()
        for s in self.readable:
            take = min(s.length, limit - len(out))
            if take <= 0:
                break
            out += _read(mem, s.gpa, take)
        return bytes(out)

    def _pieces(self, writable: bool, skip: int,
                length: int) -> Iterator[tuple[Segment, int, int]]:
        """(segment, offset in it, length) of `length` bytes of the readable (or writable)
        buffers, from byte `skip` on."""
        for s in self.writable if writable else self.readable:
            if length <= 0:
                return
            if skip >= s.length:
                skip -= s.length
                continue
            n = min(s.length - skip, length)
            yield s, skip, n
            length -= n
            skip = 0

    def views(self, mem: Memory, writable: bool, skip: int, length: int) -> list[memoryview]:
        """Views of those bytes, for I/O straight into or out of guest RAM (whoever writes
        into them calls mark())."""
        return [_span(mem, s.gpa + off, n) for s, off, n in self._pieces(writable, skip, length)]

    def spans(self, mem: Memory, writable: bool, skip: int,
              length: int) -> list[tuple[int, int]]:
        """Like views(), as (host address, length): for I/O the kernel does on its own
        time (AIO), which needs no Python object to hold the memory. The addresses the
        walk found are used while guest RAM is still mapped where it was then."""
        known = self.epoch == mem.epoch
        return [(s.host + off if known and s.host else _check(mem, s.gpa + off, n), n)
                for s, off, n in self._pieces(writable, skip, length)]

    def mark(self, mem: Memory, length: int) -> None:
        """Tell dirty tracking that the first `length` writable bytes were written through
        views() or spans()."""
        for s, off, n in self._pieces(True, 0, length):
            gpa = s.gpa + off
            try:
                mem.mark_written(gpa, n)
            except ValueError:
                raise QueueError(f"guest range {gpa:#x}+{n:#x} is not RAM") from None

    def write_last(self, mem: Memory, data: bytes) -> None:
        """`data` as the last bytes of the writable buffers (a status byte's place)."""
        s = self.writable[-1] if self.writable else None
        if s is not None and s.length >= len(data):
            _write(mem, s.gpa + s.length - len(data), data)
        elif self.out_room < len(data) or \
                self.write(mem, data, self.out_room - len(data)) != len(data):
            raise QueueError("no room for the status")

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


def _span(mem: Memory, gpa: int, length: int) -> memoryview:
    try:
        return mem.span(gpa, length)
    except ValueError:
        raise QueueError(f"guest range {gpa:#x}+{length:#x} is not RAM") from None


def _check(mem: Memory, gpa: int, length: int) -> int:
    """The host address of a guest range, which must lie in RAM."""
    try:
        return mem.address(gpa, length)
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
    # views of the descriptor table and the rings, for the layout in _key
    _key: tuple[Any, ...] = field(default=(), init=False, repr=False, compare=False)
    _desc_v: memoryview = field(default=memoryview(b""), init=False, repr=False, compare=False)
    _avail_v: memoryview = field(default=memoryview(b""), init=False, repr=False, compare=False)
    _used_v: memoryview = field(default=memoryview(b""), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.size:
            self.size = self.max_size

    def _rings(self, mem: Memory) -> None:
        """Take views of the table and rings where the driver put them (once per layout)."""
        key = (id(mem), mem.epoch, self.desc, self.avail, self.used, self.size)
        if key == self._key:
            return
        n = self.size
        try:
            self._desc_v = mem.span(self.desc, 16 * n)
            self._avail_v = mem.span(self.avail, 6 + 2 * n)
            self._used_v = mem.span(self.used, 6 + 8 * n)
        except ValueError:
            self._key = ()
            raise QueueError("the queue's rings are not in guest RAM") from None
        self._key = key

    def forget(self) -> None:
        """Let go of the ring views (the device is closing; guest RAM may be unmapped)."""
        for v in (self._desc_v, self._avail_v, self._used_v):
            v.release()
        self._desc_v = self._avail_v = self._used_v = memoryview(b"")
        self._key = ()

    def _used_written(self, mem: Memory, offset: int, length: int) -> None:
        try:
            mem.mark_written(self.used + offset, length)
        except ValueError:
            raise QueueError("the used ring is not in guest RAM") from None

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
        self._key = ()

    def pending(self, mem: Memory) -> int:
        """How many requests the driver has made available that the device has not taken."""
        self._rings(mem)
        n = (int(_U16.unpack_from(self._avail_v, 2)[0]) - self.last_avail) & 0xFFFF
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
            at = 4 + 8 * self.size
            self._used_v[at:at + 2] = _U16.pack(self.last_avail)
            self._used_written(mem, 4 + 8 * self.size, 2)
            _fence()
            if self.pending(mem) == 0:
                return None
        head = _U16.unpack_from(self._avail_v, 4 + 2 * (self.last_avail % self.size))[0]
        chain = self._walk(mem, head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def _walk(self, mem: Memory, head: int) -> Chain:
        readable: list[Segment] = []
        writable: list[Segment] = []
        epoch, in_bytes, out_room = mem.epoch, 0, 0
        win = mem.window() if hasattr(mem, "window") else None  # RAM checked inline
        lo, hi, delta = win if win is not None else (1, 0, 0)
        table, entries, idx, indirect = self._desc_v, self.size, head, False
        seen, total = 0, 0
        while True:
            if idx >= entries:
                raise QueueError(f"descriptor index {idx} is outside a table of {entries}")
            seen += 1
            if seen > entries:
                raise QueueError("descriptor chain loops")
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * idx)
            if flags & DESC_F_INDIRECT:
                if indirect or flags & DESC_F_NEXT:
                    raise QueueError("indirect descriptor nested or chained")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise QueueError(f"indirect table of {length} bytes")
                table = _span(mem, addr, length)
                entries, idx, indirect, seen = length // 16, 0, True, 0
                continue
            if length:  # all of it in guest RAM
                host = addr + delta if lo <= addr and addr + length <= hi else \
                    _check(mem, addr, length)
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise QueueError(f"request of more than {MAX_CHAIN_BYTES} bytes")
                if flags & DESC_F_WRITE:
                    writable.append(Segment(addr, length, True, host))
                    out_room += length
                elif writable:
                    raise QueueError("a readable buffer follows a writable one")
                else:
                    readable.append(Segment(addr, length, False, host))
                    in_bytes += length
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable, epoch, in_bytes, out_room)
            idx = nxt

    def push(self, mem: Memory, head: int, written: int) -> None:
        """Complete request `head`, having written `written` bytes into its buffers."""
        self.push_many(mem, ((head, written),))

    def push_many(self, mem: Memory, done: Iterable[tuple[int, int]]) -> None:
        """Complete requests (head, bytes written): their used entries first, then the used
        index once (the driver sees the batch together, and it is one store and one dirty
        mark instead of one a request)."""
        self._rings(mem)
        used, size, idx = self._used_v, self.size, self.next_used
        for head, written in done:
            slot = 4 + 8 * (idx % size)
            used[slot:slot + 8] = _USED.pack(head, written)
            idx = (idx + 1) & 0xFFFF
        self.next_used = idx
        used[2:4] = _U16.pack(idx)  # not pack_into (module docstring)
        self._used_written(mem, 0, 4 + 8 * size)

    def should_signal(self, mem: Memory) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        if self.next_used == self.signalled_used:
            return False
        _fence()  # the used index is out before the driver's wishes are read
        self._rings(mem)
        if self.event_idx:
            event = _U16.unpack_from(self._avail_v, 4 + 2 * self.size)[0]
            old, new = self.signalled_used, self.next_used
            want = ((new - int(event) - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            want = not int(_U16.unpack_from(self._avail_v, 0)[0]) & AVAIL_F_NO_INTERRUPT
        self.signalled_used = self.next_used
        return want
