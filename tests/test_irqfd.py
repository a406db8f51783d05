"""MSI-X through irqfd: an interrupt-driven driver (the kit guest sleeping in hlt until the
disk's vector fires) gets every completion, with irqfds and with KVM_SIGNAL_MSI alone, and
again after a suspend and restore (the routes are set anew from the restored table)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from pyhyve.description import default_description, with_virtio
from pyhyve.devices.virtio.msix import Msix
from pyhyve.kvm import ioctls as I
from pyhyve.machine import irqroute
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save
from pyhyve.vm import VirtualMachine, VmConfig

from conftest import CaptureConsole

MB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(os.urandom(4 * MB))
    return path


def bench_vm(kit, image, ms: int, extra: str = "") -> tuple[VirtualMachine, CaptureConsole]:
    con = CaptureConsole()
    desc = with_virtio(default_description("null"), [f"{image},direct"], False)
    vm = VirtualMachine.create(VmConfig("irq", 256 * MB, 1, kernel=kit["virtio"],
                                        cmdline=f"bench=blk bs=4096 qd=4 ms={ms} rand "
                                                f"span={2 * MB} irq {extra}",
                                        description=desc), console=con)
    return vm, con


def finished(con: CaptureConsole, timeout: float = 20) -> int:
    """Ops the guest completed. A vector that never reaches the guest leaves it asleep in
    hlt: no "BENCH end" line."""
    deadline = time.monotonic() + timeout
    while b" bytes=" not in con.buf and b"VIRTIO ERROR" not in con.buf:
        assert time.monotonic() < deadline, bytes(con.buf[-300:])
        time.sleep(0.02)
    assert b"VIRTIO ERROR" not in con.buf, bytes(con.buf[-300:])
    return int(bytes(con.buf).split(b"BENCH end ops=")[1].split()[0])


def test_the_routing_table_restates_every_irqchip_pin():
    routes = irqroute.default_routes()
    ioapic = sorted(gsi for gsi, _, (chip, pin) in routes
                    if chip == I.KVM_IRQCHIP_IOAPIC and pin == gsi)
    pic = sorted((gsi, chip, pin) for gsi, _, (chip, pin) in routes
                 if chip != I.KVM_IRQCHIP_IOAPIC)
    assert ioapic == list(range(24)) and len(routes) == 24 + 16
    assert pic == [(g, I.KVM_IRQCHIP_PIC_MASTER if g < 8 else I.KVM_IRQCHIP_PIC_SLAVE, g % 8)
                   for g in range(16)]


class FakeIrqfd:
    """A vector's irqfd as Msix sees it: records what it was routed to and fired with."""

    def __init__(self, refuse: tuple[int, int] | None = None) -> None:
        self.refuse, self.routed, self.fired = refuse, [], []
        self.message: tuple[int, int] | None = None

    def route(self, address: int, data: int) -> bool:
        if self.message != (address, data):
            self.routed.append((address, data))
            self.message = None if (address, data) == self.refuse else (address, data)
        return self.message is not None

    def fire(self) -> None:
        self.fired.append(self.message)


def msix_with(fds: list[FakeIrqfd]) -> tuple[Msix, list[tuple[int, int]]]:
    cap = 0x40
    function = SimpleNamespace(config=bytearray(256))
    function.config[cap + 3] = 0x80  # MSI-X enabled, function not masked
    by_ioctl: list[tuple[int, int]] = []
    m = Msix(len(fds), function, cap, lambda a, d: by_ioctl.append((a, d)) or True, fds)
    for v in range(len(fds)):  # unmasked, each to its own vector
        m.write_table(16 * v, 8, 0xFEE00000)
        m.write_table(16 * v + 8, 4, 0x40 + v)
        m.write_table(16 * v + 12, 4, 0)
    return m, by_ioctl


def test_a_vector_follows_its_table_entry_and_its_mask():
    fds = [FakeIrqfd(), FakeIrqfd()]
    m, by_ioctl = msix_with(fds)
    m.fire(0)
    assert fds[0].fired == [(0xFEE00000, 0x40)] and not by_ioctl
    m.write_table(8, 4, 0x51)  # the driver moves the vector: the next fire routes anew
    m.fire(0)
    assert fds[0].fired[-1] == (0xFEE00000, 0x51) and fds[0].routed[-1] == (0xFEE00000, 0x51)
    m.write_table(16 + 12, 4, 1)  # masked: remembered, not sent
    m.fire(1)
    assert fds[1].fired == [] and m.pending == 2
    m.write_table(16 + 8, 4, 0x52)
    m.write_table(16 + 12, 4, 0)  # unmasked: the pending one goes, with today's message
    assert fds[1].fired == [(0xFEE00000, 0x52)] and m.pending == 0
    m.fire(1, sync=True)  # a quiescing device: through the ioctl, in the APIC at once
    assert by_ioctl == [(0xFEE00000, 0x52)] and len(fds[1].fired) == 1


def test_a_message_kvm_refuses_goes_by_ioctl_and_is_not_offered_again():
    fds = [FakeIrqfd(refuse=(0xFEE00000, 0x40))]
    m, by_ioctl = msix_with(fds)
    for _ in range(3):
        m.fire(0)
    assert by_ioctl == [(0xFEE00000, 0x40)] * 3 and fds[0].fired == []


def test_a_refused_route_is_remembered_by_the_vector(monkeypatch):
    calls: list[int] = []
    routes = SimpleNamespace(set=lambda gsi, a, d: calls.append(gsi) or d != 0x99)
    v = irqroute.MsiVector(routes, 30, -1)  # type: ignore[arg-type]
    assert not v.route(0xFEE00000, 0x99) and not v.route(0xFEE00000, 0x99)
    assert calls == [30]  # one table rebuild for a bad message, not one per interrupt
    assert v.route(0xFEE00000, 0x41) and v.route(0xFEE00000, 0x41) and calls == [30, 30]


@pytest.mark.kvm
@pytest.mark.parametrize("irqfd", [True, False], ids=["irqfd", "signal-msi"])
def test_an_interrupt_driven_driver_gets_every_completion(kit, image, irqfd, monkeypatch):
    if not irqfd:  # a KVM without irqfd: every vector by KVM_SIGNAL_MSI
        monkeypatch.setattr(irqroute.MsiRoutes, "vectors", lambda self, n: None)
    vm, con = bench_vm(kit, image, 300)
    try:
        msix = vm.devices["disk0"].msix
        assert (msix.irqfds is not None) == irqfd
        vm.start()
        assert finished(con) > 20
        if irqfd:  # the vector went through its irqfd, routed to the guest's message
            assert msix.irqfds[0].message == (0xFEE00000, 0x40)
    finally:
        vm.close()


@pytest.mark.kvm
def test_interrupts_still_come_after_a_restore(kit, image, tmp_path):
    vm, con = bench_vm(kit, image, 2500, "mark=20")
    try:
        vm.start()
        con.wait_count(b".", 3, timeout=30)  # interrupts came; requests are in flight
        save(vm, str(tmp_path / "s"), "suspend")
    finally:
        vm.close()
    snap = open_snapshot(str(tmp_path / "s"))
    con2 = CaptureConsole()
    vm2 = restore(snap, console=con2, bindings={"disk0": f"{image},direct"})
    snap.close()
    try:
        assert vm2.devices["disk0"].msix.irqfds is not None
        vm2.start()
        assert finished(con2) > 20
    finally:
        vm2.close()
