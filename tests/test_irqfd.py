"""MSI-X through irqfd: an interrupt-driven driver (the kit guest sleeping in hlt until the
disk's vector fires) gets every completion, with irqfds and with KVM_SIGNAL_MSI alone, and
again after a suspend and restore (the routes are set anew from the restored table)."""

from __future__ import annotations

import os
import time

import pytest

from pyhyve.description import default_description, with_virtio
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


def bench_vm(kit, image, ms: int) -> tuple[VirtualMachine, CaptureConsole]:
    con = CaptureConsole()
    desc = with_virtio(default_description("null"), [f"{image},direct"], False)
    vm = VirtualMachine.create(VmConfig("irq", 256 * MB, 1, kernel=kit["virtio"],
                                        cmdline=f"bench=blk bs=4096 qd=4 ms={ms} rand "
                                                f"span={2 * MB} irq",
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
    vm, con = bench_vm(kit, image, 2500)
    try:
        vm.start()
        deadline = time.monotonic() + 30
        while b"BENCH go" not in con.buf:
            assert time.monotonic() < deadline, bytes(con.buf[-300:])
            time.sleep(0.02)
        time.sleep(0.3)  # requests in flight, the guest asleep waiting for one
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
