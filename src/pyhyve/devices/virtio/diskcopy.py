"""A disk as it was at a checkpoint's pause, kept beside the snapshot while the guest
writes on.

A checkpoint's guest runs on, so its disk changes under the snapshot; restoring the saved
memory against the changed disk would corrupt it (blk.py refuses). So the checkpoint keeps
the disk as it was at the pause:
- where the file system shares extents (FICLONE: btrfs, XFS), a reflink made during the
  pause, at once;
- elsewhere (ext4 here), a copy made after the pause by copy-before-write, as QEMU's backup
  job does. A thread copies the image chunk by chunk (64 KiB). Before the device writes or
  discards in a chunk not yet copied, it copies that chunk's old content first (`before`).

The guest pauses only for the reflink, or for a scan of the image's holes (a hole at the
pause stays a hole in the copy and is never read). The copy holds exactly the disk at the
pause. A copy that fails (a full disk) fails the checkpoint, never a guest write: from then
on writes go straight through. Everything here is about not stalling the guest's own I/O
while a whole image is read and written beside it (measured in docs/snapshot-format.md):
the chunks an AIO batch needs are read in parallel, the copier holds no lock across I/O,
and the copy goes to disk as it is made, never in one burst at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from .image import FICLONE, libc, pwrite_all

CHUNK = 64 << 10  # a write's wait to copy its chunk first (QEMU's backup cluster size)
FLUSH = 8 << 20  # the copy is fdatasynced this often: a device cache flush of a GiB at the
# end held the guest's writes up for 100 ms
BATCH = 16  # chunks the copier reads at once
READERS = 8  # threads reading the chunks an AIO batch of writes needs
GROUP = 64  # chunks read before they are written (4 MiB held at most)
WINDOW = 1 << 20  # the copy is written out (the device's chunks in it too) and waited
# for this much at a time, behind the copier and then to the end: its dirty pages never
# pile up into one long write-back that would starve the guest's own I/O at the end
KEPT_NAME = re.compile(r"\.g[0-9]{1,9}\.disk[0-9]{1,3}$")  # FILE.gN.diskK: a kept disk
MAX_EXTENTS = 4096  # holes looked for during the pause, at most: the rest is copied whole
SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)


def data_chunks(fd: int, size: int) -> bytearray:
    """One byte per chunk of the file: 1 where it holds data (or might), 0 for a hole."""
    chunks = bytearray((size + CHUNK - 1) // CHUNK)
    pos = 0
    for _ in range(MAX_EXTENTS):
        if pos >= size:
            return chunks
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
            hole = min(os.lseek(fd, data, SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return chunks
            break  # no SEEK_DATA here: everything from pos on may be data
        if data >= size:
            return chunks
        first, last = data // CHUNK, (hole - 1) // CHUNK
        chunks[first:last + 1] = b"\1" * (last - first + 1)
        pos = hole
    first = pos // CHUNK
    chunks[first:] = b"\1" * (len(chunks) - first)
    return chunks


class DiskCopy:
    """The image behind `src` (an open fd; reopened here for buffered reads) copied into
    `dst` as it is now. Construct while the device is quiesced; `start()`, then `finish()`
    (the copy on stable storage) or `cancel()`."""

    def __init__(self, src: int, dst: int, size: int) -> None:
        self.dst, self.size = dst, size
        self.lock = threading.Lock()
        self.error: OSError | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.reflinked = False
        with_reflink = True
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError:
            with_reflink = False
        self.src = self.rsrc = -1
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        if with_reflink:
            self.reflinked, self.pending, self.left = True, bytearray(), 0
            return
        # buffered fds of its own on the same file (the device's may be O_DIRECT): one
        # read in order by the copier, one read at random for the device's writes
        self.src = os.open(f"/proc/self/fd/{src}", os.O_RDONLY | os.O_CLOEXEC)
        self.rsrc = os.open(f"/proc/self/fd/{src}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(self.rsrc, 0, 0, os.POSIX_FADV_RANDOM)
            os.ftruncate(dst, size)
            self.pending = data_chunks(self.src, size)
        except BaseException:
            self.close()
            raise
        self.left = self.pending.count(1)

    def start(self) -> None:
        if self.left:
            self._thread = threading.Thread(target=self._run, name="disk-copy", daemon=True)
            self._thread.start()

    def before(self, offset: int, length: int) -> None:
        """Called before the device changes [offset, offset + length): what of it is not
        yet copied is copied now."""
        self.before_many([(offset, length)])

    def before_many(self, ranges: list[tuple[int, int]]) -> None:
        """before() for a batch of writes (the AIO batch about to be submitted): the chunks
        they need are read in parallel, so the batch waits about one read, not one each."""
        if not self.left:
            return
        need = sorted(set(self._pending_in(ranges)))  # (a byte is cleared after its
        if not need:  # chunk's copy, never set again: a clear one needs no wait)
            return
        with self.lock:  # (cancel() takes it: no copy runs on after a cancel)
            need = [c for c in need if self.pending[c]]
            for at in range(0, len(need), GROUP):  # bounded memory, whatever the guest asks
                if self.error is not None:
                    return
                group = need[at:at + GROUP]
                try:
                    got = list(self._readers().map(self._read, group)) if len(group) > 1 \
                        else [self._read(group[0])]
                    for c, data in zip(group, got, strict=True):
                        pwrite_all(self.dst, data, c * CHUNK)
                except OSError as e:
                    self._failed(e)
                    return
                for c in group:
                    self.pending[c] = 0
                self.left -= len(group)

    def _pending_in(self, ranges: list[tuple[int, int]]) -> Iterator[int]:
        """The chunks of `ranges` not yet copied (found with find(): a 1 GiB discard over
        copied chunks costs no Python loop over them)."""
        for off, n in ranges:
            if n <= 0:
                continue
            c, end = off // CHUNK, min(len(self.pending), (off + n - 1) // CHUNK + 1)
            while (c := self.pending.find(1, c, end)) >= 0:
                yield c
                c += 1

    def _read(self, c: int) -> bytes:
        return _read_all(self.rsrc, min(CHUNK, self.size - c * CHUNK), c * CHUNK)

    def _readers(self) -> ThreadPoolExecutor:
        with self._pool_lock:  # (the copier starts it, the device may want it first)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="disk-copy-read")
            return self._pool

    def _failed(self, e: OSError) -> None:
        """The copy cannot be made (the lock held): end it, the writes go on, and what it
        took of a full file system is given back at once."""
        self.error = e
        self.pending[:] = bytes(len(self.pending))
        self.left = 0
        with contextlib.suppress(OSError):
            os.ftruncate(self.dst, 0)

    def _run(self) -> None:
        """Copy what is pending, BATCH chunks at a time. The lock is held only to look at
        and clear pending bytes, never across I/O, so a write waits on no read: a chunk
        still pending after its read was read before any write to it began (the device
        clears the byte before it writes), so its data is the old data, whichever of the
        two puts it in the copy."""
        c, marks = 0, (0, 0)
        ready = threading.Barrier(READERS + 1)  # the readers' threads, started now, off the
        for _ in range(READERS):  # device's path: the first batch after the pause found
            self._readers().submit(ready.wait, 5)  # none and waited 20 ms for them
        with contextlib.suppress(threading.BrokenBarrierError):
            ready.wait(5)
        try:
            while not self._stop:
                with self.lock:
                    c = self.pending.find(1, c)
                    if c < 0:
                        break
                    n = self.pending.find(0, c, min(c + BATCH, len(self.pending)))
                    n = (n if n >= 0 else min(c + BATCH, len(self.pending))) - c
                start = c * CHUNK
                data = _read_all(self.src, min(n * CHUNK, self.size - start), start)
                with self.lock:
                    still = [i for i in range(c, c + n) if self.pending[i]]
                for i in still:
                    off = (i - c) * CHUNK
                    pwrite_all(self.dst, data[off:off + CHUNK], i * CHUNK)
                with self.lock:
                    for i in still:
                        if self.pending[i]:
                            self.pending[i] = 0
                            self.left -= 1
                marks = _write_behind(self.dst, marks, start + len(data))
                c += n
            for off in range(marks[1], self.size if not self._stop else 0, WINDOW):
                libc.sync_file_range(self.dst, off, WINDOW, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
        except OSError as e:
            with self.lock:
                self._failed(e)

    def finish(self) -> None:
        """Wait for the copy, and put it on stable storage; OSError if it failed or was
        cancelled (the disk closed under the checkpoint)."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        if self._stop:
            raise OSError(errno.ECANCELED, "the disk was closed during the copy")
        os.fdatasync(self.dst)

    def cancel(self) -> None:
        """Stop copying (a failed checkpoint, a disk closing); the device writes straight
        through. Any thread, any number of times."""
        self._stop = True
        with self.lock:
            self.left = 0
            self.pending[:] = bytes(len(self.pending))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def close(self) -> None:
        """After cancel(); any number of times. `dst` is the caller's to close."""
        with self.lock, self._pool_lock:
            pool, self._pool = self._pool, None
            fds, self.src, self.rsrc = (self.src, self.rsrc), -1, -1
        if pool is not None:
            pool.shutdown()
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def _read_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, "the disk image ended early")
        data += more
    return data


libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _write_behind(fd: int, marks: tuple[int, int], done: int) -> tuple[int, int]:
    """`marks`: (where writing out was last started, where it was last waited for). Once
    WINDOW more is written, start writing it out and wait for the window before it."""
    started, waited = marks
    if done - started < WINDOW:
        return marks
    libc.sync_file_range(fd, started, done - started, _WRITE)
    if started > waited:
        libc.sync_file_range(fd, waited, started - waited, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
    if done // FLUSH != started // FLUSH:
        os.fdatasync(fd)
    return done, started
