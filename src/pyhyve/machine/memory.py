"""Guest RAM: regions mapped into the VMM and registered with KVM.

A fresh VM's RAM is anonymous memory with transparent huge pages asked for: the first touch
of guest memory is the slowest thing a new guest does (a fault per page, 3-35 us here), and
2 MiB pages make it 512 times rarer. (A memfd would get no huge pages on hosts whose shmem
THP is off, the usual default.) A lazy restore maps the snapshot's memory file privately
instead, its zero stretches anonymous. Either way the pages are found by the same scan
(pipeline/pages.py: the file's data extents plus pagemap's anonymous pages) and read by
file offset, so nothing above here cares which it is.

With `hugetlb` (`--hugepages`) fresh RAM comes from the host's reserved 2 MiB pages
(MAP_HUGETLB, reserved when mapped, so a host without enough of them refuses at once and
the VM falls back to the above instead of dying at a fault later). Those pages never swap,
and pagemap shows them as anonymous pages like any other, so the same scan finds them.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

PAGE = 4096
_libc = C.CDLL(None, use_errno=True)
MMIO_HOLE_START = 0xC000_0000  # 3 GiB: PCI/LAPIC/IOAPIC window below 4 GiB
MMIO_HOLE_END = 0x1_0000_0000
MAP_FIXED, MAP_NORESERVE, MADV_HUGEPAGE, MAP_HUGETLB = 0x10, 0x4000, 14, 0x40000
HUGE_PAGE = 2 << 20
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_FAILED = C.c_void_p(-1).value
_libc.mmap.restype = C.c_void_p
_libc.mmap.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long]
_libc.mremap.restype = C.c_void_p
_libc.mremap.argtypes = [C.c_void_p, C.c_size_t, C.c_size_t, C.c_int, C.c_void_p]
_libc.munmap.argtypes = [C.c_void_p, C.c_size_t]


class MemoryGuard(Protocol):
    """Watches the file a private mapping reads (snapshot/lease.py)."""

    def stop(self) -> None: ...

    def dependency(self) -> dict[str, object]: ...


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
        # plain attributes, not properties: every device access reads them
        self.gpa, self.size = layout.guest_phys_addr, layout.size

    @cached_property
    def array(self) -> np.ndarray:
        """The region as uint8 (numpy is imported on first use: it costs ~90 ms at start)."""
        import numpy as np

        return np.frombuffer(self.mm, dtype=np.uint8)

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestMemory:
    """All guest RAM: fresh anonymous memory, or a private mapping of a snapshot's memory
    file (`backing_fd`). Both are "private": `anonymous` lists the file-offset ranges that
    are anonymous memory (all of it for a fresh VM), `file_backed()` the rest."""

    def __init__(self, size: int, backing_fd: int | None = None,
                 name: str = "pyhyve-ram", hugetlb: bool = False) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"memory size must be a positive multiple of {PAGE}")
        self.size = size
        # post-copy: makes [gpa, gpa+length) present before one of our threads touches it
        # (a GIL holder must never fault on a page only the GIL can bring: machine/uffd.py)
        self.prepare: Callable[[int, int], None] | None = None
        self.epoch = 0  # bumped when pages may have gone: views of guest RAM are taken again
        self.name = name
        self.fd = os.dup(backing_fd) if backing_fd is not None else -1
        self.hugetlb = hugetlb and self.fd < 0 and self._reserve_huge()
        self.regions: list[Region] = []
        for lay in ram_layout(size):
            if self.fd >= 0:
                mm = mmap.mmap(self.fd, lay.size, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=lay.file_offset)
            elif self.hugetlb:
                mm = self._huge.pop(0)
            else:  # untouched pages cost nothing until the guest writes them
                mm = mmap.mmap(-1, lay.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                               | MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                with contextlib.suppress(OSError):
                    mm.madvise(mmap.MADV_HUGEPAGE)
            self.regions.append(Region(lay, mm))
        self._spans = [(r.gpa, r.gpa + r.size, r) for r in self.regions]
        # which file-offset ranges are anonymous memory: all of fresh RAM; of a snapshot's
        # mapping, the zero stretches never read from the file (and the guard that keeps
        # the rest safe)
        self.anonymous: list[tuple[int, int]] = ([] if self.fd >= 0 else
                                                 [(r.layout.file_offset, r.size)
                                                  for r in self.regions])
        self.guard: MemoryGuard | None = None
        # told of the VMM's own writes (first file page, count): the dirty tracker
        self.on_write: Callable[[int, int], None] | None = None

    def _reserve_huge(self) -> bool:
        """Map every region from the host's hugetlb pool (reserved now, faulted later);
        False, with nothing left mapped, if the pool cannot hold all of them."""
        self._huge: list[mmap.mmap] = []
        try:
            for lay in ram_layout(self.size):
                if lay.size % HUGE_PAGE:
                    raise OSError("not a multiple of the huge page size")
                self._huge.append(mmap.mmap(-1, lay.size, flags=mmap.MAP_PRIVATE
                                            | mmap.MAP_ANONYMOUS | MAP_HUGETLB,
                                            prot=mmap.PROT_READ | mmap.PROT_WRITE))
        except OSError:  # ENOMEM: too few reserved pages (or none configured)
            for mm in self._huge:
                mm.close()
            self._huge = []
            return False
        return True

    def region_for(self, gpa: int, length: int = 1) -> Region:
        for start, end, r in self._spans:  # every device access comes here: kept lean
            if start <= gpa and gpa + length <= end:
                return r
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        if self.prepare is not None:
            self.prepare(gpa, len(data))
        r = self.region_for(gpa, len(data))
        off = gpa - r.gpa
        r.mm[off:off + len(data)] = data
        self._wrote(r, off, len(data))

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        if self.prepare is not None:
            self.prepare(gpa, length)
        r = self.region_for(gpa, length)
        C.memset(r.host_addr + gpa - r.gpa, value, length)
        self._wrote(r, gpa - r.gpa, length)

    def mark_written(self, gpa: int, length: int) -> None:
        """A device wrote [gpa, gpa+length) through a view of its own: tell the tracker."""
        r = self.region_for(gpa, length)
        self._wrote(r, gpa - r.gpa, length)

    def _wrote(self, r: Region, off: int, length: int) -> None:
        if self.on_write is not None and length:
            first = (r.layout.file_offset + off) // PAGE
            last = (r.layout.file_offset + off + length - 1) // PAGE
            self.on_write(first, last - first + 1)

    def read(self, gpa: int, length: int) -> bytes:
        if self.prepare is not None:
            self.prepare(gpa, length)
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return r.mm[off:off + length]

    def span(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length), for a device's I/O straight into guest
        RAM (a disk read lands here without a copy); whoever writes through it calls
        mark_written."""
        if self.prepare is not None:
            self.prepare(gpa, length)
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return memoryview(r.mm)[off:off + length]

    def window(self) -> tuple[int, int, int] | None:
        """(first gpa, end gpa, host address minus gpa) of the first region, for a device's
        hot path to check and translate many guest addresses without a call each; None
        while a page may be missing (post-copy: every access goes through `prepare`)."""
        if self.prepare is not None or not self._spans:
            return None
        start, end, r = self._spans[0]
        return start, end, r.host_addr - start

    def address(self, gpa: int, length: int) -> int:
        """The host address of [gpa, gpa+length), checked like span(); for I/O the kernel
        does into guest RAM on its own time (a disk's AIO)."""
        if self.prepare is not None:
            self.prepare(gpa, length)
        r = self.region_for(gpa, length)
        return r.host_addr + gpa - r.gpa

    def view(self, gpa: int, length: int) -> np.ndarray:
        if self.prepare is not None:
            self.prepare(gpa, length)
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

    MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+

    def populate(self, off: int, length: int, write: bool = True) -> bool:
        """Fault in [off, off+length) (file offsets) without touching data: for writing
        (in a private mapping: break copy-on-write), or for reading (map the page cache's
        pages, still shared). False if the kernel refused. Through ctypes, which drops the
        GIL (mmap.madvise holds it for the whole call)."""
        advice = self.MADV_POPULATE_WRITE if write else self.MADV_POPULATE_READ
        for r in self.regions:
            base = r.layout.file_offset
            if base <= off and off + length <= base + r.size:
                return bool(_libc.madvise(C.c_void_p(r.host_addr + off - base),
                                          C.c_size_t(length), advice) == 0)
        return False

    def map_anonymous(self, spans: list[tuple[int, int]]) -> None:
        """Replace [off, off+length) file ranges of a private mapping by anonymous memory
        (zero pages that never depend on the file, 2 MiB pages where the host gives them).
        Only before the guest runs: what was there is dropped."""
        for off, length in spans:
            for r in self.regions:
                base = r.layout.file_offset
                if base <= off and off + length <= base + r.size:
                    addr = r.host_addr + off - base
                    got = _libc.mmap(C.c_void_p(addr), C.c_size_t(length),
                                     mmap.PROT_READ | mmap.PROT_WRITE,
                                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED
                                     | MAP_NORESERVE, -1, C.c_long(0))
                    if got != addr:
                        raise OSError(C.get_errno(), "cannot map anonymous guest memory")
                    _libc.madvise(C.c_void_p(addr), C.c_size_t(length), MADV_HUGEPAGE)
                    self.anonymous.append((off, length))
                    break
        self.anonymous.sort()

    def detach_from_file(self, paused: Callable[[], AbstractContextManager[None]]) -> None:
        """Give every range still mapped from the backing file anonymous memory of its own,
        with the same bytes. Copy-on-write is not enough: truncating a file drops even the
        private copies of its pages (unmap_mapping_range with even_cows). New memory is
        allocated and faulted in first; only the copy and the swap-in of the mappings
        (mremap over the old range) happen inside `paused()`, while no vCPU runs."""
        ranges = list(self.file_backed())
        fresh: list[int] = []
        try:
            for _, n in ranges:
                addr = _libc.mmap(None, n, mmap.PROT_READ | mmap.PROT_WRITE,
                                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
                if addr in (None, MAP_FAILED):
                    raise OSError(C.get_errno(), "cannot allocate memory to copy guest RAM into")
                fresh.append(addr)
                _libc.madvise(C.c_void_p(addr), C.c_size_t(n), MADV_HUGEPAGE)
                # fault it all in now, outside the pause; a refusal (no memory) is an error
                # here, not an out-of-memory kill inside the copy
                if _libc.madvise(C.c_void_p(addr), C.c_size_t(n), self.MADV_POPULATE_WRITE):
                    raise OSError(C.get_errno(), "cannot fault in memory to copy guest RAM into")
            with paused():
                for i, ((off, n), new) in enumerate(zip(ranges, fresh, strict=True)):
                    old = self._host_addr(off, n)
                    C.memmove(new, old, n)
                    if _libc.mremap(new, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, old) != old:
                        raise OSError(C.get_errno(), "cannot move guest RAM off its file")
                    fresh[i] = 0
                    self.anonymous.append((off, n))
        finally:
            self.anonymous.sort()
            for addr, (_, n) in zip(fresh, ranges, strict=True):
                if addr:
                    _libc.munmap(addr, n)

    def file_address(self, off: int, length: int) -> int:
        """Host address of guest RAM by file offset; the range must lie in one region."""
        return self._host_addr(off, length)

    def _host_addr(self, off: int, length: int) -> int:
        for r in self.regions:
            base = r.layout.file_offset
            if base <= off and off + length <= base + r.size:
                return r.host_addr + off - base
        raise ValueError(f"file range {off:#x}+{length:#x} is not in one RAM region")

    def file_backed(self) -> Iterator[tuple[int, int]]:
        """(file offset, length) of the ranges still mapped from the backing file."""
        pos = 0
        for off, length in [*self.anonymous, (self.size, 0)]:
            if off > pos:
                yield from self.pieces(pos, off, 1 << 62)
            pos = off + length

    def backing(self) -> dict[str, object]:
        """For `--status`: what backs guest RAM, and how much of it is in 2 MiB pages
        (transparent huge pages are asked for, not promised: the host decides; hugetlb
        pages count once the guest touched them)."""
        spans = [(r.host_addr, r.host_addr + r.size) for r in self.regions]
        huge, start = 0, None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line
                    lo, _, hi = head.partition("-")
                    a, b = int(lo, 16), int(hi, 16)
                    start = a if any(s <= a and b <= e for s, e in spans) else None
                elif start is not None and head in ("AnonHugePages:", "Private_Hugetlb:"):
                    huge += int(line.split()[1]) * 1024
        kind = ("snapshot file, copy-on-write" if self.fd >= 0 else
                "hugetlb 2 MiB pages" if self.hugetlb else "anonymous memory")
        return {"memory_backing": kind, "huge_pages": huge}

    def file_view(self, off: int, length: int) -> memoryview:
        """Guest RAM by file offset; the range must lie in one region."""
        for r in self.regions:
            base = r.layout.file_offset
            if base <= off and off + length <= base + r.size:
                return memoryview(r.mm)[off - base:off - base + length]
        raise ValueError(f"file range {off:#x}+{length:#x} is not in one RAM region")

    def close(self) -> None:
        self._spans = []  # no address of unmapped memory is handed out after this
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.stop()  # its thread touches our mappings
        for r in self.regions:
            r.__dict__.pop("array", None)
            with contextlib.suppress(BufferError):  # a numpy view still alive elsewhere
                r.mm.close()
        self.regions = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
