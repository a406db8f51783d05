"""A checkpoint's staging buffer: guest RAM copied aside at memory speed while the guest is
held, and written to the file after the guest runs again. So the guest's stall is a memory
copy, not a write into page cache (0.3-0.4 GB/s for freshly allocated memory on our hosts,
10x slower). The buffer is sized from a scan of the running guest and faulted in before the
pause (the slow part, while the guest still runs); if the guest's data outgrew it by the
pause, the checkpoint writes the file while held, as a suspend does.
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
from collections.abc import Sequence

import xxhash

from ..machine.dirty import runs_of
from ..machine.memory import PAGE, GuestMemory
from ..pipeline.pages import RUN, Runs, page_flags
from ..pipeline.spread import spread
from .memfile import CHUNK, MemStats, Progress

_libc = C.CDLL(None, use_errno=True)
_libc.mmap.restype = C.c_void_p
_libc.mmap.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long]
_libc.munmap.argtypes = [C.c_void_p, C.c_size_t]
_libc.madvise.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
MAP_NORESERVE, MADV_HUGEPAGE, MADV_POPULATE_WRITE = 0x4000, 14, 23
MAP_FAILED = C.c_void_p(-1).value
SLACK = 1.25  # room for pages the guest writes between the scan and the pause
SCAN_PAGES = 2048  # 8 MiB per zero-page scan: numpy's temporaries stay small
Placed = list[tuple[int, int, int]]  # (file page, count, offset in the buffer)


def _copy(copies: Sequence[tuple[int, int, int]]) -> None:
    for dst, src, n in copies:
        C.memmove(dst, src, n)


class Staging:
    def __init__(self, data_bytes: int) -> None:
        self.size = max(PAGE, int(data_bytes * SLACK) // PAGE * PAGE + (8 << 20))
        addr = _libc.mmap(None, self.size, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if addr in (None, MAP_FAILED):
            raise OSError(C.get_errno(), "cannot map a staging buffer")
        self.addr: int = addr
        self.view = memoryview((C.c_char * self.size).from_address(addr)).cast("B")
        _libc.madvise(addr, self.size, MADV_HUGEPAGE)
        # faulted in now, GIL released, while the guest runs; refused: plain faults later
        _libc.madvise(addr, self.size, MADV_POPULATE_WRITE)
        self.used = 0
        self._runs: Runs = []

    def fits(self, runs: Runs) -> bool:
        return sum(n for _, n in runs) * PAGE <= self.size

    def copy_in(self, mem: GuestMemory, runs: Runs) -> None:
        """The guest is held: these runs, back to back, at memory speed. They may hold
        zero pages (`candidate_runs`): `placed` finds those after the guest runs again."""
        copies, pos = [], 0
        for page, count in runs:
            for off, n in mem.pieces(page * PAGE, (page + count) * PAGE, CHUNK):
                copies.append((self.addr + pos, mem.file_address(off, n), n))
                pos += n
        if pos > self.size:
            raise ValueError("the runs outgrew the staging buffer")
        spread(_copy, copies)  # the held guest's cores copy too
        self.used = pos
        self._runs = runs

    def placed(self, drop_zero: bool) -> Placed:
        """(file page, count, buffer offset) of what was copied in; with `drop_zero`, only
        the maximal runs of pages holding a non-zero byte (what the memory file records)."""
        out: Placed = []
        pos = 0
        for page, count in self._runs:
            if not drop_zero:
                out.append((page, count, pos))
            for first in range(0, count if drop_zero else 0, SCAN_PAGES):
                n = min(SCAN_PAGES, count - first)
                at = pos + first * PAGE
                for a, k in runs_of(page_flags(self.view[at:at + n * PAGE])):
                    if out and out[-1][0] + out[-1][1] == page + first + a:
                        p0, k0, at0 = out.pop()  # split only by the scan's chunking
                        out.append((p0, k0 + k, at0))
                    else:
                        out.append((page + first + a, k, at + a * PAGE))
            pos += count * PAGE
        return out

    def write_out(self, fd: int, placed: Placed, total_bytes: int,
                  progress: Progress | None = None) -> MemStats:
        """To the memory file at each run's offset, hashed as memfile.write_memory does."""
        h = xxhash.xxh3_128()
        for page, count, pos in placed:
            h.update(RUN.pack(page, count))
            off, end = page * PAGE, (page + count) * PAGE
            while off < end:
                n = min(CHUNK, end - off)
                chunk = self.view[pos:pos + n]
                h.update(chunk)
                written = 0
                while written < n:
                    written += os.pwrite(fd, chunk[written:], off + written)
                pos, off = pos + n, off + n
                if progress:
                    progress(n)
        data_pages = sum(n for _, n, _ in placed)
        return MemStats(total_bytes, data_pages, total_bytes // PAGE - data_pages, h.hexdigest())

    def close(self) -> None:
        if self.addr:
            self.view.release()
            _libc.munmap(self.addr, self.size)
            self.addr = 0
