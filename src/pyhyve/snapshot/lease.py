"""Keep a lazily restored guest safe from changes to its snapshot's memory file.

A lazy restore maps the memory file copy-on-write: pages the guest has not written are
read from the file when touched. Truncating or rewriting the file under a running guest
would feed it zeroes or someone else's bytes (it triple-faulted when tried). So the VMM
holds a read lease (F_SETLEASE) on the file while the guest depends on it. Anyone who
opens the file for writing or truncates it is held back by the kernel until the lease is
given up (for at most /proc/sys/fs/lease-break-time seconds); in that time the guard
gives every range the guest still maps from the file anonymous memory of its own with the
same bytes (GuestMemory.detach_from_file: allocated while the guest runs, copied and
swapped in during a short pause), then releases the lease. Copy-on-write alone would not
do: a truncate drops even the private copies of a file's pages. The guest sees only the
pause; the VM no longer depends on the file, and `--status` says so.

Lease-break notice comes as a signal (we direct it to SIGURG, ignored by default) and is
also visible to F_GETLEASE, which the guard polls ten times a second: no signal handler,
so a restore may run on any thread. If the lease cannot be taken (a writer already has
the file open, or the file system has no leases) the guest is made independent before it
starts. Should the file still change size under the guest (lease-break-time set very
low), the VM is stopped with one clear line rather than run on wrong memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from ..machine.memory import GuestMemory
from .files import F_SETSIG
from .prefetch import Prefetcher

POLL_S = 0.1


def take_lease(fd: int) -> str:
    """Take a read lease on `fd` (its open file description: dups share it). Returns ""
    or why it could not be taken. Done right after opening the memory file, before its
    checksum is computed, so nobody can change the bytes between the check and their use."""
    try:
        fcntl.fcntl(fd, F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return ""
    except OSError as e:
        return e.strerror or str(e)


def lease_break_time() -> float:
    try:
        with open("/proc/sys/fs/lease-break-time") as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return 45.0


class LeaseGuard:
    def __init__(self, memory: GuestMemory, fd: int, path: str, size: int, lease_error: str,
                 on_lost: Callable[[str], None],
                 paused: Callable[[], AbstractContextManager[None]]) -> None:
        """`fd`: the memory file, on which take_lease() was called (`lease_error` is what
        it returned); `size`: the file's size as the snapshot's metadata states it."""
        self.memory, self.path, self.on_lost, self.paused = memory, path, on_lost, paused
        self.fd = os.dup(fd)
        self.size = size
        self.prefetch: Prefetcher | None = None
        self.depends = True
        self.note = ""
        self.leased = not lease_error
        if lease_error:
            self.note = f"no lease on {path} ({lease_error}): copied in at restore"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Watch the lease (or, without one, make the guest independent now)."""
        if not self.leased:
            try:
                self.memory.detach_from_file(self.paused)
                self.depends = False
            except (OSError, ValueError) as e:
                self.note = f"no lease on {self.path}, and copying in failed: {e}"
            self.release()
            return
        self._thread = threading.Thread(target=self._watch, name="snapshot-lease", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        broken_at = 0.0
        while not self._stop.wait(POLL_S):
            try:
                lease = fcntl.fcntl(self.fd, fcntl.F_GETLEASE)
                size = os.fstat(self.fd).st_size
            except OSError:
                lease, size = fcntl.F_UNLCK, -1
            if size != self.size:  # changed although we hold a lease: do not run on it
                self.on_lost(f"the snapshot memory file {self.path} changed size under the "
                             "running guest (it depends on that file; see --status)")
                return
            if lease == fcntl.F_RDLCK:
                continue
            # a writer or a truncate waits on us: move off the file, retrying until the
            # kernel's lease-break-time is nearly up, then stop rather than run on it
            broken_at = broken_at or time.monotonic()
            if self.materialize():
                return
            if time.monotonic() - broken_at > max(0.5, lease_break_time() - 2 * POLL_S - 1):
                self.on_lost(f"could not move guest memory off {self.path} before a writer "
                             f"got through ({self.note})")
                return

    def materialize(self) -> bool:
        """Give the guest memory of its own for everything still mapped from the file,
        then let go of the file. False (lease kept, note set) if that failed."""
        try:
            self.memory.detach_from_file(self.paused)
        except Exception as e:
            self.note = f"copying guest memory off the file failed: {e}"
            return False
        self.depends = False
        self.note = f"{self.path} was opened for writing: guest memory moved off it"
        self.release()
        return True

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(self.fd)
            self.fd = -1

    def dependency(self) -> dict[str, object]:
        """For `--status`: whether the guest still reads pages from the file."""
        out: dict[str, object] = {"depends_on_snapshot": self.depends, "snapshot_file": self.path}
        if self.note:
            out["snapshot_note"] = self.note
        return out

    def stop(self) -> None:
        if self.prefetch is not None:  # its thread touches the mappings too
            self.prefetch.stop()
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self.release()
