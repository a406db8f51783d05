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
from collections.abc import Callable
from contextlib import AbstractContextManager

from ..machine.memory import GuestMemory

F_SETSIG = 10
POLL_S = 0.1


class LeaseGuard:
    def __init__(self, memory: GuestMemory, fd: int, path: str,
                 on_lost: Callable[[str], None],
                 paused: Callable[[], AbstractContextManager[None]]) -> None:
        self.memory, self.path, self.on_lost, self.paused = memory, path, on_lost, paused
        self.fd = os.dup(fd)
        self.size = os.fstat(self.fd).st_size
        self.depends = True
        self.released_because = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            fcntl.fcntl(self.fd, F_SETSIG, signal.SIGURG)
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            self.leased = True
        except OSError as e:
            self.leased = False
            self.released_because = f"no lease on {path} ({e.strerror}): copied in at restore"

    def start(self) -> None:
        """Watch the lease (or, without one, make the guest independent now)."""
        if not self.leased:
            self.materialize()
            return
        self._thread = threading.Thread(target=self._watch, name="snapshot-lease", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
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
            if lease != fcntl.F_RDLCK:  # a writer or truncate is waiting on us
                self.materialize()
                self.released_because = f"{self.path} was opened for writing: copied in"
                return

    def materialize(self) -> None:
        """Give the guest memory of its own for everything still mapped from the file,
        then let go of the file."""
        try:
            self.memory.detach_from_file(self.paused)
        except Exception as e:  # keep the lease: a writer waits lease-break-time, and a
            # size change after that stops the VM instead of feeding it wrong memory
            self.released_because = f"copying guest memory off the file failed: {e}"
            return
        self.depends = False
        self.release()

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(self.fd)
            self.fd = -1

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self.release()
