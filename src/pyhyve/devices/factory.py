"""Device kinds to device objects: the one place a VM description's `kind` is turned
into a device, given what the VM wires it to. New kinds (virtio) are added here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..description import CONSOLE_ID, SCI_IRQ, DeviceDesc, VmDescription
from ..errors import BootFailed
from .acpipm import AcpiPm
from .base import Device
from .console import Console, open_console
from .genid import VmGenId
from .misc import I8042, PostPort
from .pci import PciEcam, PciHostBridge
from .rtc import CmosRtc
from .uart import Uart

if TYPE_CHECKING:
    from ..machine.memory import GuestMemory
    from .virtio.msix import Irqfd


class DeviceBuildError(BootFailed, ValueError):
    pass


@dataclass(frozen=True)
class Wiring:
    """What a device may be connected to in its VM."""

    irq_line: Callable[[int, int], None]  # (irq, level)
    reset: Callable[[], None]             # the guest asked for a reset
    power_off: Callable[[], None]         # the guest powered itself off (ACPI S5)
    quit: Callable[[], None]              # the user asked to quit from a console
    console: Console | None = None        # com1's console, when the caller made one
    memory: GuestMemory | None = None     # what virtio devices read and write
    signal_msi: Callable[[int, int], bool] | None = None  # (address, data): an MSI
    ioeventfd: Callable[[int, int, int, bool], bool] | None = None  # KVM's, where offered
    irqfds: Callable[[int], Sequence[Irqfd] | None] | None = None  # n MSI irqfds, if offered
    pci_host: Callable[[], PciHostBridge | None] = lambda: None  # the VM's, for ECAM

VIRTIO_BAR_BASE = 0xE000_0000  # slot N's BAR0 at + N * 0x10000, in the MMIO hole


VIRTIO_DEFAULT_IRQ = 10


def pci_intx(desc: VmDescription) -> list[tuple[int, int]]:
    """(slot, IRQ) of every PCI device's INTA#, for the MP table and ACPI's _PRT."""
    return [(d.base, d.irq if d.irq is not None else VIRTIO_DEFAULT_IRQ)
            for d in desc.devices if d.bus == "pci"]


def make_device(d: DeviceDesc, wiring: Wiring) -> tuple[Device, Console | None]:
    """The device for `d`, and its console if it has one (the VM's console is com1's)."""
    if d.kind == "uart16550":
        given = wiring.console if d.id == CONSOLE_ID else None
        con = given if given is not None else open_console(d.backend or "null")
        con.on_quit = wiring.quit
        irq = d.irq if d.irq is not None else Uart.IRQ_COM1
        return Uart(con, lambda level: wiring.irq_line(irq, level)), con
    if d.kind == "i8042":
        return I8042(wiring.reset), None
    if d.kind == "post":
        return PostPort(), None
    if d.kind == "pci-host":
        return PciHostBridge(), None
    if d.kind == "pci-ecam":
        host = wiring.pci_host()
        if host is None:
            raise DeviceBuildError(f"device {d.id}: ECAM needs the PCI host bridge before it")
        return PciEcam(host), None
    if d.kind == "vmgenid":
        return VmGenId(), None
    if d.kind == "cmos-rtc":
        return CmosRtc(), None
    if d.kind == "acpi-pm":
        sci = d.irq if d.irq is not None else SCI_IRQ
        return AcpiPm(lambda level: wiring.irq_line(sci, level), wiring.power_off), None
    if d.kind.startswith("virtio-"):
        return _virtio(d, wiring), None
    raise DeviceBuildError(f"device {d.id}: kind {d.kind!r} cannot be built")


def _virtio(d: DeviceDesc, wiring: Wiring) -> Device:
    from .virtio.backend import Backend
    from .virtio.blk import Blk, DiskError
    from .virtio.console import VConsole
    from .virtio.net import Net, NetError
    from .virtio.pci import VirtioPci
    from .virtio.rng import Rng
    from .virtio.vsock import Vsock, VsockError

    assert wiring.memory is not None and wiring.signal_msi is not None
    if d.kind == "virtio-blk":
        if not d.backend:
            raise DeviceBuildError(f"device {d.id}: no disk image (--disk PATH)")
        try:
            backend: Backend = Blk(d.backend)
        except DiskError as e:
            raise DeviceBuildError(f"device {d.id}: {e}") from None
    elif d.kind == "virtio-net":
        try:
            backend = Net(d.backend or "loop")
        except NetError as e:
            raise DeviceBuildError(f"device {d.id}: {e}") from None
    elif d.kind == "virtio-vsock":
        try:
            backend = Vsock(d.backend or "")
        except VsockError as e:
            raise DeviceBuildError(f"device {d.id}: {e}") from None
    elif d.kind == "virtio-console":
        if not d.backend or not d.backend.startswith(("unix:", "file:")):
            raise DeviceBuildError(f"device {d.id}: its port needs unix:PATH or file:PATH")
        backend = VConsole(open_console(d.backend))
    else:
        backend = Rng()
    irq = d.irq if d.irq is not None else VIRTIO_DEFAULT_IRQ
    return VirtioPci(backend, wiring.memory, VIRTIO_BAR_BASE + d.base * 0x10000, irq,
                     wiring.irq_line, wiring.signal_msi, wiring.ioeventfd, wiring.irqfds)
