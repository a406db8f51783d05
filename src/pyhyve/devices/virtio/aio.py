"""Linux native AIO (io_setup, io_submit, io_getevents), for a disk opened with O_DIRECT.

Why not threads: a request handed from the device's thread to a pool thread and back costs
two wake-ups and two GIL hand-overs, more than a 4 KiB read from an SSD takes; and threads
run Python one at a time anyway. With native AIO the device's one thread submits a request
in one system call and learns of its completion through an eventfd it already waits on
(IOCB_FLAG_RESFD), so 32 requests in flight cost 32 submissions, not 32 threads. The kernel
runs O_DIRECT AIO truly asynchronously on ext4 and XFS (buffered AIO would block in
io_submit, so it is not used for buffered disks). QEMU calls this aio=native.

The buffers are guest RAM, given by host address and pinned by the kernel for the
transfer; guest RAM stays mapped while a request is in flight (the device's quiesce waits
for them before anything remaps it), and `close` waits for every request in flight
(io_destroy).
"""

from __future__ import annotations

import contextlib
import ctypes as C
import ctypes.util
import errno
import os
import struct
from collections.abc import Sequence

_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209
_CMD_PREAD, _CMD_PWRITE, _CMD_PREADV, _CMD_PWRITEV = 0, 1, 7, 8
_FLAG_RESFD = 1
_EVENT = struct.Struct("<QQqq")  # struct io_event: data, obj, res, res2
MAX_IOV = 1024  # IOV_MAX

_libc = C.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = C.c_long


class _Iocb(C.Structure):
    _fields_ = [("aio_data", C.c_uint64), ("aio_key", C.c_uint32),
                ("aio_rw_flags", C.c_int32), ("aio_lio_opcode", C.c_uint16),
                ("aio_reqprio", C.c_int16), ("aio_fildes", C.c_uint32),
                ("aio_buf", C.c_uint64), ("aio_nbytes", C.c_uint64),
                ("aio_offset", C.c_int64), ("aio_reserved2", C.c_uint64),
                ("aio_flags", C.c_uint32), ("aio_resfd", C.c_uint32)]


class _Event(C.Structure):
    _fields_ = [("data", C.c_uint64), ("obj", C.c_uint64), ("res", C.c_int64),
                ("res2", C.c_int64)]


class _Iovec(C.Structure):
    _fields_ = [("base", C.c_void_p), ("len", C.c_size_t)]


def _syscall(nr: int, *args: object) -> int:
    while True:
        r = int(_libc.syscall(C.c_long(nr), *args))
        if r >= 0:
            return r
        e = C.get_errno()
        if e != errno.EINTR:  # a signal (or a debugger's stop) is no I/O error
            raise OSError(e, os.strerror(e))


def address(v: memoryview) -> int:
    """Where a writable view's first byte is."""
    return C.addressof(C.c_char.from_buffer(v)) if len(v) else 0


class Aio:
    """One AIO context of `depth` requests; completions signal `fd` (an eventfd). The
    control blocks are allocated once, one slot per request in flight."""

    def __init__(self, depth: int) -> None:
        ctx = C.c_ulong(0)
        _syscall(_SYS_IO_SETUP, C.c_long(depth), C.byref(ctx))
        self._ctx = ctx
        self.depth = depth
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._events = (_Event * depth)()
        self._ev = memoryview(self._events).cast("B")  # completions, unpacked in bulk
        self._cbs = (_Iocb * depth)()
        for slot, cb in enumerate(self._cbs):  # what never changes for a slot
            cb.aio_data, cb.aio_flags, cb.aio_resfd = slot, _FLAG_RESFD, self.fd
        self._ptrs = (C.POINTER(_Iocb) * depth)(*[C.pointer(cb) for cb in self._cbs])
        self._iovs: dict[int, C.Array[_Iovec]] = {}  # slot -> its vector, while in flight
        self._free = list(range(depth - 1, -1, -1))
        self._batch: list[int] = []  # slots prepared, not yet submitted
        self._flying = 0

    @property
    def in_flight(self) -> int:
        return self._flying

    def add(self, fd: int, write: bool, spans: Sequence[tuple[int, int]],
            offset: int) -> int | None:
        """Prepare a read into (or a write from) `spans`, (host address, length) of guest
        RAM, at `offset`, for the next submit(); its token, or None when the context is
        full. The memory must stay mapped until the token is reaped."""
        if not self._free or len(spans) > MAX_IOV:
            return None
        slot = self._free.pop()
        cb = self._cbs[slot]
        cb.aio_fildes, cb.aio_offset = fd, offset
        if len(spans) == 1:  # the usual request: one buffer, no vector
            cb.aio_lio_opcode = _CMD_PWRITE if write else _CMD_PREAD
            cb.aio_buf, cb.aio_nbytes = spans[0]
        else:
            iov = (_Iovec * len(spans))(*[_Iovec(a, n) for a, n in spans])
            self._iovs[slot] = iov
            cb.aio_lio_opcode = _CMD_PWRITEV if write else _CMD_PREADV
            cb.aio_buf, cb.aio_nbytes = C.addressof(iov), len(spans)
        self._batch.append(slot)
        return slot

    def submit(self) -> list[int]:
        """Start every prepared request in one system call: the block layer then sends the
        batch to the device together (one notification of a virtio disk below, not one
        per request). Returns the tokens that did not start; the caller does those, and
        they are free again."""
        batch, self._batch = self._batch, []
        started = 0
        if batch:
            ptrs = (C.POINTER(_Iocb) * len(batch))(*[self._ptrs[i] for i in batch])
            try:
                started = _syscall(_SYS_IO_SUBMIT, self._ctx, C.c_long(len(batch)), ptrs)
            except OSError:
                started = 0
        self._flying += started
        for slot in batch[started:]:
            self._release(slot)
        return batch[started:]

    def _release(self, slot: int) -> None:
        self._iovs.pop(slot, None)
        self._free.append(slot)

    def reap(self) -> list[tuple[int, int]]:
        """Completed requests, without waiting: (token, bytes moved or -errno)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        done: list[tuple[int, int]] = []
        while self._flying:
            n = _syscall(_SYS_IO_GETEVENTS, self._ctx, C.c_long(0), C.c_long(self.depth),
                         self._events, C.c_void_p(0))
            if n == 0:
                break
            self._flying -= n
            for token, _obj, res, _res2 in _EVENT.iter_unpack(self._ev[:_EVENT.size * n]):
                self._release(token)
                done.append((token, res))
        return done

    def close(self) -> None:
        """Wait for every request in flight, then free the context."""
        if self._ctx.value:
            _syscall(_SYS_IO_DESTROY, self._ctx)  # waits for requests in flight
            self._ctx = C.c_ulong(0)
            self._flying = 0
            os.close(self.fd)
