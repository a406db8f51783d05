"""The memory file: guest RAM laid out by file offset, zero pages left as holes.

A snapshot records the maximal runs of non-zero pages (in file-page numbers). They say
what to write, what to checksum (xxh3-128 over each run's header and bytes), what an eager
restore copies, and what a verifier hashes without scanning gigabytes of holes. A file
whose data extents reach outside the runs is checked page by page: those pages must be
zero, or the snapshot is refused.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from ..machine.memory import PAGE, GuestMemory
from ..pipeline.pages import RUN, Runs, chunks, extents, nonzero_runs
from ..pipeline.spread import spread

if TYPE_CHECKING:  # numpy is imported when first used: it costs ~80 ms of every start
    import numpy as np
    import numpy.typing as npt

CHUNK = 8 << 20          # large single writes are ~10x slower here than 8 MiB ones

Progress = Callable[[int], None]


@dataclass(frozen=True)
class MemStats:
    total_bytes: int
    data_pages: int
    zero_pages: int
    checksum: str


def zero_spans(runs: Runs, mem: GuestMemory, min_pages: int = 512,
               limit: int = 4096) -> Runs:
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


def write_memory(mem: GuestMemory, fd: int, runs: Runs,
                 progress: Progress | None = None) -> MemStats:
    """Write the runs to `fd` (already sized to RAM), hashing as we go."""
    h = xxhash.xxh3_128()
    heads = {page * PAGE: count for page, count in runs}  # each run's header is hashed too
    for off, chunk in chunks(mem, runs, CHUNK):
        if off in heads:
            h.update(RUN.pack(off // PAGE, heads[off]))
        h.update(chunk)
        written = 0
        while written < len(chunk):
            written += os.pwrite(fd, chunk[written:], off + written)
        if progress:
            progress(len(chunk))
    data_pages = sum(n for _, n in runs)
    return MemStats(mem.size, data_pages, mem.size // PAGE - data_pages, h.hexdigest())


def hash_file_runs(mm: mmap.mmap, runs: Runs,
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


def _gaps(runs: Runs, start: int, end: int) -> Iterator[tuple[int, int]]:
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


def stray_data(fd: int, mm: mmap.mmap, runs: Runs, size: int) -> int | None:
    """First offset outside the runs holding a non-zero byte (None: the file is clean).
    Only data extents outside the runs are read, so a sparse file costs nothing here."""
    for s, e in extents(fd, 0, size):
        for gs, ge in _gaps(runs, s, e):
            found = nonzero_runs(_np_view(mm, gs, ge), gs // PAGE)
            if found:
                return found[0][0] * PAGE
    return None


def _np_view(mm: mmap.mmap, start: int, end: int) -> npt.NDArray[np.uint8]:
    import numpy as np

    return np.frombuffer(mm, dtype=np.uint8, count=end - start, offset=start)


def load_eager(mem: GuestMemory, fd: int, runs: Runs,
               progress: Progress | None = None) -> None:
    """Copy the runs from the memory file into (fresh, zero) guest RAM: read, not mapped
    (a file cut short is an error here, not a SIGBUS), on every core (spread.py)."""
    lock = threading.Lock()

    def copy(pieces: Sequence[tuple[int, int]]) -> None:
        for off, n in pieces:
            view, got = mem.file_view(off, n), 0
            while got < n:
                k = os.preadv(fd, [view[got:]], off + got)
                if k <= 0:
                    raise OSError(errno.EIO, "the memory file ends inside its data")
                got += k
            if progress:
                with lock:
                    progress(n)
    spread(copy, [piece for page, count in runs
                  for piece in mem.pieces(page * PAGE, (page + count) * PAGE, CHUNK)])
