"""The VM generation ID: 128 random bits that change whenever the guest's memory may have
been duplicated or rolled back (restore, clone), so the guest can reseed its RNGs and drop
cached secrets -- the idea of Microsoft's and QEMU's ACPI VMGENID, for machines without
ACPI. A live migration keeps it (nothing was duplicated).

Guest interface (read-only MMIO at description.GENID_BASE, 0xFED02000: in the MMIO hole,
clear of the IOAPIC, HPET and LAPIC pages; any access of 1, 2, 4 or 8 bytes):
    +0   the 16-byte generation ID (read it as two little-endian u64)
    +16  u64 counter: 1 at boot, one more on every restore or clone
    +24  u64 magic "PYHYVEID" (0x4449455659485950), so a guest can tell the page is there
Writes are ignored. A guest polls the counter (cheap: one exit) and re-reads the ID when it
moves.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from .base import Device, DeviceState

MAGIC = 0x4449455659485950
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class VmGenIdState(DeviceState):
    NAME: ClassVar[str] = "VmGenIdState"
    genid: str = "0" * 32   # hex
    counter: int = 1


class VmGenId(Device):
    kind = "vmgenid"
    state_class = VmGenIdState

    def __init__(self) -> None:
        super().__init__()
        self.genid = os.urandom(16)
        self.counter = 1

    def renew(self) -> None:
        """A new generation: the guest's memory is now a copy (restore, clone)."""
        with self.lock:
            self.genid = os.urandom(16)
            self.counter = (self.counter + 1) & ((1 << 64) - 1)

    def status(self) -> dict[str, str]:
        return {"generation_id": self.genid.hex()}

    def read(self, offset: int, size: int) -> int:
        page = self.genid + struct.pack("<QQ", self.counter, MAGIC)
        if size not in (1, 2, 4, 8) or offset + size > len(page):
            return 0
        return int.from_bytes(page[offset:offset + size], "little")

    def save(self) -> VmGenIdState:
        return VmGenIdState(self.genid.hex(), self.counter)

    def load_state(self, state: DeviceState) -> None:
        if not isinstance(state, VmGenIdState) or not _HEX32.match(state.genid) \
                or not isinstance(state.counter, int) or not 0 <= state.counter < 1 << 64:
            raise ValueError("vmgenid: bad state")
        self.genid, self.counter = bytes.fromhex(state.genid), state.counter
