"""userfaultfd: guest pages that arrive while the guest already runs (post-copy's
destination), served on first touch.

`Userfaultfd` is the kernel interface (x86_64; MISSING mode on anonymous memory).
`PageServer` owns one for a VM's RAM: a page marked missing is faulted in from a page
source when the guest (a vCPU inside KVM_RUN, or any thread of ours) first touches it,
and a background push fills in the rest between faults, 2 MiB at a time, so a fault never
waits behind more than one chunk. A page not missing that is not there either (never
written: a zero page) is given zeros. Measured on our host (2026-11-29): a 4 KiB fault
served from Python costs ~44 us from touch to resume; 64 KiB around each fault and a
2 MiB push brought a guest's 64 MiB working set in within ~31 ms.

Rules for users of guest memory while a server runs: a thread that holds the GIL must not
touch a page that is not there (missing, or a zero page never written): the server needs
the GIL to place it, so the thread would wait forever. GuestMemory's accessors (read,
write, span, address, fill, view) therefore call `prepare` first, which faults the range
in through madvise(MADV_POPULATE_WRITE) from ctypes: the GIL is released while the kernel
waits for the server, exactly as a vCPU waits inside KVM_RUN. Views taken before the
server started may point at dropped pages: `drop_missing` bumps `memory.epoch`, and the
virtqueues take their ring views again (through span, so prepared). A fault for a page
that another path filled meanwhile gets EEXIST from UFFDIO_COPY: the faulting thread is
then woken with UFFDIO_WAKE, or it would sleep forever.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import select
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .memory import PAGE

if TYPE_CHECKING:
    import numpy as np

    from .memory import GuestMemory

_libc = C.CDLL(None, use_errno=True)
_libc.syscall.restype = C.c_long
_libc.ioctl.argtypes = [C.c_int, C.c_ulong, C.c_void_p]
_libc.ioctl.restype = C.c_int
_libc.madvise.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
_libc.read.argtypes = [C.c_int, C.c_void_p, C.c_size_t]
_libc.read.restype = C.c_ssize_t

SYS_USERFAULTFD = 323  # x86_64
UFFD_API = 0xAA
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
MADV_DONTNEED = 4


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | 0xAA << 8 | nr


class _Range(C.Structure):
    _fields_ = [("start", C.c_uint64), ("len", C.c_uint64)]


class _Api(C.Structure):
    _fields_ = [("api", C.c_uint64), ("features", C.c_uint64), ("ioctls", C.c_uint64)]


class _Register(C.Structure):
    _fields_ = [("range", _Range), ("mode", C.c_uint64), ("ioctls", C.c_uint64)]


class _Copy(C.Structure):
    _fields_ = [("dst", C.c_uint64), ("src", C.c_uint64), ("len", C.c_uint64),
                ("mode", C.c_uint64), ("copy", C.c_int64)]


class _Msg(C.Structure):
    _fields_ = [("event", C.c_uint8), ("r1", C.c_uint8), ("r2", C.c_uint16), ("r3", C.c_uint32),
                ("flags", C.c_uint64), ("address", C.c_uint64), ("ptid", C.c_uint32),
                ("pad", C.c_uint32)]


UFFDIO_API = _ioc(3, 0x3F, C.sizeof(_Api))
UFFDIO_REGISTER = _ioc(3, 0x00, C.sizeof(_Register))
UFFDIO_UNREGISTER = _ioc(2, 0x01, C.sizeof(_Range))
UFFDIO_WAKE = _ioc(2, 0x02, C.sizeof(_Range))
UFFDIO_COPY = _ioc(3, 0x03, C.sizeof(_Copy))
assert C.sizeof(_Msg) == 32


class UffdError(OSError):
    pass


def _check(r: int, what: str) -> int:
    if r < 0:
        e = C.get_errno()
        raise UffdError(e, f"{what}: {os.strerror(e)}")
    return r


class Userfaultfd:
    """One userfaultfd (non-blocking, close-on-exec), with only the features we use:
    asking for more made the first fault hang on our host."""

    def __init__(self) -> None:
        self.fd = _check(_libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK),
                         "userfaultfd (root, or vm.unprivileged_userfaultfd=1, is needed)")
        api = _Api(UFFD_API, UFFD_FEATURE_THREAD_ID, 0)  # kept alive across the call
        try:
            _check(_libc.ioctl(self.fd, UFFDIO_API, C.addressof(api)), "UFFDIO_API")
        except BaseException:
            os.close(self.fd)
            raise
        self._msgs = (_Msg * 64)()

    def register(self, addr: int, length: int) -> None:
        """Faults on missing pages of [addr, addr+length) come to us from now on."""
        reg = _Register(_Range(addr, length), UFFDIO_REGISTER_MODE_MISSING, 0)
        _check(_libc.ioctl(self.fd, UFFDIO_REGISTER, C.addressof(reg)), "UFFDIO_REGISTER")

    def unregister(self, addr: int, length: int) -> None:
        rng = _Range(addr, length)
        _check(_libc.ioctl(self.fd, UFFDIO_UNREGISTER, C.addressof(rng)), "UFFDIO_UNREGISTER")

    def wake(self, addr: int, length: int) -> None:
        rng = _Range(addr, length)
        _check(_libc.ioctl(self.fd, UFFDIO_WAKE, C.addressof(rng)), "UFFDIO_WAKE")

    def copy(self, dst: int, src: int, length: int) -> int:
        """Place [src, src+length) at dst (page-aligned) and wake who waits there; a page
        that is there already is skipped (and its waiters woken). Returns pages placed.
        Local failures (EINVAL, ENOMEM, ENOENT: the mapping is gone) raise UffdError."""
        placed = done = 0
        while done < length:
            st = _Copy(dst + done, src + done, length - done, 0, 0)
            if _libc.ioctl(self.fd, UFFDIO_COPY, C.addressof(st)) == 0:
                placed += st.copy // PAGE
                done += st.copy
                continue
            e = C.get_errno()
            if st.copy > 0:  # part of it went in before the error
                placed += st.copy // PAGE
                done += st.copy
            elif e == errno.EEXIST:
                self.wake(dst + done, PAGE)
                done += PAGE
            elif e != errno.EAGAIN:
                raise UffdError(e, f"UFFDIO_COPY: {os.strerror(e)}")
        return placed

    def faults(self, timeout: float | None) -> list[int]:
        """Addresses of the page faults waiting (none after `timeout` seconds)."""
        if timeout is None or timeout > 0:
            ms = -1 if timeout is None else int(timeout * 1000)
            p = select.poll()
            p.register(self.fd, select.POLLIN)
            if not p.poll(ms):
                return []
        n = _libc.read(self.fd, self._msgs, C.sizeof(self._msgs))
        if n < 0:
            e = C.get_errno()
            if e in (errno.EAGAIN, errno.EINTR):
                return []
            raise UffdError(e, f"read(userfaultfd): {os.strerror(e)}")
        m = self._msgs
        return [m[i].address for i in range(n // C.sizeof(_Msg))
                if m[i].event == UFFD_EVENT_PAGEFAULT]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Source = Callable[[int, int], "bytes | bytearray | memoryview"]  # (first page, count) -> data


class PageServer:
    """Serves a VM's missing pages from `source` (file page numbers) on first touch, and
    pushes the rest in the background. `missing`: bool per file page; pages not in it
    that are not there are zero pages. Call `start()` after `drop_missing()`, before the
    guest runs; `done` is set once every missing page is in and RAM is ordinary memory
    again (`error` says why not, if the server failed). Without a source (remote mode)
    there is no thread: the caller polls `fileno()`, asks for what `take_faults()` names,
    and hands arriving pages to `deliver()`."""

    FAULT_BLOCK = 16   # pages served around a fault (64 KiB)
    PUSH_BLOCK = 512   # pages per background step (2 MiB)

    def __init__(self, memory: GuestMemory, missing: np.ndarray,
                 source: Source | None = None) -> None:
        import numpy as np

        self.memory, self.source = memory, source
        self.missing = missing.copy()
        self.ready = np.zeros(len(missing), dtype=bool)  # prepared: there for good
        self.prepared_missing = 0  # accesses of ours that had to wait for the source
        self.aborted = False  # abort(): the VM is closing
        self.left = int(np.count_nonzero(self.missing))
        self.faults_served = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._uffd = Userfaultfd()
        self._zeros = C.create_string_buffer(self.FAULT_BLOCK * PAGE)
        self._push_at = 0
        self._thread = threading.Thread(target=self._run, name="page-server", daemon=True)

    # --- setup ------------------------------------------------------------------------
    def drop_missing(self) -> None:
        """Route faults on all of guest RAM to us, then make every missing page really
        missing (what was there is stale). In that order: khugepaged could otherwise
        refill a dropped page with zeros before the range is ours. Our own accesses to guest
        memory are `prepare`d from here on, and views taken before are taken again."""
        from ..machine.dirty import runs_of

        for r in self.memory.regions:
            self._uffd.register(r.host_addr, r.size)
        for page, count in runs_of(self.missing):
            for off, n in self.memory.pieces(page * PAGE, (page + count) * PAGE, 1 << 30):
                _check(_libc.madvise(C.c_void_p(self._host(off)), C.c_size_t(n), MADV_DONTNEED),
                       "madvise(MADV_DONTNEED)")
        self.memory.prepare = self.prepare
        self.memory.epoch += 1

    def prepare(self, gpa: int, length: int) -> None:
        """Make guest-physical [gpa, gpa+length) present before a thread of ours touches it:
        the kernel faults what is not there to this server, with the GIL released (see the
        rules above). Once a page is there it stays, so each is prepared once. Ranges
        outside RAM are left to the caller's own check."""
        for r in self.memory.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                end = min(gpa + max(length, 1), r.gpa + r.size)
                first = (r.layout.file_offset + gpa - r.gpa) // PAGE
                last = (r.layout.file_offset + end - r.gpa - 1) // PAGE
                if self.ready[first:last + 1].all():
                    return
                if self.missing[first:last + 1].any():
                    self.prepared_missing += 1
                ok = self.memory.populate(first * PAGE, (last + 1 - first) * PAGE, True)
                if self.aborted:  # woken by abort(): what is there may be zeros
                    self._refuse(gpa, length)
                if not ok:
                    raise ValueError(f"guest memory at {gpa:#x} could not be brought in "
                                     "(post-copy)")
                self.ready[first:last + 1] = True
                if end < gpa + length:  # it goes on in the next region
                    self.prepare(end, gpa + length - end)
                return

    def close(self) -> None:
        """Give the userfaultfd back (a migration that failed before the guest ran)."""
        self.memory.prepare = None
        self._uffd.close()

    def abort(self) -> None:
        """The VM is closing with pages still to come: give the userfaultfd back, so what
        waits on it wakes (a missing page then reads as zeros), and refuse every access of
        ours from here on, so no device acts on those zeros (a disk write of a buffer that
        never arrived would put them in the image)."""
        self.aborted = True
        if not self.done.is_set():
            self.memory.prepare = self._refuse
        self._uffd.close()

    def _refuse(self, gpa: int, length: int) -> None:
        raise ValueError(f"guest memory at {gpa:#x} never arrived (the VM is closing)")

    def start(self) -> None:
        self._thread.start()

    # --- address arithmetic -------------------------------------------------------------
    def _host(self, off: int) -> int:
        for r in self.memory.regions:
            base = r.layout.file_offset
            if base <= off < base + r.size:
                return r.host_addr + off - base
        raise ValueError(f"file offset {off:#x} is not guest RAM")

    def _page_of(self, addr: int) -> int | None:
        for r in self.memory.regions:
            if r.host_addr <= addr < r.host_addr + r.size:
                return (r.layout.file_offset + addr - r.host_addr) // PAGE
        return None

    # --- serving --------------------------------------------------------------------------
    def _serve(self, first: int, count: int) -> None:
        """Place the missing pages of [first, first+count) from the source."""
        assert self.source is not None
        with self._lock:
            end = min(first + count, len(self.missing))
            p = first
            while p < end:
                if not self.missing[p]:
                    p += 1
                    continue
                q = p
                while q < end and self.missing[q]:
                    q += 1
                data = self.source(p, q - p)
                if len(data) != (q - p) * PAGE:
                    raise UffdError(errno.EIO, f"page source gave {len(data)} bytes for "
                                               f"{q - p} pages")
                self._place_locked(p, data)
                p = q

    def _place_locked(self, first: int, data: bytes | bytearray | memoryview | None) -> None:
        """Copy `data` (None: zeros) to pages from `first` on, where still missing."""
        import numpy as np

        count = (len(data) if data is not None else 0) // PAGE
        buf = None
        if data is not None:
            try:  # a writable buffer (a received frame) is copied from where it is
                buf = (C.c_char * len(data)).from_buffer(data)
            except (TypeError, ValueError):
                buf = (C.c_char * len(data)).from_buffer_copy(data)
        todo = np.flatnonzero(self.missing[first:first + count])
        if len(todo) == 0:
            return
        from ..machine.dirty import runs_of

        for a, n in runs_of(self.missing[first:first + count]):
            for off, k in self.memory.pieces((first + a) * PAGE, (first + a + n) * PAGE, 1 << 30):
                src = C.addressof(buf) + off - first * PAGE if buf is not None else 0
                if self._uffd.copy(self._host(off), src, k) != k // PAGE:
                    raise UffdError(errno.EEXIST, f"guest page {off // PAGE} that was to come "
                                                  "from the source was filled here first")
        self.missing[first:first + count] = False
        self.left -= len(todo)

    # --- remote mode: the pages come over a connection (post-copy's destination) -------
    def fileno(self) -> int:
        return self._uffd.fd

    def take_faults(self) -> list[int]:
        """Remote mode: read the faults waiting; serve never-written pages with zeros at
        once; return the FAULT_BLOCK-aligned first pages of the missing ones (to ask the
        source for, first)."""
        out = []
        for addr in self._uffd.faults(0):
            page = self._page_of(addr)
            if page is None:
                continue
            self.faults_served += 1
            with self._lock:
                if self.missing[page]:
                    block = page // self.FAULT_BLOCK * self.FAULT_BLOCK
                    if block not in out:
                        out.append(block)
                else:
                    self._uffd.copy(addr // PAGE * PAGE, C.addressof(self._zeros), PAGE)
        return out

    def deliver(self, first: int, data: bytes | bytearray | memoryview) -> None:
        """Remote mode: pages from `first` on arrived; place those still missing."""
        with self._lock:
            self._place_locked(first, data)

    def finish(self) -> None:
        """Remote mode, every page in: RAM is ordinary memory again."""
        for r in self.memory.regions:
            self._uffd.unregister(r.host_addr, r.size)
        self.memory.prepare = None
        self.done.set()

    def _fault(self, addr: int) -> None:
        page = self._page_of(addr)
        if page is None:
            return
        self.faults_served += 1
        first = page // self.FAULT_BLOCK * self.FAULT_BLOCK
        if self.missing[page]:
            self._serve(first, self.FAULT_BLOCK)
        else:  # a page never written: zeros (EEXIST if it came in meanwhile: just woken)
            self._uffd.copy(addr // PAGE * PAGE, C.addressof(self._zeros), PAGE)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.left:
                for addr in self._uffd.faults(0):
                    self._fault(addr)
                self._push()
            if not self._stop.is_set():  # all in: RAM is ordinary memory again (the kernel
                for r in self.memory.regions:  # wakes whoever still waits, to fault as usual)
                    self._uffd.unregister(r.host_addr, r.size)
                self.memory.prepare = None
                self.done.set()
        except BaseException as e:  # the guest waits on us: say why it will wait forever
            self.error = e

    def _push(self) -> None:
        import numpy as np

        nxt = np.flatnonzero(self.missing[self._push_at:])
        if len(nxt) == 0:
            self._push_at = 0
            return
        start = self._push_at + int(nxt[0])
        self._serve(start, self.PUSH_BLOCK)
        self._push_at = start + self.PUSH_BLOCK

    def stop(self) -> None:
        """Stop serving (the VM is gone); the fd closes with it."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.close()
