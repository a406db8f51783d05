"""MSI through irqfd: a device's interrupt is a write to an eventfd, raised inside KVM.

KVM_SIGNAL_MSI is one ioctl per interrupt from the device's thread; with irqfd the thread
writes 8 bytes to an eventfd and KVM injects the message itself (QEMU and Firecracker do
the same). The eventfd is bound to a GSI, and the GSI to the message (address, data) by
KVM's routing table. KVM_SET_GSI_ROUTING replaces the whole table, so this one object per
VM owns it: the in-kernel irqchip's default routes for GSIs 0-23 (restated, so the PIC,
the IOAPIC and KVM_IRQ_LINE keep working) and one MSI route per vector handed out.

Nothing here is guest state: a device's MSI-X table is (it is saved and restored), and a
vector's route is set again from it the first time the vector fires.
"""

from __future__ import annotations

import contextlib
import os
import threading

from ..kvm import KvmError
from ..kvm import ioctls as I
from ..kvm.api import Vm

FIRST_MSI_GSI = 24  # 0-23: the irqchip's pins
MAX_MSI_ROUTES = 1000  # KVM allows 4096 routes; a VM of ours needs a few dozen


def default_routes() -> list[tuple[int, int, tuple[int, ...]]]:
    """What KVM_CREATE_IRQCHIP sets up: GSIs 0-15 on the PICs and the IOAPIC, 16-23 on
    the IOAPIC, each on the pin of its own number."""
    chip = I.KVM_IRQ_ROUTING_IRQCHIP
    routes: list[tuple[int, int, tuple[int, ...]]] = []
    for gsi in range(24):
        if gsi < 16:
            pic = I.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else I.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, chip, (pic, gsi % 8)))
        routes.append((gsi, chip, (I.KVM_IRQCHIP_IOAPIC, gsi)))
    return routes


class MsiVector:
    """One irqfd: `fire()` raises whatever message `route()` last set."""

    def __init__(self, routes: MsiRoutes, gsi: int, fd: int) -> None:
        self._routes, self.gsi, self.fd = routes, gsi, fd
        self.message: tuple[int, int] | None = None  # what KVM routes it to; None: nothing
        self.refused: tuple[int, int] | None = None  # the last message KVM would not take

    def route(self, address: int, data: int) -> bool:
        """Point this vector at (address, data); False if KVM refused the message (the
        caller then signals it another way; the same message is not offered again, so a
        guest's bad entry costs one table rebuild, not one per interrupt)."""
        msg = (address, data)
        if self.message != msg and self.refused != msg:
            ok = self._routes.set(self.gsi, address, data)
            self.message, self.refused = (msg, None) if ok else (None, msg)
        return self.message == msg

    def fire(self) -> None:
        os.eventfd_write(self.fd, 1)


class MsiRoutes:
    """The VM's GSI routing table and its irqfds."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        self._msi: dict[int, tuple[int, int]] = {}  # gsi -> (address, data)
        self._fds: dict[int, int] = {}  # gsi -> its eventfd
        self._next = FIRST_MSI_GSI

    def vectors(self, n: int) -> list[MsiVector] | None:
        """`n` new vectors, not routed yet (an unrouted one is never fired); None when KVM
        refuses irqfd or the table is full: the caller signals its MSIs by ioctl."""
        with self._lock:
            if self._next + n > FIRST_MSI_GSI + MAX_MSI_ROUTES:
                return None
            made: list[MsiVector] = []
            try:
                for _ in range(n):
                    gsi, fd = self._next, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                    self._fds[gsi] = fd
                    self._next += 1
                    made.append(MsiVector(self, gsi, fd))
                    self._vm.irqfd(fd, gsi)
            except (KvmError, OSError):
                for v in made:
                    self._drop(v.gsi)
                return None
            return made

    def set(self, gsi: int, address: int, data: int) -> bool:
        """Route `gsi` to the message (address, data); False, and the old route kept, if
        KVM refused the table."""
        with self._lock:
            old = self._msi.get(gsi)
            self._msi[gsi] = (address, data)
            try:
                self._push()
            except KvmError:
                if old is None:
                    del self._msi[gsi]
                else:
                    self._msi[gsi] = old
                return False
            return True

    def _push(self) -> None:
        msi = I.KVM_IRQ_ROUTING_MSI
        self._vm.set_gsi_routing(default_routes() + [
            (gsi, msi, (address & 0xFFFF_FFFF, address >> 32, data & 0xFFFF_FFFF))
            for gsi, (address, data) in sorted(self._msi.items())])

    def _drop(self, gsi: int) -> None:
        fd = self._fds.pop(gsi)
        with contextlib.suppress(KvmError):
            self._vm.irqfd(fd, gsi, assign=False)
        os.close(fd)
        self._msi.pop(gsi, None)

    def close(self, keep_fds: bool = False) -> None:
        """Unbind every irqfd (before the VM's fd closes) and close them; with `keep_fds`
        (a device thread outlived its close and may still fire) they stay open, unbound:
        a late write lands in an eventfd nobody reads, never in a reused descriptor."""
        with self._lock:
            for gsi in list(self._fds):
                if keep_fds:
                    with contextlib.suppress(KvmError):
                        self._vm.irqfd(self._fds[gsi], gsi, assign=False)
                else:
                    self._drop(gsi)
