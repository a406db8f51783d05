"""Guest RAM: memfd-backed regions mapped into the VMM and registered with KVM.

memfd lets the same pages later be written to a snapshot, sent over a socket, or replaced by
a private mapping of a snapshot file (lazy restore) without changing anything above here.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PAGE = 4096
_libc = C.CDLL(None, use_errno=True)
MMIO_HOLE_START = 0xC000_0000  # 3 GiB: PCI/LAPIC/IOAPIC window below 4 GiB
MMIO_HOLE_END = 0x1_0000_0000


@dataclass(frozen=True)
class RegionLayout:
    """Where one RAM region sits in guest-physical space and in the backing file."""

    guest_phys_addr: int
    size: int
    file_offset: int


def ram_layout(size: int) -> list[RegionLayout]:
    """Split RAM around the MMIO hole below 4 GiB; file offsets are contiguous."""
    if size <= MMIO_HOLE_START:
        return [RegionLayout(0, size, 0)]
    return [RegionLayout(0, MMIO_HOLE_START, 0),
            RegionLayout(MMIO_HOLE_END, size - MMIO_HOLE_START, MMIO_HOLE_START)]


class Region:
    """One contiguous RAM region, mapped at a host address."""

    def __init__(self, layout: RegionLayout, mm: mmap.mmap) -> None:
        self.layout = layout
        self.mm = mm
        self.host_addr = C.addressof(C.c_char.from_buffer(mm))

    @cached_property
    def array(self) -> np.ndarray:
        """The region as uint8 (numpy is imported on first use: it costs ~90 ms at start)."""
        import numpy as np

        return np.frombuffer(self.mm, dtype=np.uint8)

    @property
    def gpa(self) -> int:
        return self.layout.guest_phys_addr

    @property
    def size(self) -> int:
        return self.layout.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestMemory:
    """All guest RAM. Either a fresh memfd (shared mapping) or a private file mapping."""

    def __init__(self, size: int, backing_fd: int | None = None, private: bool = False,
                 name: str = "pyhyve-ram") -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"memory size must be a positive multiple of {PAGE}")
        self.size = size
        self.private = private
        if backing_fd is None:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
        else:
            self.fd = os.dup(backing_fd)
        self.regions: list[Region] = []
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        for lay in ram_layout(size):
            mm = mmap.mmap(self.fd, lay.size, flags=flags,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=lay.file_offset)
            if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE") and not private:
                with contextlib.suppress(OSError):
                    mm.madvise(mmap.MADV_HUGEPAGE)
            self.regions.append(Region(lay, mm))

    def region_for(self, gpa: int, length: int = 1) -> Region:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        r = self.region_for(gpa, len(data))
        off = gpa - r.gpa
        r.mm[off:off + len(data)] = data

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        r = self.region_for(gpa, length)
        C.memset(r.host_addr + gpa - r.gpa, value, length)

    def read(self, gpa: int, length: int) -> bytes:
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return r.mm[off:off + length]

    def view(self, gpa: int, length: int) -> np.ndarray:
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return r.array[off:off + length]

    def pieces(self, off: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
        """(file offset, length) pieces of [off, end), at most `limit` long, never crossing
        a region edge (regions are contiguous in the snapshot file, not in guest memory)."""
        while off < end:
            n = min(limit, end - off)
            for r in self.regions:
                lo, hi = r.layout.file_offset, r.layout.file_offset + r.size
                if lo <= off < hi:
                    n = min(n, hi - off)
                    break
            else:
                raise ValueError(f"file offset {off:#x} is not guest RAM")
            yield off, n
            off += n

    MADV_POPULATE_WRITE = 23  # Linux 5.14+

    def populate(self, off: int, length: int) -> None:
        """Fault in [off, off+length) (file offsets) for writing, without touching data.
        Through ctypes, which drops the GIL (mmap.madvise holds it for the whole call)."""
        for r in self.regions:
            base = r.layout.file_offset
            if base <= off and off + length <= base + r.size:
                _libc.madvise(C.c_void_p(r.host_addr + off - base), C.c_size_t(length),
                              self.MADV_POPULATE_WRITE)
                return

    def file_view(self, off: int, length: int) -> memoryview:
        """Guest RAM by file offset; the range must lie in one region."""
        for r in self.regions:
            base = r.layout.file_offset
            if base <= off and off + length <= base + r.size:
                return memoryview(r.mm)[off - base:off - base + length]
        raise ValueError(f"file range {off:#x}+{length:#x} is not in one RAM region")

    def close(self) -> None:
        for r in self.regions:
            r.__dict__.pop("array", None)
            with contextlib.suppress(BufferError):  # a numpy view still alive elsewhere
                r.mm.close()
        self.regions = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
