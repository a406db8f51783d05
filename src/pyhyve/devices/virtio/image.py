"""Disk images behind virtio-blk: a raw file, or a clone's copy-on-write overlay of one.

A clone must never write its snapshot's disk image, nor see another clone's writes. Where
the file system can share extents (FICLONE: btrfs, XFS) the clone gets a reflink copy, a
raw image of its own. Elsewhere (ext4 here) the VMM keeps an overlay: a sparse file of the
image's size that receives every write, and a bitmap of which 4 KiB chunks it holds; reads
take each chunk from the overlay if written, else from the base (opened read-only). A write
that covers part of a chunk first copies the chunk up. The overlay file is created
exclusively and unlinked at once (it lives as long as the VMM): an overlay clone's disk is
scratch space, and saving or migrating such a VM is refused (docs/devices/virtio-blk.md).

A raw image may be opened for direct I/O (O_DIRECT, QEMU's cache=none): the host's page
cache is bypassed, so the guest's cache is the only one and a write is on the device when
it completes (a flush still empties the device's own cache). Requests move between the file
and guest RAM without a copy (preadv/pwritev on views of guest memory); a buffer that is
not 512-byte aligned, which O_DIRECT refuses, goes through an aligned bounce buffer.
"""

from __future__ import annotations

import ctypes as C
import ctypes.util
import fcntl
import mmap
import os
import tempfile
from collections.abc import Callable, Sequence

from .aio import address

CHUNK = 4096
FICLONE = 0x40049409
_FALLOC_PUNCH = 0x01 | 0x02  # KEEP_SIZE | PUNCH_HOLE
libc = C.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [C.c_int, C.c_int, C.c_long, C.c_long]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def zero_range(fd: int, offset: int, length: int,
               write: Callable[[int, bytes], None] | None = None) -> None:
    """Punch a hole, or write zeros (1 MiB at a time) where the file system cannot."""
    if libc.fallocate(fd, _FALLOC_PUNCH, offset, length) == 0:
        return
    zeros = bytes(min(length, 1 << 20))
    while length > 0:
        n = min(length, len(zeros))
        if write is not None:
            write(offset, zeros[:n])
        else:
            pwrite_all(fd, zeros[:n], offset)
        offset, length = offset + n, length - n


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    while n and views:
        if n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        else:
            views = [views[0][n:], *views[1:]]
            n = 0
    return views


def _transfer(io: Callable[[int, list[memoryview], int], int], fd: int,
              views: Sequence[memoryview], offset: int) -> None:
    """All of `views` read or written at `offset`; a short transfer goes on, none is an
    error (past the end of the file)."""
    left = [v for v in views if len(v)]
    while left:
        n = io(fd, left[:1024], offset)  # IOV_MAX
        if n <= 0:
            raise OSError(5, "short transfer")
        offset += n
        left = _advance(left, n)


def _bounce(size: int) -> mmap.mmap:
    """Page-aligned memory for O_DIRECT. Not closed here: an error's traceback may still
    hold views of it (closing would turn the OSError into a BufferError); it goes with
    the last reference."""
    return mmap.mmap(-1, max(size, 1))


def aligned(views: Sequence[memoryview]) -> bool:
    """What O_DIRECT takes: every buffer's place and length whole 512-byte sectors."""
    return all(len(v) % 512 == 0 and address(v) % 512 == 0 for v in views)


class RawImage:
    overlay = False

    def __init__(self, fd: int, size: int, direct: bool = False) -> None:
        self.fd, self.size, self.direct = fd, size, direct

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill `views` (guest RAM) from the image at `offset`."""
        if self.direct and not aligned(views):
            total = sum(len(v) for v in views)
            bounce = _bounce(total)
            _transfer(os.preadv, self.fd, [memoryview(bounce)[:total]], offset)
            pos = 0
            for v in views:
                v[:] = bounce[pos:pos + len(v)]
                pos += len(v)
            return
        _transfer(os.preadv, self.fd, views, offset)

    def writefrom(self, offset: int, views: Sequence[memoryview]) -> None:
        if self.direct and not aligned(views):
            total = sum(len(v) for v in views)
            bounce = _bounce(total)
            pos = 0
            for v in views:
                bounce[pos:pos + len(v)] = v
                pos += len(v)
            _transfer(os.pwritev, self.fd, [memoryview(bounce)[:total]], offset)
            return
        _transfer(os.pwritev, self.fd, views, offset)

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the file), for the VMM's
        own use (a disk's identity): a direct disk reads the 512-byte sectors around it."""
        if not self.direct:
            return os.pread(self.fd, length, offset)
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        start, stop = offset - offset % 512, -(-end // 512) * 512
        bounce, got = _bounce(stop - start), 0
        while got < stop - start:
            n = os.preadv(self.fd, [memoryview(bounce)[got:]], start + got)
            if n <= 0:  # the end of the file
                break
            got += n
        return bytes(bounce[offset - start:min(end, start + got) - start])

    def write(self, offset: int, data: bytes) -> None:
        self.writefrom(offset, [memoryview(bytearray(data))])

    def discard(self, offset: int, length: int) -> None:
        zero_range(self.fd, offset, length, self.write)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Overlay:
    """Base read-only, writes into a private sparse file, chunk by chunk."""

    overlay = True

    def __init__(self, base_fd: int, size: int, directory: str) -> None:
        self.base, self.size = base_fd, size
        fd, path = tempfile.mkstemp(prefix=".pyhyve-overlay-", dir=directory)
        os.unlink(path)  # nobody else can open it; it goes with us
        self.fd = fd
        os.ftruncate(fd, size)
        self.chunks = bytearray((size + CHUNK - 1) // CHUNK)  # 1: the overlay holds it

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        data = self.read(offset, sum(len(v) for v in views))
        pos = 0
        for v in views:
            v[:] = data[pos:pos + len(v)]
            pos += len(v)

    def writefrom(self, offset: int, views: Sequence[memoryview]) -> None:
        self.write(offset, b"".join(views))

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            c = pos // CHUNK
            run_end = min(end, (c + 1) * CHUNK)
            mine = self.chunks[c]
            while run_end < end and self.chunks[run_end // CHUNK] == mine:
                run_end = min(end, run_end + CHUNK)
            out += os.pread(self.fd if mine else self.base, run_end - pos, pos)
            pos = run_end
        return bytes(out)

    def _copy_up(self, c: int) -> None:
        if not self.chunks[c]:
            start = c * CHUNK
            pwrite_all(self.fd, os.pread(self.base, min(CHUNK, self.size - start), start), start)
            self.chunks[c] = 1

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        first, last = offset // CHUNK, (end - 1) // CHUNK
        if offset % CHUNK:
            self._copy_up(first)
        if end % CHUNK and end < self.size:
            self._copy_up(last)
        pwrite_all(self.fd, data, offset)
        self.chunks[first:last + 1] = b"\1" * (last - first + 1)

    def discard(self, offset: int, length: int) -> None:
        """Whole chunks become holes of the overlay (zeros, costing nothing); the partial
        chunks at the edges get zeros written after a copy-up."""
        end = offset + length
        first = (offset + CHUNK - 1) // CHUNK
        last = end // CHUNK  # whole chunks [first, last)
        if first >= last:
            self.write(offset, bytes(length))
            return
        if offset < first * CHUNK:
            self.write(offset, bytes(first * CHUNK - offset))
        zero_range(self.fd, first * CHUNK, (last - first) * CHUNK)
        self.chunks[first:last] = b"\1" * (last - first)
        if last * CHUNK < end:
            self.write(last * CHUNK, bytes(end - last * CHUNK))

    def sync(self) -> None:
        pass  # scratch: nothing to keep across a crash

    def close(self) -> None:
        for fd in (self.fd, self.base):
            if fd >= 0:
                os.close(fd)
        self.fd = self.base = -1


def clone_image(path: str, directory: str) -> RawImage | Overlay:
    """A clone's private disk from the image at `path`: a reflink copy in `directory`
    where the file system shares extents, else an overlay."""
    base = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    size = os.fstat(base).st_size
    fd, copy = tempfile.mkstemp(prefix=".pyhyve-clone-", dir=directory)
    os.unlink(copy)
    try:
        fcntl.ioctl(fd, FICLONE, base)
    except OSError:
        os.close(fd)
        return Overlay(base, size, directory)
    os.close(base)
    return RawImage(fd, size)
