"""A disk as it was at a checkpoint's pause, kept beside the snapshot while the guest
writes on.

A checkpoint's guest runs on, so its disk changes under the snapshot; restoring the saved
memory against the changed disk would corrupt it (blk.py refuses). So the checkpoint keeps
the disk as it was at the pause:
- where the file system shares extents (FICLONE: btrfs, XFS), a reflink made during the
  pause, at once;
- elsewhere (ext4 here), a copy made after the pause by copy-before-write, as QEMU's backup
  job does. A thread copies the image 1 MiB chunk by chunk. Before the device writes or
  discards in a chunk not yet copied, it copies that chunk's old content first (`before`).

The guest pauses only for the reflink, or for a scan of the image's holes (a hole at the
pause stays a hole in the copy and is never read). The copy holds exactly the disk at the
pause. A copy that fails (a full disk) fails the checkpoint, never a guest write: from then
on writes go straight through.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from .image import FICLONE, pwrite_all

CHUNK = 1 << 20
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
        if with_reflink:
            self.reflinked, self.src, self.pending, self.left = True, -1, bytearray(), 0
            return
        # its own buffered fd on the same file (the device's may be O_DIRECT)
        self.src = os.open(f"/proc/self/fd/{src}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(dst, size)
            self.pending = data_chunks(self.src, size)
        except BaseException:
            os.close(self.src)
            raise
        self.left = self.pending.count(1)

    def start(self) -> None:
        if self.left:
            self._thread = threading.Thread(target=self._run, name="disk-copy", daemon=True)
            self._thread.start()

    def before(self, offset: int, length: int) -> None:
        """Called before the device changes [offset, offset + length): what of it is not
        yet copied is copied now."""
        if not self.left or length <= 0:
            return
        with self.lock:
            for c in range(offset // CHUNK, min(len(self.pending),
                                                (offset + length - 1) // CHUNK + 1)):
                if self.pending[c]:
                    self._copy(c)

    def _copy(self, c: int) -> None:
        """Chunk c into the copy (the lock held); a failure ends the copying."""
        try:
            if self.error is None:
                start = c * CHUNK
                _copy_range(self.src, self.dst, start, min(CHUNK, self.size - start))
        except OSError as e:
            self.error = e
            self.pending[:] = bytes(len(self.pending))
            self.left = 0
            return
        self.pending[c] = 0
        self.left -= 1

    def _run(self) -> None:
        c = 0
        while not self._stop:
            with self.lock:
                c = self.pending.find(1, c)
                if c < 0:
                    return
                self._copy(c)

    def finish(self) -> None:
        """Wait for the copy, and put it on stable storage; OSError if it failed."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        os.fdatasync(self.dst)

    def cancel(self) -> None:
        """Stop copying (a failed checkpoint); the device writes straight through."""
        self._stop = True
        with self.lock:
            self.left = 0
            self.pending[:] = bytes(len(self.pending))
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        if self.src >= 0:
            os.close(self.src)
            self.src = -1


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """[offset, offset + length) of src into dst at the same place, in the kernel where it
    can (copy_file_range), else through a buffer."""
    end = offset + length
    try:
        while offset < end:
            n = os.copy_file_range(src, dst, end - offset, offset, offset)
            if n <= 0:
                raise OSError(errno.EIO, "the disk image ended early")
            offset += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while offset < end:
        data = os.pread(src, end - offset, offset)
        if not data:
            raise OSError(errno.EIO, "the disk image ended early")
        pwrite_all(dst, data, offset)
        offset += len(data)
