"""Device kinds to device objects: the one place a VM description's `kind` is turned
into a device, given what the VM wires it to. New kinds (virtio) are added here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..description import CONSOLE_ID, DeviceDesc
from ..errors import BootFailed
from .base import Device
from .console import Console, open_console
from .genid import VmGenId
from .misc import I8042, PostPort
from .pci import PciHostBridge
from .uart import Uart


class DeviceBuildError(BootFailed, ValueError):
    pass


@dataclass(frozen=True)
class Wiring:
    """What a device may be connected to in its VM."""

    irq_line: Callable[[int, int], None]  # (irq, level)
    reset: Callable[[], None]             # the guest asked for a reset
    quit: Callable[[], None]              # the user asked to quit from a console
    console: Console | None = None        # com1's console, when the caller made one


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
    if d.kind == "vmgenid":
        return VmGenId(), None
    raise DeviceBuildError(f"device {d.id}: kind {d.kind!r} cannot be built")
