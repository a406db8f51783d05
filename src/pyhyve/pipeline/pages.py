"""Guest pages as the saved forms see them: which pages hold data (runs of file-page
numbers), and the one reader that walks them in bounded chunks. The snapshot writer and
the migration sender both consume `chunks()`; only what they do with a chunk differs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from ..machine.dirty import runs_of
from ..machine.memory import PAGE, GuestMemory

if TYPE_CHECKING:  # numpy is imported when first used: it costs ~80 ms of every start
    import numpy as np
    import numpy.typing as npt

    from ..machine.memory import Region

Runs = list[tuple[int, int]]
RUN = struct.Struct("<QQ")
SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)


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


def page_flags(view: memoryview | npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """One bool per page of a page-aligned buffer: does it hold a non-zero byte."""
    import numpy as np

    a = np.frombuffer(view, dtype=np.uint64) if isinstance(view, memoryview) else \
        view.view(np.uint64)
    return cast("npt.NDArray[np.bool_]", a.reshape(-1, PAGE // 8).any(axis=1))


def nonzero_runs(array: npt.NDArray[np.uint8], base_page: int) -> Runs:
    """Maximal runs of non-zero pages in a page-aligned uint8 array, as (page, count)."""
    return runs_of(page_flags(array), base_page) if len(array) else []


def merge(runs: Runs) -> Runs:
    """Sorted union of (page, count) runs: overlapping or touching runs become one."""
    out: Runs = []
    for p, n in sorted(runs):
        if out and out[-1][0] + out[-1][1] >= p:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], p + n) - start)
        else:
            out.append((p, n))
    return out


def _written_pages(addr: int, size: int) -> npt.NDArray[np.bool_]:
    """Pages of [addr, addr+size) in this process that hold private (anonymous) data, as
    a bool array from /proc/self/pagemap: present and not file-backed, or swapped out.
    A page pushed to swap is not present but is still guest data; missing it lost pages."""
    import numpy as np

    with open("/proc/self/pagemap", "rb") as f:
        raw = os.pread(f.fileno(), size // PAGE * 8, addr // PAGE * 8)
    top = np.frombuffer(raw, dtype=np.uint64) >> np.uint64(61)  # present, swapped, file
    return cast("npt.NDArray[np.bool_]", np.array(_WRITTEN_BITS)[top])


# written = (present and not file-backed) or swapped, for each value of bits 63..61
_WRITTEN_BITS = [bool((v & 4 and not v & 1) or v & 2) for v in range(8)]


def _spans(mem: GuestMemory, r: Region) -> list[tuple[int, int]]:
    """Where a region can hold non-zero bytes: the backing file's data extents (a lazily
    restored guest's snapshot file), plus the pages written in this process (anonymous, in
    RAM or in swap). Scanning only these never faults in an untouched page."""
    base, size = r.layout.file_offset, r.size
    spans = ([(s - base, e - base) for s, e in extents(mem.fd, base, base + size)]
             if mem.fd >= 0 else [])
    spans += [(a * PAGE, (a + n) * PAGE) for a, n in runs_of(_written_pages(r.host_addr, size))]
    return [(p * PAGE, (p + n) * PAGE) for p, n in merge([(s // PAGE, (e - s) // PAGE)
                                                           for s, e in spans if e > s])]


def guest_runs(mem: GuestMemory) -> Runs:
    """Non-zero pages of guest RAM, in file pages, scanned only where a page can hold data
    (`_spans`)."""
    runs: Runs = []
    for r in mem.regions:
        base = r.layout.file_offset
        for s, e in _spans(mem, r):
            runs += nonzero_runs(r.array[s:e], (base + s) // PAGE)
    return merge(runs)


def candidate_runs(mem: GuestMemory) -> Runs:
    """Where guest RAM can hold data (`_spans`), in file pages, without reading a byte of
    it: a superset of `guest_runs` at about a third of its cost, for a pause that copies
    first and looks for zero pages after the guest runs again."""
    runs: Runs = []
    for r in mem.regions:
        base = r.layout.file_offset
        runs += [((base + s) // PAGE, (e - s) // PAGE) for s, e in _spans(mem, r)]
    return merge(runs)


def data_pages(mem: GuestMemory) -> npt.NDArray[np.bool_]:
    """Every page that can hold data (`_spans`: written here, or in the backing file),
    without reading a byte of it: a superset of `guest_runs`, cheap enough for a pause."""
    import numpy as np

    out = np.zeros(mem.size // PAGE, dtype=bool)
    for page, count in candidate_runs(mem):
        out[page:page + count] = True
    return out


def nonzero_among(mem: GuestMemory, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Which pages set in `mask` (file pages) hold a non-zero byte now; like `guest_runs`
    it reads only where a page can hold data."""
    import numpy as np

    out = np.zeros(len(mask), dtype=bool)
    for r in mem.regions:
        base = r.layout.file_offset // PAGE
        for s, e in _spans(mem, r):
            first = base + s // PAGE
            for a, n in runs_of(mask[first:base + e // PAGE]):
                off = s + a * PAGE
                out[first + a:first + a + n] = page_flags(r.array[off:off + n * PAGE])
    return out


def chunks(mem: GuestMemory, runs: Runs, max_bytes: int) -> Iterator[tuple[int, memoryview]]:
    """(file offset, view of guest RAM) for every page of `runs`, at most `max_bytes` at a
    time and never across a region edge: the one way the saved forms read guest memory."""
    for page, count in runs:
        for off, n in mem.pieces(page * PAGE, (page + count) * PAGE, max_bytes):
            yield off, mem.file_view(off, n)


def encode_runs(runs: Runs) -> bytes:
    return b"".join(RUN.pack(p, n) for p, n in runs)


def decode_runs(raw: bytes, total_pages: int, what: str = "memory run table") -> Runs:
    """Runs from a file or stream, checked: sorted, disjoint, non-empty, inside RAM."""
    if len(raw) % RUN.size:
        raise ValueError(f"{what} has a partial entry")
    runs, last_end = [], 0
    for p, n in RUN.iter_unpack(raw):
        if n == 0 or p < last_end or p + n > total_pages:
            raise ValueError(f"{what} is not sorted, overlaps or leaves RAM")
        runs.append((p, n))
        last_end = p + n
    return runs
