"""PCI host bridge on configuration mechanism #1 (ports 0xCF8 address, 0xCFC data), and
the same configuration spaces through ECAM (PciEcam: memory-mapped, 4 KiB per function).

Bus 0, device 0 is the host bridge itself; the virtio work adds devices with
`add()`. Absent functions read as all ones, which is how a guest discovers them missing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .base import Device, DeviceState


@dataclass(frozen=True)
class PciHostState(DeviceState):
    NAME: ClassVar[str] = "PciHostState"
    address: int = 0
    configs: tuple[tuple[int, int, int, bytes], ...] = ()  # (bus, dev, fn, config space)


class PciFunction:
    """A function's 256-byte configuration space with a write mask (writable bits)."""

    def __init__(self, vendor: int, device: int, class_code: int, header_type: int = 0) -> None:
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        struct.pack_into("<HH", self.config, 0, vendor, device)
        struct.pack_into("<I", self.config, 8, class_code << 8)  # revision 0
        self.config[0x0E] = header_type
        self.wmask[0x04:0x06] = b"\x07\x05"  # command: io, mem, master, parity, intx-disable
        self.wmask[0x0C] = 0xFF  # cache line size
        self.wmask[0x0D] = 0xFF  # latency timer
        self.wmask[0x3C] = 0xFF  # interrupt line
        # told of every write: (register, size, the bytes before), for BARs and capabilities
        self.on_write: Callable[[int, int, bytes], None] | None = None
        self.on_read: Callable[[int, int], None] | None = None  # may refresh bytes first

    def read(self, reg: int, size: int) -> int:
        if self.on_read is not None:
            self.on_read(reg, size)
        return int.from_bytes(self.config[reg:reg + size], "little")

    def write(self, reg: int, size: int, value: int) -> None:
        if reg + size > len(self.config):
            return
        old = bytes(self.config[reg:reg + size])
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            m = self.wmask[reg + i]
            self.config[reg + i] = (self.config[reg + i] & ~m) | (b & m)
        if self.on_write is not None:
            self.on_write(reg, size, old)


class PciHostBridge(Device):
    kind = "pci-host"
    state_class = PciHostState
    BASE = 0xCF8  # 0xCF8..0xCFF

    def __init__(self) -> None:
        super().__init__()
        self.address = 0
        # Red Hat/QEMU vendor id space is not ours to use; 0x1b36 is avoided. Host bridge
        # class 0x060000 is what matters to guests.
        self.functions: dict[tuple[int, int, int], PciFunction] = {
            (0, 0, 0): PciFunction(0x8086, 0x0D57, 0x060000)}

    def add(self, slot: int, function: PciFunction) -> None:
        if (0, slot, 0) in self.functions:
            raise ValueError(f"PCI slot {slot} is taken")
        self.functions[(0, slot, 0)] = function

    def _target(self) -> tuple[PciFunction | None, int]:
        if not self.address & 0x8000_0000:
            return None, 0
        bus = (self.address >> 16) & 0xFF
        dev = (self.address >> 11) & 0x1F
        fn = (self.address >> 8) & 0x7
        return self.functions.get((bus, dev, fn)), self.address & 0xFC

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return (self.address >> (8 * offset)) & ((1 << (8 * size)) - 1)
        f, reg = self._target()
        if f is None:
            return (1 << (8 * size)) - 1
        return f.read(reg + (offset - 4), size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & 0x80FF_FFFC
            return
        if offset < 4:
            return
        f, reg = self._target()
        if f is not None:
            f.write(reg + (offset - 4), size, value)


    def save(self) -> PciHostState:
        return PciHostState(self.address, tuple((b, d, f, bytes(fn.config))
                                                for (b, d, f), fn in sorted(self.functions.items())))

    def load_state(self, state: DeviceState) -> None:
        if not isinstance(state, PciHostState):
            raise ValueError("pci-host: wrong state type")
        for b, d, f, cfg in state.configs:
            fn = self.functions.get((b, d, f))
            if fn is None or len(cfg) != 256:
                raise ValueError(f"pci-host: saved function {b:02x}:{d:02x}.{f} does not exist here")
            fn.config[:] = cfg
        self.address = state.address & 0x80FF_FFFC


class PciEcam(Device):
    """ECAM (PCIe enhanced configuration access) for bus 0: function (d, f)'s space at
    base + (d << 15 | f << 12). Only the first 256 bytes exist (conventional functions);
    the extended space reads as zero. The functions are the host bridge's, under its lock."""

    kind = "pci-ecam"
    BASE, LENGTH = 0xF000_0000, 1 << 20  # bus 0 only (description.ECAM_BASE)

    def __init__(self, host: PciHostBridge) -> None:
        super().__init__()
        self.host = host

    def _target(self, offset: int) -> tuple[PciFunction | None, int]:
        dev, fn, reg = (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF
        return self.host.functions.get((0, dev, fn)), reg

    def read(self, offset: int, size: int) -> int:
        f, reg = self._target(offset)
        if f is None:
            return (1 << (8 * size)) - 1
        if reg + size > 256:
            return 0
        with self.host.lock:
            return f.read(reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        f, reg = self._target(offset)
        if f is not None and reg + size <= 256:
            with self.host.lock:
                f.write(reg, size, value)
