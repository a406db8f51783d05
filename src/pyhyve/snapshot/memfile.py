"""The memory file: guest RAM laid out by file offset, zero pages left as holes.

A snapshot records the maximal runs of non-zero pages (in file-page numbers). They say
what to write, what to checksum (xxh3-128 over each run's header and bytes), what an eager
restore copies, and what a verifier hashes without scanning gigabytes of holes. A file
whose data extents reach outside the runs is checked page by page: those pages must be
zero, or the snapshot is refused.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import xxhash

from ..machine.memory import PAGE, GuestMemory

CHUNK = 8 << 20          # large single writes are ~10x slower here than 8 MiB ones
RUN = struct.Struct("<QQ")
SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class MemStats:
    total_bytes: int
    data_pages: int
    zero_pages: int
    checksum: str


def extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Data extents of `fd` within [start, end), page-aligned outward."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError:  # ENXIO: no data past pos
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, SEEK_HOLE), end)
        yield data // PAGE * PAGE, min(end, (hole + PAGE - 1) // PAGE * PAGE)
        pos = hole


def nonzero_runs(array: object, base_page: int) -> list[tuple[int, int]]:
    """Maximal runs of non-zero pages in a page-aligned uint8 array, as (page, count)."""
    import numpy as np

    a = array  # type: ignore[assignment]
    if len(a) == 0:
        return []
    nz = a.view(np.uint64).reshape(-1, PAGE // 8).any(axis=1)
    edges = np.diff(np.concatenate(([False], nz, [False])).astype(np.int8))
    starts = np.nonzero(edges == 1)[0]
    ends = np.nonzero(edges == -1)[0]
    return [(base_page + int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted union of (page, count) runs: overlapping or touching runs become one."""
    out: list[tuple[int, int]] = []
    for p, n in sorted(runs):
        if out and out[-1][0] + out[-1][1] >= p:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], p + n) - start)
        else:
            out.append((p, n))
    return out


def _written_pages(addr: int, size: int) -> object:
    """Pages of [addr, addr+size) in this process that hold private (anonymous) data, as
    a bool array from /proc/self/pagemap: present and not file-backed, or swapped out.
    A page pushed to swap is not present but is still guest data; missing it lost pages."""
    import numpy as np

    with open("/proc/self/pagemap", "rb") as f:
        raw = os.pread(f.fileno(), size // PAGE * 8, addr // PAGE * 8)
    pm = np.frombuffer(raw, dtype=np.uint64)
    present = (pm >> np.uint64(63)) & np.uint64(1)
    swapped = (pm >> np.uint64(62)) & np.uint64(1)
    file_page = (pm >> np.uint64(61)) & np.uint64(1)
    return ((present & ~file_page & np.uint64(1)) | swapped).astype(bool)


def _private_spans(mem: GuestMemory, r: object) -> list[tuple[int, int]]:
    """Where a private (copy-on-write) mapping of a snapshot file can hold non-zero bytes:
    the file's data extents, plus the pages the guest wrote since (anonymous, in RAM or in
    swap). Scanning only these avoids faulting in every hole of the file."""
    import numpy as np

    base = r.layout.file_offset  # type: ignore[attr-defined]
    size = r.size  # type: ignore[attr-defined]
    spans = [(s - base, e - base) for s, e in extents(mem.fd, base, base + size)]
    anon = _written_pages(r.host_addr, size)  # type: ignore[attr-defined]
    edges = np.diff(np.concatenate(([False], anon, [False])).astype(np.int8))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    spans += [(int(a) * PAGE, int(b) * PAGE) for a, b in zip(starts, ends, strict=True)]
    return [(p * PAGE, (p + n) * PAGE) for p, n in merge([(s // PAGE, (e - s) // PAGE)
                                                           for s, e in spans if e > s])]


def guest_runs(mem: GuestMemory) -> list[tuple[int, int]]:
    """Non-zero pages of guest RAM, in file pages. A shared memfd is scanned only where
    it has data (never-touched pages are holes); a private mapping of a snapshot only where
    the file has data or the guest has written."""
    runs: list[tuple[int, int]] = []
    for r in mem.regions:
        base = r.layout.file_offset
        spans = (_private_spans(mem, r) if mem.private else
                 [(s - base, e - base) for s, e in extents(mem.fd, base, base + r.size)])
        for s, e in spans:
            runs += nonzero_runs(r.array[s:e], (base + s) // PAGE)
    return merge(runs)


def zero_spans(runs: list[tuple[int, int]], mem: GuestMemory, min_pages: int = 512,
               limit: int = 4096) -> list[tuple[int, int]]:
    """(file offset, length) of the largest all-zero stretches between runs, 2 MiB-aligned
    and within one region: a lazy restore maps these anonymous (never read from the file,
    huge pages possible). At most `limit` of them, so the mapping count stays bounded."""
    spans = []
    for r in mem.regions:
        lo, hi = r.layout.file_offset, r.layout.file_offset + r.size
        for s, e in _gaps(runs, lo, hi):
            s = (s + min_pages * PAGE - 1) // (min_pages * PAGE) * (min_pages * PAGE)
            e = e // (min_pages * PAGE) * (min_pages * PAGE)
            if e - s >= min_pages * PAGE:
                spans.append((s, e - s))
    spans.sort(key=lambda x: -x[1])
    return sorted(spans[:limit])


def write_memory(mem: GuestMemory, fd: int, runs: list[tuple[int, int]],
                 progress: Progress | None = None) -> MemStats:
    """Write the runs to `fd` (already sized to RAM), hashing as we go."""
    h = xxhash.xxh3_128()
    data_pages = 0
    for page, count in runs:
        h.update(RUN.pack(page, count))
        for off, n in mem.pieces(page * PAGE, (page + count) * PAGE, CHUNK):
            chunk = mem.file_view(off, n)
            h.update(chunk)
            written = 0
            while written < n:
                written += os.pwrite(fd, chunk[written:], off + written)
            if progress:
                progress(n)
        data_pages += count
    return MemStats(mem.size, data_pages, mem.size // PAGE - data_pages, h.hexdigest())


def encode_runs(runs: list[tuple[int, int]]) -> bytes:
    return b"".join(RUN.pack(p, n) for p, n in runs)


def decode_runs(raw: bytes, total_pages: int) -> list[tuple[int, int]]:
    """Runs from a snapshot, checked: sorted, disjoint, non-empty, inside RAM."""
    if len(raw) % RUN.size:
        raise ValueError("memory run table has a partial entry")
    runs, last_end = [], 0
    for p, n in RUN.iter_unpack(raw):
        if n == 0 or p < last_end or p + n > total_pages:
            raise ValueError("memory run table is not sorted, overlaps or leaves RAM")
        runs.append((p, n))
        last_end = p + n
    return runs


def hash_file_runs(mm: mmap.mmap, runs: list[tuple[int, int]],
                   progress: Progress | None = None) -> str:
    h = xxhash.xxh3_128()
    mv = memoryview(mm)
    try:
        for page, count in runs:
            h.update(RUN.pack(page, count))
            off, end = page * PAGE, (page + count) * PAGE
            while off < end:
                n = min(CHUNK * 8, end - off)
                h.update(mv[off:off + n])
                off += n
                if progress:
                    progress(n)
    finally:
        mv.release()
    return h.hexdigest()


def _gaps(runs: list[tuple[int, int]], start: int, end: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of [start, end) that no run covers."""
    i = bisect.bisect_right(runs, (start // PAGE, 1 << 62)) - 1
    pos = start
    for p, n in runs[max(i, 0):]:
        rs, re = p * PAGE, (p + n) * PAGE
        if re <= pos:
            continue
        if rs >= end:
            break
        if rs > pos:
            yield pos, rs
        pos = re
        if pos >= end:
            return
    if pos < end:
        yield pos, end


def stray_data(fd: int, mm: mmap.mmap, runs: list[tuple[int, int]], size: int) -> int | None:
    """First offset outside the runs holding a non-zero byte (None: the file is clean).
    Only data extents outside the runs are read, so a sparse file costs nothing here."""
    for s, e in extents(fd, 0, size):
        for gs, ge in _gaps(runs, s, e):
            found = nonzero_runs(_np_view(mm, gs, ge), gs // PAGE)
            if found:
                return found[0][0] * PAGE
    return None


def _np_view(mm: mmap.mmap, start: int, end: int) -> object:
    import numpy as np

    return np.frombuffer(mm, dtype=np.uint8, count=end - start, offset=start)


def load_eager(mem: GuestMemory, mm: mmap.mmap, runs: list[tuple[int, int]],
               progress: Progress | None = None) -> None:
    """Copy the runs from the mapped file into (fresh, zero) guest RAM."""
    src = memoryview(mm)
    try:
        for page, count in runs:
            for off, n in mem.pieces(page * PAGE, (page + count) * PAGE, CHUNK):
                mem.file_view(off, n)[:] = src[off:off + n]
                if progress:
                    progress(n)
    finally:
        src.release()
