"""MSI-X for a virtio function: the vector table and pending bits in BAR0, the enable and
function-mask bits in its capability. A vector fires through its irqfd where the VM has
them (an eventfd write; KVM sends the message the table holds), else by KVM_SIGNAL_MSI; a
masked one (or a masked function) is remembered in the pending bits and fires when
unmasked."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Sequence
from typing import Protocol

from ..pci import PciFunction


class Irqfd(Protocol):
    """One vector's eventfd in KVM (machine/irqroute.py's MsiVector)."""

    def route(self, address: int, data: int) -> bool: ...
    def fire(self) -> None: ...


class Msix:
    def __init__(self, vectors: int, function: PciFunction, cap: int,
                 signal: Callable[[int, int], bool],
                 irqfds: Sequence[Irqfd] | None = None) -> None:
        self.vectors, self.function, self.cap, self.signal = vectors, function, cap, signal
        self.irqfds = irqfds if irqfds is not None and len(irqfds) >= vectors else None
        self.table = bytearray(16 * vectors)
        for v in range(vectors):  # every vector starts masked
            struct.pack_into("<I", self.table, 16 * v + 12, 1)
        self.pending = 0

    @property
    def enabled(self) -> bool:
        return bool(self.function.config[self.cap + 3] & 0x80)

    def _masked(self, vector: int) -> bool:
        entry = struct.unpack_from("<I", self.table, 16 * vector + 12)[0] & 1
        return bool(entry or self.function.config[self.cap + 3] & 0x40)

    def read_table(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            return 0
        return int.from_bytes(self.table[offset:offset + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        """Aligned 4- and 8-byte stores inside the table; anything else is ignored."""
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            return
        self.table[offset:offset + size] = value.to_bytes(size, "little")
        self.deliver_pending()

    def read_pending(self, offset: int, size: int) -> int:
        return (self.pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def fire(self, vector: int, sync: bool = False) -> None:
        """Signal `vector` (MSI-X enabled): now, or when it is unmasked. `sync`: in the
        local APIC when this returns (a device quiescing for a capture): KVM may inject an
        irqfd's message later, from a work queue, and it must not miss the snapshot."""
        if vector >= self.vectors:
            return  # NO_VECTOR or out of range: the driver asked for no interrupt
        if self._masked(vector):
            self.pending |= 1 << vector
            return
        self._send(vector, sync)

    def _send(self, vector: int, sync: bool = False) -> None:
        addr, data = struct.unpack_from("<QI", self.table, 16 * vector)
        if not sync and self.irqfds is not None and self.irqfds[vector].route(addr, data):
            self.irqfds[vector].fire()  # routed to this very message (set on a change)
            return
        with contextlib.suppress(Exception):  # a message KVM cannot route: the guest's loss
            self.signal(addr, data)

    def deliver_pending(self) -> None:
        if not self.enabled:
            return
        for v in range(self.vectors):
            if self.pending >> v & 1 and not self._masked(v):
                self.pending &= ~(1 << v)
                self._send(v)

    def load(self, table: bytes, pending: int) -> None:
        if len(table) != len(self.table):
            raise ValueError("virtio: saved MSI-X table has another size")
        self.table[:] = table
        self.pending = pending & ((1 << self.vectors) - 1)
