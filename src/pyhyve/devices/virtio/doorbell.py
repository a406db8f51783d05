"""Queue notifications through KVM ioeventfds: a guest's write to a queue's notify address
becomes a signal on an eventfd inside KVM, so the vCPU does not exit to this process (and
wait for the GIL) for every request. The device's worker thread (pci.py) waits on the
eventfds and serves the queues itself. Where KVM refuses (no KVM_CAP_IOEVENTFD, or an
address it will not take) the MMIO exit path serves the same writes; a write of another
width than the 16 bits drivers use exits too."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from .layout import NOTIFY, NOTIFY_MULT

Register = Callable[[int, int, int, bool], bool]  # (addr, length, fd, assign) -> done


class Doorbells:
    def __init__(self, queues: int, register: Register) -> None:
        self.register = register
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(queues)]
        self.base: int | None = None  # BAR0 address the eventfds are bound at
        self.rung = 0  # notifications that came this way (not through an exit)

    @property
    def active(self) -> bool:
        return self.base is not None

    def place(self, base: int | None) -> None:
        """Bind the queues' notify addresses at BAR0 `base` (None: nowhere)."""
        if base == self.base:
            return
        if self.base is not None:
            for i, fd in enumerate(self.fds):
                self.register(self.base + NOTIFY + NOTIFY_MULT * i, 2, fd, False)
            self.base = None
        if base is None:
            return
        done: list[int] = []
        for i, fd in enumerate(self.fds):
            if not self.register(base + NOTIFY + NOTIFY_MULT * i, 2, fd, True):
                for j in done:  # all or none: the exit path serves them all
                    self.register(base + NOTIFY + NOTIFY_MULT * j, 2, self.fds[j], False)
                return
            done.append(i)
        self.base = base

    def release(self) -> None:
        """Unbind and close the eventfds (the transport's worker no longer waits on them)."""
        self.place(None)
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
