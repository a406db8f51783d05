"""virtio-blk (virtio 1.x, 5.2) on a raw image file.

Requests run on the transport's worker thread, never on a vCPU: read, write, flush
(fdatasync), discard (a hole punched), write-zeroes, get-id (the serial). A request past
the end of the disk, of a length that is not whole sectors, or a write to a read-only disk
completes with VIRTIO_BLK_S_IOERR; an unknown type with UNSUPP; a host I/O error with
IOERR: the guest sees an I/O error, the VMM carries on.

Backend spec (the VM description's backend, --disk, --bind diskN=...):
PATH[,ro][,serial=ID][,direct][,clone=DIR][,force]. `direct` bypasses the host's page cache
(O_DIRECT, QEMU's cache=none). `clone=DIR` (set by a clone's restore, not by users) gives
the VM a private copy-on-write view of PATH (image.py), its scratch files in DIR.

Reads and writes go straight between the file and guest RAM (no copy). On a `direct` disk
they run asynchronously through Linux native AIO (aio.py), up to AIO_DEPTH at once,
completing in whatever order the host finishes them, as virtio allows: a guest with 32
requests in flight gets the device's parallelism from the transport's one thread. A flush
covers every write completed before it (the guest waits for the writes it wants covered,
as the spec has it). Buffered disks, flushes, discards and unaligned buffers are served
synchronously on that thread, in order.

The disk's identity goes with the device's state: its size and an xxh3-128 of 64 blocks
sampled across it, taken while the VM is paused for the save. A restore or migration whose
disk differs (another image, or the same one written since: a checkpoint's VM went on
running) is refused, naming the disk, unless `force` (restore --disk-changed-ok) says the
user knows: the guest's caches would otherwise disagree with the disk and corrupt it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from ...errors import PyhyveError
from .aio import Aio
from .backend import ASYNC
from .diskcopy import KEPT_NAME, DiskCopy
from .image import Overlay, RawImage, clone_image
from .queue import Chain, Memory, QueueError

SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
_STATUS = [bytes([i]) for i in range(256)]
_HEADER = struct.Struct("<IIQ")
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 2, 4, 32, 64, 512
F_DISCARD, F_WRITE_ZEROES = 1 << 13, 1 << 14
SIZE_MAX = 256 << 10  # x seg_max (254) stays under the queue's 64 MiB request bound
MAX_RANGE_SECTORS = 1 << 21  # 1 GiB a discard or write-zeroes range, at most
AIO_DEPTH = 128  # a request takes two descriptors at least: 128 fill a 256-entry queue
QUEUE_SIZE = 256
MAX_SEGMENTS = 256  # discard / write-zeroes ranges per request
SAMPLES = 64
BLOCK_SAMPLE = 4096


class DiskError(PyhyveError, ValueError):
    pass


def identity_of(read: Callable[[int, int], bytes], size: int) -> dict[str, object]:
    """A disk's identity (module docstring) through `read(offset, length)`."""
    step = max(BLOCK_SAMPLE, (size - BLOCK_SAMPLE) // (SAMPLES - 1) // 4096 * 4096)
    h = xxhash.xxh3_128()
    for i in range(SAMPLES):
        h.update(read(min(i * step, max(0, size - BLOCK_SAMPLE)), BLOCK_SAMPLE))
    return {"size": size, "sample": h.hexdigest()}


def file_identity(fd: int, size: int) -> dict[str, object]:
    """The identity of the image in the file `fd` (a checkpoint's copy of a disk)."""
    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)
    return identity_of(read, size)


@dataclass(frozen=True)
class DiskSpec:
    path: str
    read_only: bool = False
    serial: str = ""
    clone: str = ""   # a clone's scratch directory, or ""
    force: bool = False
    direct: bool = False


def parse_disk(spec: str) -> DiskSpec:
    """PATH[,ro][,serial=ID][,direct][,clone=DIR][,force]; `ser=ID` is bhyve's serial=."""
    path, *opts = spec.split(",")
    ro, serial, clone, force, direct = False, "", "", False, False
    for o in opts:
        if o == "ro":
            ro = True
        elif o == "direct":
            direct = True
        elif o == "force":
            force = True
        elif o.startswith("serial=") and len(o) <= 7 + 20 and o[7:].isprintable():
            serial = o[7:]
        elif o.startswith("ser=") and len(o) <= 4 + 20 and o[4:].isprintable():
            serial = o[4:]  # bhyve's spelling (-s SLOT,virtio-blk,PATH,ser=ID)
        elif o.startswith("clone=") and len(o) > 6:
            clone = o[6:]
        else:
            raise DiskError(f"bad disk option '{o}' in '{spec}': use "
                            "PATH[,ro][,serial=ID][,direct] (ID at most 20 characters)")
    if not path:
        raise DiskError(f"bad disk '{spec}': no path")
    return DiskSpec(path, ro, serial, clone, force, direct)


class Blk:
    device_type = 2
    class_code = 0x018000
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)

    def __init__(self, spec: str) -> None:
        d = parse_disk(spec)
        self.path, self.read_only, self.serial, self.force = d.path, d.read_only, d.serial, d.force
        kept = KEPT_NAME.search(d.path)
        if kept and not d.read_only and os.path.exists(d.path[:kept.start()] + ".meta"):
            raise DiskError(f"disk {d.path} is a checkpoint's kept disk: written, that "
                            "checkpoint could not be restored again; use a copy of it "
                            f"(cp --sparse=always {d.path} NEW.img), or add ,ro")
        try:
            if d.clone and not self.read_only:
                self.image: RawImage | Overlay = clone_image(self.path, d.clone)
            else:
                flags = os.O_RDONLY if self.read_only else os.O_RDWR
                fd = os.open(self.path, flags | os.O_CLOEXEC)
                self.image = RawImage(fd, os.fstat(fd).st_size)
        except OSError as e:
            raise DiskError(f"cannot open disk {self.path}: {e.strerror}") from None
        if self.image.size < SECTOR:
            self.image.close()
            raise DiskError(f"disk {self.path} is smaller than one sector")
        if d.direct and isinstance(self.image, RawImage):
            try:
                fl = fcntl.fcntl(self.image.fd, fcntl.F_GETFL)
                fcntl.fcntl(self.image.fd, fcntl.F_SETFL, fl | os.O_DIRECT)
                self.image.direct = True
                self.image.read(0, SECTOR)  # what the guest will ask: one 512-byte sector
            except OSError as e:
                self.image.close()
                why = ("its direct I/O needs more than 512-byte alignment (4K-sector "
                       "storage)" if e.errno == errno.EINVAL else e.strerror)
                raise DiskError(f"disk {self.path}: no direct I/O on its file system: "
                                f"{why}; use it without ',direct'") from None
        self.cloned = bool(d.clone) and not self.read_only
        self.aio: Aio | None = None
        self.completion_fd: int | None = None  # the transport polls it for reap()
        if isinstance(self.image, RawImage) and self.image.direct:
            try:
                self.aio = Aio(AIO_DEPTH)
            except OSError:  # no AIO (aio-max-nr reached): synchronous, still direct
                pass
            else:
                self.completion_fd = self.aio.fd
        # AIO token -> (queue, chain, data bytes, whether a write, disk offset)
        self._flying: dict[int, tuple[int, Chain, int, bool, int]] = {}
        # what the kernel would not take, done synchronously, for reap(): (queue, chain,
        # data bytes, whether a write, bytes moved or -errno)
        self._later: list[tuple[int, Chain, int, bool, int]] = []
        self._mem: Memory | None = None
        self.sectors = self.image.size // SECTOR
        self.copy: DiskCopy | None = None  # a checkpoint's copy of the disk being made
        self._copy_first: list[tuple[int, int]] = []  # writes batched, their ranges
        self.saved_identity: dict[str, object] | None = None  # at the last state()

    def identity(self) -> dict[str, object]:
        return identity_of(self.image.read, self.image.size)

    def state(self) -> bytes:
        self.saved_identity = self.identity()
        return json.dumps(self.saved_identity, sort_keys=True).encode()

    def begin_copy(self, dst: int) -> DiskCopy:
        """Keep this disk as it is now in `dst` (diskcopy.py); the device is quiesced."""
        assert isinstance(self.image, RawImage) and self.copy is None
        self.copy = DiskCopy(self.image.fd, dst, self.image.size)
        self.copy.start()
        return self.copy

    def end_copy(self, copy: DiskCopy | None = None) -> None:
        """End the copy (`copy`, if still the current one): it stops, its files close;
        whoever ends it first (the save, or the disk closing under it) does."""
        mine = self.copy if copy is None else copy
        if mine is not None:
            if self.copy is mine:
                self.copy = None
            mine.cancel()
            mine.close()

    def allocated(self) -> int:
        """Bytes the image holds on its file system (a sparse one less than its size)."""
        return os.fstat(self.image.fd).st_blocks * 512

    def load(self, raw: bytes) -> None:
        """Check the saved identity against this disk (module docstring)."""
        try:
            saved = json.loads(raw)
            size, sample = int(saved["size"]), str(saved["sample"])
        except (ValueError, KeyError, TypeError):
            raise DiskError(f"disk {self.path}: saved identity is malformed") from None
        if self.force:
            return
        now = self.identity()
        if now["size"] != size:
            raise DiskError(f"disk {self.path} is {now['size']} bytes, the saved VM's was "
                             f"{size} (another image? --disk-changed-ok overrides)")
        if now["sample"] != sample:
            raise DiskError(f"disk {self.path} has changed since the VM was saved (written "
                             "since, or another image); restoring would corrupt it "
                             "(--disk-changed-ok overrides)")

    def save_refusal(self) -> str:
        """Why this disk's content cannot go with a snapshot or migration ("" if it can)."""
        if self.cloned:
            return (f"{self.path} is a clone's private copy-on-write disk, which lives only "
                    "as long as this VM")
        return ""

    def features(self) -> int:
        f = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES
        return f | F_RO if self.read_only else f

    def config(self) -> bytes:
        most = min(self.sectors, MAX_RANGE_SECTORS)
        return struct.pack("<QIIHBBIBBHIBBHIIIIIB3x", self.sectors, SIZE_MAX, QUEUE_SIZE - 2,
                           0, 0, 0,
                           SECTOR, 0, 0, 0, 0, 0, 0, 1, most, MAX_SEGMENTS, 1,
                           most, MAX_SEGMENTS, 1)

    def config_write(self, offset: int, data: bytes) -> None:
        pass  # writeback toggling is not offered

    def reset(self) -> None:
        pass

    def flush(self) -> None:
        if not self.read_only:
            self.image.sync()

    def handle(self, queue: int, chain: Chain, mem: Memory) -> int:
        if chain.in_bytes < 16 or chain.out_room < 1:
            raise QueueError("virtio-blk request without a header or a status byte")
        typ, _, sector = _HEADER.unpack(chain.read(mem, 16))
        room = chain.out_room - 1
        written = 0
        try:
            if typ == T_IN:
                status = self._check(sector, room)
                if status == S_OK:
                    if self._started(queue, chain, mem, 0, room, sector, False):
                        return ASYNC
                    views = chain.views(mem, True, 0, room)
                    try:
                        self.image.readinto(sector * SECTOR, views)
                    finally:  # even a failed read may have written some of them
                        chain.mark(mem, room)
                    written = room
            elif typ == T_OUT:
                length = chain.in_bytes - 16
                status = S_IOERR if self.read_only else self._check(sector, length)
                if status == S_OK:
                    copy = self.copy  # (the save's thread may end it meanwhile)
                    if self._started(queue, chain, mem, 16, length, sector, True):
                        if copy is not None:  # copied before the batch is submitted
                            self._copy_first.append((sector * SECTOR, length))
                        return ASYNC
                    if copy is not None:
                        copy.before(sector * SECTOR, length)
                    self.image.writefrom(sector * SECTOR, chain.views(mem, False, 16, length))
            elif typ == T_FLUSH:
                self.image.sync()
                status = S_OK
            elif typ == T_GET_ID:
                ident = self.serial.encode()[:20].ljust(20, b"\0")
                written = chain.write(mem, ident[:room])
                status = S_OK
            elif typ in (T_DISCARD, T_WRITE_ZEROES):
                status = S_IOERR if self.read_only else self._ranges(chain, mem, typ)
            else:
                status = S_UNSUPP
        except OSError:
            status = S_IOERR
        chain.write_last(mem, _STATUS[status])
        return written + 1

    def _started(self, queue: int, chain: Chain, mem: Memory, skip: int, length: int,
                 sector: int, write: bool) -> bool:
        """Put the transfer in the AIO batch if this disk can (direct, buffers 512-byte
        aligned, room in the context); False: the caller does it synchronously."""
        if self.aio is None:
            return False
        self._mem = mem
        spans = chain.spans(mem, not write, skip, length)
        for a, n in spans:
            if (a | n) % SECTOR:
                return False
        assert isinstance(self.image, RawImage)
        token = self.aio.add(self.image.fd, write, spans, sector * SECTOR)
        if token is None:
            return False
        self._flying[token] = (queue, chain, length, write, sector * SECTOR)
        return True

    def commit(self) -> None:
        """Start the batch (the transport calls this when a pass over a queue is done);
        what the kernel would not take is done here, synchronously, and reaped as usual."""
        if self.aio is None:
            return
        if self._copy_first:  # a checkpoint's disk copy: the old data of the batch's
            copy, ranges, self._copy_first = self.copy, self._copy_first, []  # writes first
            if copy is not None:
                copy.before_many(ranges)
        for token in self.aio.submit():
            queue, chain, length, write, offset = self._flying.pop(token)
            self._later.append((queue, chain, length, write,
                                self._sync(chain, length, write, offset)))
        if self._later:
            os.eventfd_write(self.aio.fd, 1)

    def _sync(self, chain: Chain, length: int, write: bool, offset: int) -> int:
        assert self._mem is not None
        try:
            if write:
                self.image.writefrom(offset, chain.views(self._mem, False, 16, length))
            else:
                self.image.readinto(offset, chain.views(self._mem, True, 0, length))
        except Exception:  # an I/O error status, whatever went wrong
            return -5
        return length

    def reap(self, mem: Memory, limit: int) -> list[tuple[int, Chain, int]]:
        """Up to `limit` finished requests, completed in guest RAM: (queue, chain, bytes
        written); the rest wait for the next call, the completion fd kept readable."""
        if self.aio is None:
            return []
        finished, self._later = self._later, []
        for token, res in self.aio.reap():
            queue, chain, length, write, _ = self._flying.pop(token)
            finished.append((queue, chain, length, write, res))
        finished, self._later = finished[:limit], finished[limit:]
        if self._later:
            os.eventfd_write(self.aio.fd, 1)
        out: list[tuple[int, Chain, int]] = []
        for queue, chain, length, write, res in finished:
            room = chain.out_room - 1
            try:
                if not write:
                    chain.mark(mem, length)
                ok = res == length  # a short transfer is an error, as a disk has it
                chain.write_last(mem, _STATUS[S_OK if ok else S_IOERR])
                out.append((queue, chain, (room if ok and not write else 0) + 1))
            except Exception:  # any failure ends the request (the device breaks), never
                out.append((queue, chain, -1))  # drops it: it is counted in flight
        return out

    def _check(self, sector: int, length: int) -> int:
        if length % SECTOR or sector + length // SECTOR > self.sectors:
            return S_IOERR
        return S_OK

    def _ranges(self, chain: Chain, mem: Memory, typ: int) -> int:
        body = chain.read(mem, 16 + 16 * MAX_SEGMENTS + 1)[16:]
        if len(body) % 16 or not body or len(body) > 16 * MAX_SEGMENTS:
            return S_IOERR  # ragged, empty, or more ranges than max_discard_seg allows
        ranges = list(struct.iter_unpack("<QII", body))
        for sector, count, flags in ranges:
            if typ == T_DISCARD and flags & 1:
                return S_UNSUPP  # the unmap flag is for write-zeroes only
            if sector + count > self.sectors or count > MAX_RANGE_SECTORS:
                return S_IOERR
        copy = self.copy
        for sector, count, _flags in ranges:
            if copy is not None:
                copy.before(sector * SECTOR, count * SECTOR)
            self.image.discard(sector * SECTOR, count * SECTOR)
        return S_OK

    def close(self) -> None:
        self.end_copy()
        if self.aio is not None:
            self.aio.close()  # waits for requests in flight: their buffers are guest RAM
        self.image.close()
