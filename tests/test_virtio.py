"""virtio over PCI: the kit's device guest drives virtio-blk and virtio-rng from ring 3;
suspend, restore and live migration taken while both are busy lose, repeat or corrupt no
block; the transport refuses hostile drivers with NEEDS_RESET, never a crash."""

from __future__ import annotations

import os
import re
import struct
import time

import pytest

from pyhyve import guestkit
from pyhyve.description import VmDescription, default_description, with_virtio
from pyhyve.devices.virtio.blk import Blk
from pyhyve.devices.virtio.layout import (
    COMMON,
    DEVICE,
    DRIVER_OK,
    F_VERSION_1,
    FEATURES_OK,
    ISR,
    MSIX_TABLE,
    NEEDS_RESET,
    NOTIFY,
)
from pyhyve.devices.virtio.pci import VirtioPci
from pyhyve.devices.virtio.rng import Rng
from pyhyve.pipeline.codec import decode, encode
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save
from pyhyve.vm import VirtualMachine, VmConfig
from test_virtqueue import AVAIL, DESC, USED, FakeRam, desc, offer

from conftest import CaptureConsole

MB = 1 << 20
BLOCKS = 32
_V = re.compile(rb"V(\d+) (\d+) (\d+)\r?\n")


def rounds(con) -> list[int]:
    return [int(m.group(1)) for m in _V.finditer(bytes(con.buf))]


def continued(before, after) -> None:
    """The guest's console across a save or migration is one stream (a line may be cut
    by the pause): its rounds run on with no gap and no repeat, and it never restarted."""
    got = [int(m.group(1)) for m in _V.finditer(bytes(before.buf) + bytes(after.buf))]
    assert got == list(range(1, len(got) + 1)), got
    assert rounds(after) and b"virtio ready" not in after.buf


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 * MB)
    return str(path)


def device_vm(kit, disk: str, name: str = "vio", port: str | None = None,
              net: str | None = None, frames: int = 16,
              extra: str = "") -> tuple[VirtualMachine, CaptureConsole]:
    con = CaptureConsole()
    desc_ = with_virtio(default_description("null"), [f"{disk},serial=kit-disk"], True,
                        vconsoles=[port] if port else None, nets=[net] if net else None)
    vm = VirtualMachine.create(VmConfig(name, 64 * MB, 1, kernel=kit["virtio"],
                                        cmdline=f"blocks={BLOCKS} frames={frames} {extra}",
                                        description=desc_),
                               console=con)
    return vm, con


def wait_rounds(con, n: int, timeout: float = 60) -> None:
    start = len(rounds(con))
    deadline_count = start + n
    con.wait_for("\n", timeout=timeout)
    import time
    end = time.monotonic() + timeout
    while len(rounds(con)) < deadline_count:
        assert b"VIRTIO ERROR" not in con.buf, bytes(con.buf[-300:])
        assert time.monotonic() < end, bytes(con.buf[-300:])
        time.sleep(0.02)
    assert b"VIRTIO ERROR" not in con.buf, bytes(con.buf[-300:])


def suspended_busy(kit, disk, path, n: int, **kw) -> CaptureConsole:
    """The device guest, suspended to `path` after `n` rounds while its devices are busy;
    returns its console."""
    vm, con = device_vm(kit, disk, **kw)
    try:
        vm.start()
        wait_rounds(con, n)
        save(vm, str(path), "suspend")
    finally:
        vm.close()
    return con


def runs_on(vm, before, after, disk: str | None = None) -> None:
    """Start a restored or received guest, let it make three rounds, and check that its
    console continued `before`'s (and, with `disk`, that the image is whole)."""
    if vm.state == "created":
        vm.start()
    wait_rounds(after, 3)
    continued(before, after)
    if disk is not None:
        vm.pause()
        guestkit.check_blocks(disk, BLOCKS)


def restored(path, bindings: dict[str, str], **kw) -> tuple[VirtualMachine, CaptureConsole]:
    snap = open_snapshot(str(path))
    con = CaptureConsole()
    try:
        return restore(snap, console=con, bindings=bindings, **kw), con
    finally:
        snap.close()


@pytest.mark.kvm
def test_the_device_guest_drives_blk_and_rng(kit, disk):
    vm, con = device_vm(kit, disk)
    try:
        vm.start()
        wait_rounds(con, 3)
        assert b"virtio ready: blk sectors=32768 rng" in con.buf
        assert rounds(con)[:3] == [1, 2, 3]
        # notifications came through KVM's ioeventfds, not MMIO exits (docs/devices.md)
        for name in ("disk0", "rng0"):
            bells = vm.devices[name].doorbells
            assert bells is not None and bells.active and bells.rung >= 3, name
        vm.pause()
        top, _ = guestkit.check_blocks(disk, BLOCKS)  # the image, read on the host
        assert top >= 3
    finally:
        vm.close()


@pytest.mark.kvm
@pytest.mark.parametrize("lazy,direct", [(False, False), (True, False), (False, True)],
                         ids=["eager", "lazy", "direct"])
def test_suspend_while_busy_then_restore_loses_no_block(kit, disk, tmp_path, lazy, direct):
    """`direct`: the disk's requests run on native AIO, so the suspend finds some in
    flight in the kernel; quiesce waits for them."""
    spec = f"{disk},direct" if direct else disk
    con = suspended_busy(kit, spec, tmp_path / "s", 2)  # mid-round: requests in flight
    guestkit.check_blocks(disk, BLOCKS)
    vm2, con2 = restored(tmp_path / "s", {"disk0": f"{spec},serial=kit-disk"}, lazy=lazy)
    try:
        runs_on(vm2, con, con2, disk)
    finally:
        vm2.close()


@pytest.mark.kvm
def test_restore_needs_the_disk_bound(kit, disk, tmp_path):
    from pyhyve.snapshot.format import SnapshotError

    suspended_busy(kit, disk, tmp_path / "s", 1)
    snap = open_snapshot(str(tmp_path / "s"))
    try:
        with pytest.raises(SnapshotError, match="disk0"):
            restore(snap, console=CaptureConsole())
    finally:
        snap.close()


@pytest.mark.kvm
@pytest.mark.parametrize("direct,postcopy", [(False, False), (True, False), (True, True),
                                             (False, True)],
                         ids=["buffered", "direct", "postcopy-direct", "postcopy-buffered"])
def test_live_migration_while_busy_loses_no_block(kit, disk, direct, postcopy):
    """Post-copy: the destination's device threads may read rings and buffers that are
    still on the source; each access brings its pages in first (machine/uffd.py), so
    neither a device nor the page server waits on the other. Whether any access finds a
    page missing here depends on who runs first (the push reaches the guest's few pages
    within milliseconds); the command-line test below, at 100 KiB/s, always has some."""
    from migrate_helpers import Destination, migrate

    vm, con = device_vm(kit, f"{disk},direct" if direct else disk)
    vm.start()
    wait_rounds(con, 2)
    dest = Destination(reuse_paths=True)  # shared storage: the same image
    opts = {"postcopy": True, "bandwidth": 64 << 20} if postcopy else {}
    stats = migrate(vm, dest, live=True, **opts)
    assert stats.state == "completed", stats.error
    try:
        runs_on(dest.vm, con, dest.console, disk)
    finally:
        dest.vm.close()
        vm.close()


@pytest.mark.kvm
@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_the_source_syncs_the_disk_before_the_destination_runs(kit, disk, monkeypatch,
                                                              postcopy):
    """The hand-over of a shared image: the source's disk is quiesced and its writes are
    on stable storage (fdatasync) before the destination's guest may run, so a
    destination on another host never reads an older block than the guest wrote."""
    from migrate_helpers import Destination, migrate

    events: list[str] = []
    real_sync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (events.append("sync"), real_sync(fd)))
    real_start = VirtualMachine.start

    def start(self, *args, **kw):
        events.append("start")
        real_start(self, *args, **kw)
    vm, con = device_vm(kit, disk)
    vm.start()
    wait_rounds(con, 2)
    monkeypatch.setattr(VirtualMachine, "start", start)
    events.clear()
    dest = Destination(reuse_paths=True)
    stats = migrate(vm, dest, live=True, **({"postcopy": True} if postcopy else {}))
    assert stats.state == "completed", stats.error
    try:
        assert "start" in events and "sync" in events[:events.index("start")], events
        runs_on(dest.vm, con, dest.console, disk)
    finally:
        dest.vm.close()
        vm.close()


@pytest.mark.kvm
def test_postcopy_of_a_paused_device_guest_arrives_paused_and_runs_on(kit, disk):
    """A paused guest arrives paused: the destination quiesces its devices before the guest
    runs, and they may wait on pages still on the source, so the page service is up
    first. Resumed, it goes on with no lost or repeated block."""
    from migrate_helpers import Destination, migrate

    vm, con = device_vm(kit, f"{disk},direct")
    vm.start()
    wait_rounds(con, 2)
    vm.pause()
    dest = Destination(reuse_paths=True)
    stats = migrate(vm, dest, live=True, postcopy=True, bandwidth=64 << 20,
                    recover_timeout=3.0)
    assert stats.state == "completed", stats.error
    try:
        assert dest.vm.state == "paused"
        dest.vm.resume()
        runs_on(dest.vm, con, dest.console, disk)
    finally:
        dest.vm.close()
        vm.close()


@pytest.mark.kvm
def test_postcopy_of_a_busy_device_guest_from_the_command_line(kit, disk, tmp_path, rundir,
                                                                keyfile):
    """Two pyhyve processes, as a user runs them: the device guest keeps its disk busy
    through a post-copy switch and after it, on the destination, with its pages still
    arriving (its data capped at 100 KiB/s, so they do for seconds). A destination whose
    device threads waited on the page server under Python's lock would print nothing
    more; here its rounds go on and the image is whole."""
    import socket
    import subprocess
    import time

    from conftest import cli, spawn, wait_file, wait_socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src_log, dst_log = tmp_path / "src.log", tmp_path / "dst.log"
    common = ["--disk", f"{disk},direct,serial=kit-disk", "--rng"]
    src = spawn("pyhyve", "run", "src", "-k", kit["virtio"], "-m", "64M", "--cmdline",
                f"blocks={BLOCKS} frames=16", *common, "--console", f"file:{src_log}",
                stderr=subprocess.PIPE, text=True)
    dst = spawn("pyhyve", "run", "dst", "-R", f"127.0.0.1,{port}", "--key-file", keyfile,
                "--reuse-paths", "--console", f"file:{dst_log}", stderr=subprocess.PIPE,
                text=True)
    try:
        wait_socket(rundir, "src")
        wait_file(src_log, "V2 ")
        r = cli("pyhyvectl", "--vm", "src", "--migrate-live", f"127.0.0.1:{port}",
                "--key-file", keyfile, "--postcopy", "--bandwidth", "100K", "--compress",
                "none", timeout=30)
        assert r.returncode == 0, r.stderr
        assert "post-copy pages to go 0" in r.stdout, r.stdout
        assert src.wait(30) == 0 and "(post-copy)" in src.stderr.read()
        wait_socket(rundir, "dst")
        before = len(rounds_in(src_log.read_bytes()))
        deadline = time.monotonic() + 60
        while len(rounds_in(dst_log.read_bytes())) < 3:
            assert time.monotonic() < deadline, dst_log.read_bytes()[-300:]
            time.sleep(0.05)
        assert cli("pyhyvectl", "--vm", "dst", "--pause").returncode == 0
        got = rounds_in(src_log.read_bytes() + dst_log.read_bytes())
        assert got == list(range(1, len(got) + 1)) and len(got) >= before + 3, got
        assert b"VIRTIO ERROR" not in dst_log.read_bytes()
        guestkit.check_blocks(disk, BLOCKS)
        assert cli("pyhyvectl", "--vm", "dst", "--destroy").returncode == 0
        dst.wait(30)
        said = re.search(r"post-copy: every page is here \((\d+) guest faults, (\d+) device "
                         r"accesses waited", dst.stderr.read())
        assert said, "the destination never had every page"
        assert int(said.group(2)) > 0, said.group(0)  # the case this test is for
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
            p.wait()


def rounds_in(out: bytes) -> list[int]:
    return [int(m.group(1)) for m in _V.finditer(out)]


# --- the transport against a hostile driver (no KVM) ---------------------------------------

class Host:
    """What a VirtioPci is wired to, recorded."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, int]] = []
        self.msis: list[tuple[int, int]] = []

    def irq_line(self, irq: int, level: int) -> None:
        self.lines.append((irq, level))

    def signal_msi(self, addr: int, data: int) -> bool:
        self.msis.append((addr, data))
        return True


class Locked(VirtioPci):
    """BAR accesses under the device's lock, as the MMIO bus makes them."""

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            super().write(offset, size, value)

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            return super().read(offset, size)


def rng_device() -> tuple[VirtioPci, FakeRam, Host]:
    ram, host = FakeRam(), Host()
    dev = Locked(Rng(), ram, 0xE001_0000, 10, host.irq_line, host.signal_msi)
    return dev, ram, host


def drive(dev: VirtioPci, size: int = 8, features: int = F_VERSION_1) -> None:
    """A driver's bring-up of queue 0 (rings at the FakeRam's addresses)."""
    w = dev.write
    w(COMMON + 0x14, 1, 1 | 2)
    w(COMMON + 0x08, 4, 1)
    w(COMMON + 0x0C, 4, features >> 32)
    w(COMMON + 0x08, 4, 0)
    w(COMMON + 0x0C, 4, features & 0xFFFF_FFFF)
    w(COMMON + 0x14, 1, 1 | 2 | FEATURES_OK)
    w(COMMON + 0x16, 2, 0)
    w(COMMON + 0x18, 2, size)
    w(COMMON + 0x20, 8, DESC)
    w(COMMON + 0x28, 8, AVAIL)
    w(COMMON + 0x30, 8, USED)
    w(COMMON + 0x1C, 2, 1)


def serve(dev: VirtioPci) -> None:
    """Run the worker's loop body once, here (no thread)."""
    dev._paused = False
    with dev.lock:
        for i in sorted(dev._kicked):
            dev._kicked.discard(i)
            dev._serve(i)


def one_request(dev: VirtioPci, ram: FakeRam) -> None:
    """Bring queue 0 up, offer one 32-byte writable buffer, notify, and serve it."""
    drive(dev)
    dev.write(COMMON + 0x14, 1, 1 | 2 | FEATURES_OK | DRIVER_OK)
    desc(ram, 0, 0x10000, 32, 2)
    offer(ram, dev.queues[0], 0)
    dev.write(NOTIFY, 2, 0)
    serve(dev)


def test_requests_complete_and_interrupt_by_intx_then_msix():
    dev, ram, host = rng_device()
    one_request(dev, ram)
    assert struct.unpack_from("<HHII", ram.b, USED) == (0, 1, 0, 32)
    assert any(ram.b[0x10000:0x10020]) and host.lines[-1] == (10, 1)
    assert dev.read(ISR, 1) == 1 and host.lines[-1] == (10, 0) and dev.read(ISR, 1) == 0
    # MSI-X: enable it, give queue 0 vector 1, leave the vector masked, then unmask
    cap = dev.msix.cap
    dev.function.write(cap + 2, 2, 0x8000)
    dev.write(COMMON + 0x16, 2, 0)
    dev.queues[0].ready = False
    dev.write(COMMON + 0x1A, 2, 1)
    dev.queues[0].ready = True
    dev.write(MSIX_TABLE + 16, 8, 0xFEE0_0000)
    dev.write(MSIX_TABLE + 24, 4, 0x41)
    offer(ram, dev.queues[0], 0)
    dev.write(NOTIFY, 2, 0)
    serve(dev)
    assert host.msis == [] and dev.msix.pending == 2  # masked: pending
    dev.write(MSIX_TABLE + 28, 4, 0)
    assert host.msis == [(0xFEE0_0000, 0x41)] and dev.msix.pending == 0


@pytest.mark.parametrize("case", ["loop", "bad-size", "misaligned", "outside-ram"])
def test_a_broken_queue_sets_needs_reset_and_the_device_lives_on(case):
    dev, ram, host = rng_device()
    size = 6 if case == "bad-size" else 8
    drive(dev, size=size)
    if case == "misaligned":
        dev.queues[0].ready = False
        dev.write(COMMON + 0x20, 8, DESC + 4)
        dev.write(COMMON + 0x1C, 2, 1)
    if case == "outside-ram":
        dev.queues[0].ready = False
        dev.write(COMMON + 0x30, 8, 1 << 40)
        dev.write(COMMON + 0x1C, 2, 1)
    dev.write(COMMON + 0x14, 1, 1 | 2 | FEATURES_OK | DRIVER_OK)
    if case == "loop":
        desc(ram, 0, 0x10000, 4, 1 | 2, 1)
        desc(ram, 1, 0x10000, 4, 1 | 2, 0)
        offer(ram, dev.queues[0], 0)
        dev.write(NOTIFY, 2, 0)
        serve(dev)
    assert dev.read(COMMON + 0x14, 1) & NEEDS_RESET
    assert (10, 1) in host.lines  # a configuration interrupt told the driver
    dev.write(COMMON + 0x14, 1, 0)  # and a reset brings it back
    assert dev.read(COMMON + 0x14, 1) == 0
    drive(dev)
    dev.write(COMMON + 0x14, 1, 1 | 2 | FEATURES_OK | DRIVER_OK)
    assert not dev.read(COMMON + 0x14, 1) & NEEDS_RESET


def test_a_backend_that_raises_breaks_the_device_but_never_wedges_it():
    """A bug in a device type (any exception from handle) is that request's end: NEEDS_RESET,
    nothing left counted in flight, so the driver's reset (and a pause) still return."""
    dev, ram, _ = rng_device()

    def broken(queue, chain, mem):
        raise ValueError("a device type's bug")
    dev.backend.handle = broken  # type: ignore[method-assign]
    one_request(dev, ram)
    assert dev.read(COMMON + 0x14, 1) & NEEDS_RESET and dev._inflight == 0
    dev.write(COMMON + 0x14, 1, 0)  # the reset would wait forever on a leaked request
    assert dev.read(COMMON + 0x14, 1) == 0


def test_features_never_offered_or_without_version_1_do_not_stick():
    dev, _ram, _ = rng_device()
    drive(dev, features=0)  # without VIRTIO_F_VERSION_1: FEATURES_OK does not stick
    assert not dev.read(COMMON + 0x14, 1) & FEATURES_OK
    drive(dev, features=F_VERSION_1 | (1 << 40))  # a feature never offered
    assert not dev.read(COMMON + 0x14, 1) & FEATURES_OK
    drive(dev)
    assert dev.read(COMMON + 0x14, 1) & FEATURES_OK


def test_a_notification_before_driver_ok_waits_for_it():
    """A driver that notifies before DRIVER_OK breaks the spec's order; the device's worker
    (the real thread) leaves the queue alone until DRIVER_OK, then serves what was
    offered. Not an error: the guest's request is only late, and a driver that fills a
    receive queue before DRIVER_OK (older Linux drivers did) keeps working."""
    dev, ram, _ = rng_device()
    drive(dev)
    desc(ram, 0, 0x10000, 32, 2)
    offer(ram, dev.queues[0], 0)
    dev.start()
    try:
        dev.write(NOTIFY, 2, 0)
        time.sleep(0.3)  # the worker had its chance
        assert struct.unpack_from("<H", ram.b, USED + 2)[0] == 0
        assert not any(ram.b[0x10000:0x10020]) and not dev.status & NEEDS_RESET
        dev.write(COMMON + 0x14, 1, 1 | 2 | FEATURES_OK | DRIVER_OK)
        deadline = time.monotonic() + 10
        while struct.unpack_from("<H", ram.b, USED + 2)[0] != 1:
            assert time.monotonic() < deadline, "not served after DRIVER_OK"
            time.sleep(0.01)
        assert any(ram.b[0x10000:0x10020])
    finally:
        dev.close()


def test_config_space_accesses_out_of_range_change_nothing():
    """PCI config writes past the 256-byte space (or straddling its end), and device
    config writes the device has no use for, are dropped; a read past the end reads 0 (no
    extended capability, as ECAM shows it). The device goes on working."""
    dev, ram, _ = rng_device()
    before = [dev.function.read(off, 4) for off in range(0, 256, 4)]
    for off, size in ((256, 4), (254, 4), (255, 2), (4096, 4), (250, 16)):
        dev.function.write(off, size, 0xFFFF_FFFF)
    assert [dev.function.read(off, 4) for off in range(0, 256, 4)] == before
    assert dev.function.read(256, 4) == 0
    dev.write(DEVICE + 0x800, 4, 1)  # a device config write rng has no use for
    one_request(dev, ram)
    assert struct.unpack_from("<HHII", ram.b, USED) == (0, 1, 0, 32)
    assert not dev.status & NEEDS_RESET


def test_transport_state_round_trips():
    dev, _ram, _ = rng_device()
    drive(dev)
    dev.write(COMMON + 0x14, 1, 1 | 2 | FEATURES_OK | DRIVER_OK)
    dev.write(MSIX_TABLE, 4, 0xFEE0_1000)
    st = dev.save()
    again = decode(type(st), encode(st))
    other, _, _ = rng_device()
    other.load_state(again)
    assert other.save() == st


def test_blk_refuses_out_of_range_and_read_only_writes(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(bytes(8192))
    ram = FakeRam()
    for spec, typ, sector, status in ((f"{path}", 0, 16, 1), (f"{path}", 1, 16, 1),
                                      (f"{path},ro", 1, 0, 1),
                                      (f"{path}", 99, 0, 2), (f"{path}", 0, 0, 0)):
        blk = Blk(spec)
        try:
            from pyhyve.devices.virtio.queue import Chain, Segment
            struct.pack_into("<IIQ", ram.b, 0x1000, typ, 0, sector)
            chain = Chain(0, [Segment(0x1000, 16, False)] + (
                [Segment(0x2000, 512, False)] if typ == 1 else []),
                ([Segment(0x2000, 512, True)] if typ == 0 else []) + [Segment(0x3000, 1, True)])
            blk.handle(0, chain, ram)
            assert ram.b[0x3000] == status, (spec, typ, sector)
            assert path.stat().st_size == 8192  # a write past the end never grows the image
        finally:
            blk.close()


def test_description_of_virtio_devices_is_validated():
    d = with_virtio(default_description("null"), ["/x.img,ro"], True)
    again = VmDescription.from_dict(d.to_dict())
    assert [(x.id, x.bus, x.base) for x in again.devices[-2:]] == [("disk0", "pci", 1),
                                                                   ("rng0", "pci", 2)]
    raw = d.to_dict()
    raw["devices"][-1]["base"] = 1  # two devices in one slot
    with pytest.raises(ValueError, match="slot"):
        VmDescription.from_dict(raw)


# --- clones' disks -----------------------------------------------------------------------

def test_an_overlay_reads_the_base_and_keeps_every_write_to_itself(tmp_path):
    import hashlib
    import os

    from pyhyve.devices.virtio.image import CHUNK, Overlay

    base = tmp_path / "base.img"
    base.write_bytes(bytes(range(256)) * 64)  # 16 KiB, four chunks
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    ov = Overlay(os.open(base, os.O_RDONLY), 16384, str(tmp_path))
    try:
        assert ov.read(0, 16384) == base.read_bytes()
        ov.write(CHUNK + 100, b"x" * 10)           # part of chunk 1: copied up first
        ov.write(2 * CHUNK, b"y" * CHUNK)          # all of chunk 2
        ov.discard(3 * CHUNK, CHUNK)               # chunk 3 reads zeros now
        want = bytearray(base.read_bytes())
        want[CHUNK + 100:CHUNK + 110] = b"x" * 10
        want[2 * CHUNK:3 * CHUNK] = b"y" * CHUNK
        want[3 * CHUNK:] = bytes(CHUNK)
        assert ov.read(0, 16384) == bytes(want)
        assert ov.read(CHUNK + 95, 20) == bytes(want[CHUNK + 95:CHUNK + 115])  # across chunks
        assert hashlib.sha256(base.read_bytes()).hexdigest() == before
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".pyhyve")]  # unlinked
    finally:
        ov.close()


@pytest.mark.kvm
def test_clones_write_their_own_disks_and_cannot_be_saved_or_migrated(kit, disk, tmp_path):
    import hashlib

    from pyhyve.migration.source import Migration, Options
    from pyhyve.snapshot.format import SnapshotError

    suspended_busy(kit, disk, tmp_path / "s", 2)
    with open(disk, "rb") as f:
        image = hashlib.sha256(f.read()).hexdigest()
    clones = []
    try:
        for _ in range(2):
            snap = open_snapshot(str(tmp_path / "s"))
            c = CaptureConsole()
            clones.append((restore(snap, console=c, clone=True, clone_dir=str(tmp_path),
                                   bindings={"disk0": disk}), c))
            snap.close()
        for cvm, _ in clones:
            cvm.start()
        for _, c in clones:
            wait_rounds(c, 3)  # each reads back what it wrote: no sibling's block
        with open(disk, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == image  # the image never written
        cvm = clones[0][0]
        with pytest.raises(SnapshotError, match="private copy-on-write disk"):
            save(cvm, str(tmp_path / "again"), "checkpoint")
        # refused before any connection: no destination needed
        stats = Migration(cvm, "127.0.0.1", 9, b"k" * 32, Options(live=True)).run()
        assert stats.state == "failed" and "copy-on-write" in stats.error
        assert cvm.state == "running"
        n = len(rounds(clones[0][1]))
        wait_rounds(clones[0][1], 1)
        assert len(rounds(clones[0][1])) > n
    finally:
        for cvm, _ in clones:
            cvm.close()


@pytest.mark.kvm
def test_a_disk_changed_since_the_save_is_refused_unless_accepted(kit, disk, tmp_path):
    from pyhyve.snapshot.format import SnapshotError

    vm, con = device_vm(kit, disk)
    try:
        vm.start()
        wait_rounds(con, 1)
        save(vm, str(tmp_path / "cp"), "checkpoint")  # the guest goes on writing the disk
        wait_rounds(con, 2)
    finally:
        vm.close()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(8 * MB))
    for path, match in ((disk, "has changed since"), (str(other), "bytes, the saved")):
        snap = open_snapshot(str(tmp_path / "cp"))
        try:
            with pytest.raises(SnapshotError, match=match):
                restore(snap, console=CaptureConsole(), bindings={"disk0": path})
        finally:
            snap.close()
    r = __import__("conftest").cli("pyhyve", "run", "x", "-r", str(tmp_path / "cp"),
                                   "--bind", f"disk0={disk}")
    assert r.returncode == 1 and "has changed since" in r.stderr and r.stderr.count("\n") == 1
    snap = open_snapshot(str(tmp_path / "cp"))
    vm2 = restore(snap, console=CaptureConsole(), bindings={"disk0": disk},
                  disk_changed_ok=True)
    snap.close()
    vm2.close()


@pytest.mark.kvm
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_a_checkpoint_while_busy_keeps_the_disk_as_it_was_and_restores_with_it(
        kit, disk, tmp_path, monkeypatch, direct):
    """The guest writes on for half a second before the save goes on and for a second
    before the copier starts: every chunk it writes is copied first, so the copy is the
    disk at the pause; the guest restored on it reads back the blocks of its own round (a
    newer round's would be a wrong block)."""
    import shutil
    import time

    from pyhyve.devices.virtio.diskcopy import DiskCopy
    from pyhyve.snapshot.files import current_files
    from pyhyve.snapshot.format import SnapshotError
    from pyhyve.snapshot.restore import check_disk_copies

    run = DiskCopy._run
    monkeypatch.setattr(DiskCopy, "_run", lambda self: (time.sleep(1.0), run(self)))
    spec = f"{disk},direct" if direct else disk
    vm, con = device_vm(kit, spec)
    release = vm.release

    def late() -> None:  # the guest runs on before the save's next step
        release()
        time.sleep(0.5)
    try:
        vm.start()
        wait_rounds(con, 2)
        first = len(rounds(con))
        monkeypatch.setattr(vm, "release", late)
        stats = save(vm, str(tmp_path / "cp"), "checkpoint")
        monkeypatch.setattr(vm, "release", release)
        last = len(rounds(con))
        assert stats.downtime < 5.0  # the guest went on while the copy was made
        wait_rounds(con, 2)
        assert all(d.backend.copy is None for d in vm.devices.values()
                   if hasattr(d, "backend") and hasattr(d.backend, "copy"))
    finally:
        vm.close()
    kept = current_files(str(tmp_path / "cp")).memory + ".disk0"
    snap = open_snapshot(str(tmp_path / "cp"))
    try:
        assert check_disk_copies(snap) == 1
        with pytest.raises(SnapshotError, match=f"kept its disks as they were.*{kept}"):
            restore(snap, console=CaptureConsole(), bindings={"disk0": spec})  # wrote on
    finally:
        snap.close()
    work = str(tmp_path / "work.img")
    shutil.copy(kept, work)
    vm2, con2 = restored(tmp_path / "cp", {"disk0": work + (",direct" if direct else "")
                                           + ",serial=kit-disk"})
    try:
        vm2.start()
        wait_rounds(con2, 3)
        got = rounds(con2)
        assert first <= got[0] <= last + 1 and got == list(range(got[0], got[0] + len(got)))
        vm2.pause()
        guestkit.check_blocks(work, BLOCKS)
    finally:
        vm2.close()
    with open(kept, "r+b") as f:  # the kept copy changed: verify says so
        f.write(b"x")
    snap = open_snapshot(str(tmp_path / "cp"))
    try:
        with pytest.raises(SnapshotError, match="is not the disk at the checkpoint"):
            check_disk_copies(snap)
    finally:
        snap.close()


@pytest.mark.kvm
def test_checkpoint_disk_copies_from_the_command_line(kit, disk, tmp_path, rundir):
    import shutil
    import subprocess
    import time

    from conftest import cli, spawn, wait_file, wait_socket

    log, log2 = tmp_path / "a.log", tmp_path / "b.log"
    vm = spawn("pyhyve", "run", "cpd", "-k", kit["virtio"], "-m", "64M", "--cmdline",
               f"blocks={BLOCKS}", "--disk", f"{disk},serial=kit-disk", "--rng", "--console",
               f"file:{log}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vm2 = None
    try:
        wait_socket(rundir, "cpd")
        wait_file(log, "V2 ")
        os.chdir(tmp_path)
        r = cli("pyhyvectl", "--vm", "cpd", "--checkpoint", "ck")
        assert r.returncode == 0 and "checkpoint to" in r.stdout, r.stderr
        r = cli("pyhyvectl", "--vm", "cpd", "--checkpoint", "bare", "--no-disk-copy")
        assert r.returncode == 0, r.stderr
        r = cli("pyhyvectl", "--vm", "cpd", "--suspend", "x", "--no-disk-copy")
        assert r.returncode == 2 and "goes with --checkpoint" in r.stderr
        have = set(os.listdir(tmp_path))
        assert {"ck.g1.disk0", "bare.g1"} <= have and "bare.g1.disk0" not in have
        assert "disk copy     disk0: ck.g1.disk0" in cli("pyhyve", "snapshot", "info",
                                                           "ck").stdout
        v = cli("pyhyve", "snapshot", "verify", "ck")
        assert v.returncode == 0 and "1 disk copies" in v.stdout, v.stdout + v.stderr
        wait_file(log, f"V{len(rounds_in(log.read_bytes())) + 2} ")  # it writes on
        r = cli("pyhyve", "run", "x", "-r", "ck", "--reuse-paths")
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert "has changed since" in r.stderr and "ck.g1.disk0" in r.stderr
        r = cli("pyhyve", "run", "x", "-r", "ck", "--bind", "disk0=ck.g1.disk0")
        assert r.returncode == 1 and "checkpoint's kept disk" in r.stderr  # a copy of it
        shutil.copy(tmp_path / "ck.g1.disk0", tmp_path / "work.img")
        vm2 = spawn("pyhyve", "run", "cpd2", "-r", "ck", "--bind",
                    "disk0=work.img,serial=kit-disk", "--reuse-paths", "--console",
                    f"file:{log2}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_socket(rundir, "cpd2")
        deadline = time.monotonic() + 60
        while len(got := rounds_in(log2.read_bytes())) < 3:
            assert time.monotonic() < deadline, log2.read_bytes()[-300:]
            time.sleep(0.05)
        assert got == list(range(got[0], got[0] + len(got)))
        assert b"VIRTIO ERROR" not in log2.read_bytes()
        with open(tmp_path / "ck.g1.disk0", "r+b") as f:
            f.write(b"x")  # the kept disk changed since: verify says so
        v = cli("pyhyve", "snapshot", "verify", "ck")
        assert v.returncode == 1 and "is not the disk at the checkpoint" in v.stderr
    finally:
        for p in (vm, vm2):
            if p is not None:
                p.kill()
                p.wait()


@pytest.mark.kvm
def test_a_vm_closed_during_its_checkpoint_s_disk_copy_fails_the_checkpoint(kit, disk,
                                                                             tmp_path,
                                                                             monkeypatch):
    import threading

    from pyhyve.devices.virtio.diskcopy import DiskCopy
    from pyhyve.snapshot.format import SnapshotError

    gate = threading.Event()  # the save waits to finish its copy until the VM is closed
    finish = DiskCopy.finish
    monkeypatch.setattr(DiskCopy, "finish", lambda self: (gate.wait(30), finish(self)))
    vm, con = device_vm(kit, disk)
    vm.start()
    wait_rounds(con, 1)
    failed: list[BaseException] = []

    def checkpoint() -> None:
        try:
            save(vm, str(tmp_path / "cp"), "checkpoint")
        except BaseException as e:
            failed.append(e)
    t = threading.Thread(target=checkpoint)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while vm.devices["disk0"].backend.copy is None:  # the copy has begun
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
    finally:
        vm.close()
        gate.set()
        t.join(30)
    assert len(failed) == 1 and isinstance(failed[0], SnapshotError), failed
    assert "closed during the copy" in str(failed[0])
    assert not [f for f in os.listdir(tmp_path) if f.startswith("cp")]


@pytest.mark.kvm
def test_a_checkpoint_whose_disk_copy_fails_leaves_the_vm_and_the_last_snapshot(
        kit, disk, tmp_path, monkeypatch):
    import errno

    from pyhyve.devices.virtio import diskcopy
    from pyhyve.snapshot.files import current_files
    from pyhyve.snapshot.format import SnapshotError

    vm, con = device_vm(kit, disk)
    try:
        vm.start()
        wait_rounds(con, 1)
        save(vm, str(tmp_path / "cp"), "checkpoint")
        good = current_files(str(tmp_path / "cp"))

        import pyhyve.snapshot.save as save_mod

        class Statvfs:  # a file system with 10 MiB free: refused before any pause
            f_bavail, f_frsize = 10 << 8, 4096
        with monkeypatch.context() as m:
            m.setattr(save_mod.os, "statvfs", lambda _p: Statvfs())
            with pytest.raises(SnapshotError, match="MiB free"):
                save(vm, str(tmp_path / "cp"), "checkpoint")

        def full(*_a: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(diskcopy, "pwrite_all", full)
        with pytest.raises(SnapshotError, match="No space left"):
            save(vm, str(tmp_path / "cp"), "checkpoint")
        assert vm.state == "running"
        wait_rounds(con, 2)  # its disk as good as ever
        assert current_files(str(tmp_path / "cp")) == good
        assert sorted(os.listdir(tmp_path)) == ["cp.g1", "cp.g1.disk0", "cp.g1.kern",
                                                "cp.meta", "disk.img"]
        assert all(d.backend.copy is None for d in vm.devices.values()
                   if hasattr(d, "backend") and hasattr(d.backend, "copy"))
    finally:
        vm.close()
    snap = open_snapshot(str(tmp_path / "cp"))
    snap.close()


def test_bhyve_style_slots_and_their_refusals():
    d = with_virtio(default_description("null"), ["/b.img"], False,
                    ["0,hostbridge", "31,lpc", "4,virtio-blk,/a.img,ro", "7,virtio-rnd"])
    pci = [(x.id, x.base, x.backend) for x in d.devices if x.bus == "pci"]
    assert pci == [("disk1", 1, "/b.img"), ("disk0", 4, "/a.img,ro"), ("rng0", 7, None)]
    d = with_virtio(default_description("null"), [], False,
                    ["3,virtio-net,tap0,mac=02:00:00:00:00:09", "5,virtio-net,loop",
                     "6,virtio-console,port1=/run/c.sock", "9,virtio-console,file:/tmp/out"])
    pci = [(x.id, x.base, x.backend) for x in d.devices if x.bus == "pci"]
    assert pci == [("net0", 3, "tap:tap0,mac=02:00:00:00:00:09"), ("net1", 5, "loop"),
                   ("vconsole0", 6, "unix:/run/c.sock"), ("vconsole1", 9, "file:/tmp/out")]
    for bad, match in ((["0,virtio-blk,/a.img"], "slot 0"), (["40,virtio-rnd"], "slot below"),
                       (["3,ahci-hd,/a.img"], "emulations here"),
                       (["3,virtio-rnd", "3,virtio-blk,/a"], "one PCI slot"),
                       (["2,virtio-rnd"], "one virtio-rng")):
        with pytest.raises(ValueError, match=match):
            with_virtio(default_description("null"), [], bad == ["2,virtio-rnd"], bad)


@pytest.mark.kvm
def test_bhyve_style_disk_on_the_command_line(kit, disk, tmp_path, rundir):
    from conftest import cli

    r = cli("pyhyve", "run", "bs", "-m", "64M", "-k", kit["virtio"], "--cmdline",
            "blocks=8 rounds=2", "-s", "0,hostbridge", "-s", f"5,virtio-blk,{disk}", "-s",
            "6,virtio-rnd", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "virtio ready: blk sectors=32768 rng" in r.stdout and "V2 8 64" in r.stdout
    guestkit.check_blocks(disk, 8)


# --- virtio-console ----------------------------------------------------------------------

def vcon_lines(path) -> list[int]:
    with open(path, "rb") as f:
        return [int(m.group(1)) for m in re.finditer(rb"vcon (\d+)\n", f.read())]


@pytest.mark.kvm
def test_console_stream_survives_a_suspend_while_busy_without_gap_or_repeat(kit, disk,
                                                                           tmp_path):
    port = tmp_path / "port.log"
    vm, con = device_vm(kit, disk, port=f"file:{port}")
    try:
        vm.start()
        wait_rounds(con, 3)
        assert b"console" in con.buf
        save(vm, str(tmp_path / "s"), "suspend")
    finally:
        vm.close()
    vm2, con2 = restored(tmp_path / "s", {"disk0": disk, "vconsole0": f"file:{port}"})
    try:
        vm2.start()
        wait_rounds(con2, 3)
        vm2.pause()
        lines = vcon_lines(port)
        assert lines == list(range(1, len(lines) + 1)) and len(lines) >= 5
    finally:
        vm2.close()


@pytest.mark.kvm
def test_console_input_reaches_the_guest(kit, disk, tmp_path):
    import socket
    import time

    sock = tmp_path / "port.sock"
    vm, con = device_vm(kit, disk, port=f"unix:{sock}")
    try:
        vm.start()
        wait_rounds(con, 1)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.settimeout(10)
            s.sendall(b"ping-42")
            got, end = b"", time.monotonic() + 20
            while b"echo:ping-42" not in got and time.monotonic() < end:
                got += s.recv(65536)
            assert b"echo:ping-42" in got
    finally:
        vm.close()


def test_console_input_waits_in_the_device_and_goes_with_its_state():
    from pyhyve.devices.console import Console
    from pyhyve.devices.virtio.console import MAX_PENDING, VConsole

    a = VConsole(Console())
    kicks = []
    a.kick = kicks.append
    a._input(b"x" * (MAX_PENDING + 10))  # more than it keeps: the rest is dropped, counted
    assert kicks == [0] and len(a.pending) == MAX_PENDING and a.dropped == 10
    b = VConsole(Console())
    b.load(a.state())
    assert b.pending == a.pending and b.dropped == 10
    with pytest.raises(ValueError, match="malformed"):
        b.load(b"{}")


# --- virtio-net ----------------------------------------------------------------------------

_NET = re.compile(rb"net (\d+) (\d+)\r?\n")


def net_counts(con) -> list[int]:
    return [int(m.group(2)) for m in _NET.finditer(bytes(con.buf))]


def guest_mac(vm) -> bytes:
    return vm.devices["net0"].backend.mac


@pytest.mark.kvm
def test_frames_loop_back_in_order_across_a_suspend_while_busy(kit, disk, tmp_path):
    vm, con = device_vm(kit, disk, net="loop,mac=02:00:00:00:00:42")
    try:
        vm.start()
        wait_rounds(con, 2)
        assert b" net\r\n" in con.buf or b" net\n" in con.buf
        save(vm, str(tmp_path / "s"), "suspend")
    finally:
        vm.close()
    vm2, con2 = restored(tmp_path / "s", {"disk0": disk, "net0": "loop"})
    try:
        assert guest_mac(vm2) == bytes.fromhex("020000000042")  # the guest's MAC came along
        runs_on(vm2, con, con2)  # the guest checks every frame's number itself
        both = [int(m.group(2)) for m in _NET.finditer(bytes(con.buf) + bytes(con2.buf))]
        assert both == [16 * (i + 1) for i in range(len(both))], both
    finally:
        vm2.close()


@pytest.mark.kvm
def test_a_clone_gets_a_fresh_mac_unless_one_is_bound(kit, disk, tmp_path):
    vm, con = device_vm(kit, disk, net="loop")
    try:
        vm.start()
        wait_rounds(con, 1)
        mac = guest_mac(vm)
        save(vm, str(tmp_path / "s"), "suspend")
    finally:
        vm.close()
    macs = []
    for bound in ("loop", "loop", "loop,mac=02:11:22:33:44:55"):
        snap = open_snapshot(str(tmp_path / "s"))
        c = restore(snap, console=CaptureConsole(), clone=True, clone_dir=str(tmp_path),
                    bindings={"disk0": disk, "net0": bound})
        snap.close()
        macs.append(guest_mac(c))
        c.close()
    assert mac not in macs[:2] and macs[0] != macs[1] and macs[0][0] & 0x02
    assert macs[2] == bytes.fromhex("021122334455")


def _tap_name(tag: str) -> str:
    import os
    return f"pyh{tag}{os.getpid() % 100000}"


@pytest.mark.kvm
def test_the_destination_announces_the_mac_on_its_tap_right_after_migration(kit, disk,
                                                                           monkeypatch):
    """The destination's tap is made (persistent, up) and watched before the migration
    starts, so the capture cannot miss frames sent the moment the guest arrives. The
    first RARP must come after the migration began and within 100 ms of the switch-over:
    the moment the destination's guest was started."""
    import socket
    import subprocess
    import threading
    import time

    from migrate_helpers import Destination, migrate

    src, dst = _tap_name("s"), _tap_name("d")
    subprocess.run(["ip", "tuntap", "add", "dev", dst, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "link", "set", dst, "up"], check=True)
        frames: list[tuple[float, bytes]] = []
        done = threading.Event()
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
        cap.bind((dst, 0))
        cap.settimeout(0.1)

        def capture() -> None:
            while not done.is_set():
                try:
                    frame = cap.recv(2048)
                except TimeoutError:
                    continue
                frames.append((time.monotonic(), frame))  # when it came, not when we waited
        t = threading.Thread(target=capture, daemon=True)
        t.start()
        vm, con = device_vm(kit, disk, net=f"tap:{src},mac=02:00:00:00:00:77", frames=0)
        vm.start()
        wait_rounds(con, 1)
        started: list[float] = []
        real_start = VirtualMachine.start

        def timed_start(self, *args, **kw):
            real_start(self, *args, **kw)
            started.append(time.monotonic())  # the destination's guest runs from here
        monkeypatch.setattr(VirtualMachine, "start", timed_start)
        dest = Destination(bindings={"disk0": disk, "net0": f"tap:{dst}"})
        t_begin = time.monotonic()
        stats = migrate(vm, dest, live=True)
        assert stats.state == "completed", stats.error
        assert len(started) == 1
        try:
            wait_rounds(dest.console, 2)
            done.set()
            t.join(5)
            rarps = [at for at, f in frames if f[12:14] == b"\x80\x35"
                     and f[6:12] == bytes.fromhex("020000000077")]
            assert len(rarps) >= 1, frames
            assert t_begin < rarps[0] < started[0] + 0.1  # peers learn the new place at once
        finally:
            done.set()
            cap.close()
            dest.vm.close()
            vm.close()
    finally:
        subprocess.run(["ip", "tuntap", "del", "dev", dst, "mode", "tap"], check=False)


def _kit_on_tap(kit, name: str, tap: str, mac: str,
                cmdline: str) -> tuple[VirtualMachine, CaptureConsole]:
    """The kit's device guest with one NIC, on `tap`, and no disk."""
    con = CaptureConsole()
    desc_ = with_virtio(default_description("null"), [], False, nets=[f"tap:{tap},mac={mac}"])
    return VirtualMachine.create(VmConfig(name, 64 * MB, 1, kernel=kit["virtio"],
                                          cmdline=cmdline, description=desc_), console=con), con


@pytest.mark.kvm
def test_frames_the_guest_sends_reach_the_tap_whole(kit):
    """The kit guest's net benchmark floods its transmit queue (32 frames of 100 bytes in
    flight); each frame goes from guest RAM to the tap in one writev, header stripped."""
    import socket
    import subprocess
    import threading
    import time

    tap = _tap_name("b")
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        cap.bind((tap, 0))
        cap.settimeout(0.1)
        frames: list[bytes] = []
        done = threading.Event()

        def capture() -> None:
            while not done.is_set():
                try:
                    frames.append(cap.recv(4096))
                except TimeoutError:
                    continue
        t = threading.Thread(target=capture, daemon=True)
        t.start()
        vm, con = _kit_on_tap(kit, "nb", tap, "02:00:00:00:00:42",
                              "bench=net qd=32 size=100 ms=200")
        try:
            vm.start()
            con.wait_for(" rx=", timeout=60)
            assert b"VIRTIO ERROR" not in con.buf, bytes(con.buf[-300:])
            time.sleep(0.3)
        finally:
            done.set()
            t.join(5)
            cap.close()
            vm.close()
        sent = int(bytes(con.buf).split(b"BENCH end ops=")[1].split()[0])
        assert sent > 100 and len(frames) > 100, (sent, len(frames))
        for f in frames:
            assert len(f) == 100 and f[:6] == b"\xff" * 6, f[:16]
            assert f[6:12] == bytes.fromhex("020000000042") and f[12:14] == b"\x88\xb5"
    finally:
        subprocess.run(["ip", "tuntap", "del", "dev", tap, "mode", "tap"], check=False)


@pytest.mark.kvm
def test_frames_sent_into_the_tap_reach_the_guest_whole(kit):
    """The host sends 200 frames of 100 bytes into the device's tap; the kit guest
    (bench=netrx, 72 receive buffers) counts every one, at its length."""
    import socket
    import subprocess

    tap = _tap_name("r")
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        out.bind((tap, 0))
        vm, con = _kit_on_tap(kit, "nr", tap, "02:00:00:00:00:43", "bench=netrx ms=3000")
        try:
            vm.start()
            con.wait_for("BENCH go", timeout=60)
            for i in range(200):
                out.send(b"\xff" * 6 + bytes.fromhex("020000000099") + b"\x88\xb5"
                         + bytes([i]) * 86)
            con.wait_for("BENCH end", timeout=60)
            con.wait_for("\n", timeout=10, start=bytes(con.buf).index(b"BENCH end"))
        finally:
            out.close()
            vm.close()
        end = bytes(con.buf).split(b"BENCH end ")[1].split(b"\n")[0]
        assert end.split() == [b"ops=200", b"bytes=20000"], end
    finally:
        subprocess.run(["ip", "tuntap", "del", "dev", tap, "mode", "tap"], check=False)


def test_net_specs_state_and_the_announce_frame():
    from pyhyve.devices.virtio.net import MAX_PENDING, Net, NetError, parse_net, rarp

    assert parse_net("tap:tap0,mac=02:aa:bb:cc:dd:ee") == ("tap", "tap0",
                                                           bytes.fromhex("02aabbccddee"), False)
    for bad in ("tap:", "tap:" + "x" * 16, "eth:0", "loop,mac=zz", "loop:x"):
        with pytest.raises(NetError):
            parse_net(bad)
    f = rarp(bytes.fromhex("02aabbccddee"))
    assert len(f) == 60 and f[:6] == b"\xff" * 6 and f[12:14] == b"\x80\x35"
    a = Net("loop")
    for i in range(MAX_PENDING + 3):
        a._arrived(bytes([i % 256]) * 60)
    assert len(a.pending) == MAX_PENDING and a.dropped == 3
    b = Net("loop")
    b.load(a.state())
    assert b.mac == a.mac and list(b.pending) == list(a.pending)
    c = Net("loop,newmac")
    c.load(a.state())
    assert c.mac != a.mac


# --- review findings: each one a test ------------------------------------------------------

@pytest.mark.kvm
def test_a_moved_bar_is_decoded_there_after_restore(kit, disk, tmp_path):
    vm, _ = device_vm(kit, disk)
    rng = vm.devices["rng0"]
    slot = next(d.base for d in vm.description.devices if d.id == "rng0")

    def cfg_write(reg: int, value: int) -> None:
        vm.pio.write(0xCF8, 4, 0x8000_0000 | slot << 11 | reg)
        vm.pio.write(0xCFC, 4, value)
    try:
        cfg_write(0x10, 0xFFFF_FFFF)  # sizing, as a driver does
        vm.pio.write(0xCF8, 4, 0x8000_0000 | slot << 11 | 0x10)
        assert vm.pio.read(0xCFC, 4) == 0xFFFF_8000
        cfg_write(0x10, 0xD000_0000)
        cfg_write(0x04, 0x0006)  # memory decoding and bus mastering on
        assert vm.mmio.find(0xD000_0000)[1] is rng and rng.decoded == 0xD000_0000
        assert rng.doorbells is not None and rng.doorbells.base == 0xD000_0000
        save(vm, str(tmp_path / "s"), "checkpoint")
    finally:
        vm.close()
    snap = open_snapshot(str(tmp_path / "s"))
    vm2 = restore(snap, console=CaptureConsole(), bindings={"disk0": disk})
    snap.close()
    try:
        vm2.start()
        rng2 = vm2.devices["rng0"]
        assert vm2.mmio.find(0xD000_0000)[1] is rng2
        assert rng2.doorbells is not None and rng2.doorbells.base == 0xD000_0000
        hit = vm2.mmio.find(rng2.bar if rng2.bar != 0xD000_0000 else 0xE002_0000)
        assert hit is None or hit[1] is not rng2
    finally:
        vm2.close()


def test_msix_table_accesses_outside_it_or_unaligned_are_ignored():
    dev, _, _host = rng_device()
    n = len(dev.msix.table)
    dev.write(MSIX_TABLE + n - 4, 8, 0xFFFF_FFFF_FFFF_FFFF)  # runs past the end
    dev.write(MSIX_TABLE + 2, 4, 0x1234)                     # unaligned
    assert len(dev.msix.table) == n and dev.msix.table[2:6] == b"\0\0\0\0"


def test_a_request_made_while_the_device_looked_empty_is_not_lost():
    """EVENT_IDX: the driver adds a request after the device saw an empty ring but before
    its avail_event landed; the device must look again instead of sleeping."""
    from test_virtqueue import queue as make_queue

    ram = FakeRam()
    q = make_queue(ram, event_idx=True)
    desc(ram, 0, 0x10000, 4, 2)
    for _ in range(3):  # three taken already: avail_event must say 3, not the 0 RAM holds
        offer(ram, q, 0)
        assert q.pop(ram) is not None
    real_mark = ram.mark_written

    def racing_store(gpa, n):
        if gpa == USED + 4 + 8 * q.size:  # the device publishes avail_event...
            offer(ram, q, 0)              # ...just after the driver added a request
        real_mark(gpa, n)
    ram.mark_written = racing_store
    assert q.pop(ram) is not None
    assert ram.b[USED + 4 + 8 * q.size:USED + 6 + 8 * q.size] == b"\3\0"  # it was published


def test_an_msi_the_host_cannot_deliver_does_not_kill_the_device():
    dev, ram, _host = rng_device()

    def refuse(addr, data):
        raise OSError("KVM_SIGNAL_MSI: Operation not permitted")
    dev.msix.signal = refuse
    drive(dev)
    dev.write(COMMON + 0x14, 1, 1 | 2 | FEATURES_OK | DRIVER_OK)
    dev.function.write(dev.msix.cap + 2, 2, 0x8000)
    dev.queues[0].ready = False
    dev.write(COMMON + 0x1A, 2, 0)
    dev.queues[0].ready = True
    dev.write(MSIX_TABLE, 8, 0xFEEF_F004)
    dev.write(MSIX_TABLE + 12, 4, 0)
    for _ in range(2):
        desc(ram, 0, 0x10000, 32, 2)
        offer(ram, dev.queues[0], 0)
        dev.write(NOTIFY, 2, 0)
        serve(dev)
    assert struct.unpack_from("<H", ram.b, USED + 2)[0] == 2  # both served
    assert not dev.read(COMMON + 0x14, 1) & NEEDS_RESET


def test_common_config_writes_of_the_wrong_width_are_ignored():
    dev, _, _ = rng_device()
    dev.write(COMMON + 0x16, 4, 0x0001_0000)  # a 4-byte store over queue_select
    dev.write(COMMON + 0x14, 2, 0x0001)       # a 2-byte store over the status byte
    assert dev.read(COMMON + 0x16, 2) == 0 and dev.read(COMMON + 0x14, 1) == 0


def test_overlay_discard_punches_instead_of_writing(tmp_path):
    import os

    from pyhyve.devices.virtio.image import CHUNK, Overlay

    base = tmp_path / "base.img"
    base.write_bytes(b"\xAA" * (64 * CHUNK))
    ov = Overlay(os.open(base, os.O_RDONLY), 64 * CHUNK, str(tmp_path))
    try:
        ov.discard(100, 60 * CHUNK)
        assert os.fstat(ov.fd).st_blocks * 512 <= 4 * CHUNK  # only the two edge chunks
        assert ov.read(0, 100) == b"\xAA" * 100 and ov.read(100, 60 * CHUNK) == bytes(60 * CHUNK)
        assert ov.read(100 + 60 * CHUNK, 10) == b"\xAA" * 10
    finally:
        ov.close()


@pytest.mark.kvm
def test_console_output_with_no_client_survives_a_suspend(kit, disk, tmp_path):
    import socket
    import time

    sock = tmp_path / "p.sock"
    # "vcon 1..3" wait in the port, nobody has read them
    suspended_busy(kit, disk, tmp_path / "s", 3, port=f"unix:{sock}")
    snap = open_snapshot(str(tmp_path / "s"))
    vm2 = restore(snap, console=CaptureConsole(),
                  bindings={"disk0": disk, "vconsole0": f"unix:{sock}"})
    snap.close()
    try:
        vm2.start()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.settimeout(10)
            got, end = b"", time.monotonic() + 20
            while len(re.findall(rb"vcon (\d+)\n", got)) < 6 and time.monotonic() < end:
                got += s.recv(65536)
        nums = [int(x) for x in re.findall(rb"vcon (\d+)\n", got)]
        assert nums[:6] == [1, 2, 3, 4, 5, 6], nums[:10]
    finally:
        vm2.close()


# --- virtio-vsock ----------------------------------------------------------------------------

class EchoHost:
    """The host's side of the guest's connections: UDS_5000 answers "ping N" with "pong N"."""

    def __init__(self, uds: str) -> None:
        import socket
        import threading

        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(f"{uds}_5000")
        self.srv.listen(16)
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c) -> None:
        import contextlib

        with c, contextlib.suppress(OSError):  # the VMM drops connections at a reset
            while data := c.recv(4096):
                c.sendall(data.replace(b"ping", b"pong"))

    def close(self) -> None:
        self.srv.close()


def host_connect(uds: str, port: int = 6000) -> bytes:
    """A host program's connection into the guest: CONNECT, OK, then an echo."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(uds)
        s.sendall(f"CONNECT {port}\n".encode())
        hello = b""
        while b"\n" not in hello:
            hello += s.recv(64)
        assert re.match(rb"OK \d+\n", hello), hello
        s.sendall(b"hello-vsock")
        got = b""
        while b"echo:hello-vsock" not in got:
            chunk = s.recv(64)
            assert chunk, got
            got += chunk
        return got


_VS = re.compile(rb"vsock (\d+) ok")


@pytest.mark.kvm
def test_vsock_both_ways_and_a_reset_after_restore(kit, disk, tmp_path):
    uds = str(tmp_path / "v.sock")
    host = EchoHost(uds)
    con = CaptureConsole()
    desc_ = with_virtio(default_description("null"), [disk], False,
                        vsocks=[f"cid=7,uds={uds}"])
    vm = VirtualMachine.create(VmConfig("vs", 64 * MB, 1, kernel=kit["virtio"],
                                        cmdline="blocks=2 frames=0", description=desc_),
                               console=con)
    try:
        vm.start()
        wait_rounds(con, 3)
        assert len(_VS.findall(bytes(con.buf))) >= 3 and host.accepted >= 3
        assert b"echo:hello-vsock" in host_connect(uds)
        save(vm, str(tmp_path / "s"), "suspend")  # connections open, traffic flowing
    finally:
        vm.close()
    vm2, con2 = restored(tmp_path / "s", {"disk0": disk, "vsock0": f"cid=7,uds={uds}"})
    try:
        runs_on(vm2, con, con2)
        assert b"vsock reset" in con2.buf  # the guest was told its connections are gone
        assert b"echo:hello-vsock" in host_connect(uds)  # and new ones work right after
    finally:
        vm2.close()
        host.close()


def test_vsock_refuses_what_it_must(tmp_path):
    from pyhyve.devices.virtio.vsock import (
        BUF_ALLOC,
        HDR,
        OP_REQUEST,
        OP_RST,
        OP_RW,
        Vsock,
        VsockError,
        parse_vsock,
    )

    for bad in ("cid=2,uds=/x", "cid=3", "uds=/x,cid=3", "cid=99999999999,uds=/x"):
        with pytest.raises(VsockError):
            parse_vsock(bad)
    v = Vsock(f"cid=9,uds={tmp_path}/v.sock")
    try:
        def pkt(op, sport, dport, data=b"", dst=2):
            return HDR.pack(9, dst, sport, dport, len(data), 1, op, 0, 1 << 16, 0) + data
        v._from_guest(pkt(OP_RW, 1000, 5000, b"x"))          # no such connection
        v._from_guest(pkt(OP_REQUEST, 1001, 5000))           # nobody listens at uds_5000
        v._from_guest(pkt(OP_REQUEST, 1002, 5000, dst=42))   # not the host's CID
        ops = [HDR.unpack_from(p)[6] for p in v.queued]
        assert ops == [OP_RST, OP_RST, OP_RST]
        v.queued.clear()
        import socket
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(f"{tmp_path}/v.sock_5000")
        srv.listen(1)
        v._from_guest(pkt(OP_REQUEST, 1003, 5000))           # accepted
        peer, _ = srv.accept()                              # ... and never read
        for _ in range(64):  # more than the credit it was given, once the socket is full
            v._from_guest(pkt(OP_RW, 1003, 5000, b"y" * (BUF_ALLOC // 4)))
            if not v.conns:
                break
        assert HDR.unpack_from(v.queued[-1])[6] == OP_RST and not v.conns
        peer.close()
        srv.close()
    finally:
        v.close()


@pytest.mark.kvm
def test_vsock_resets_and_reconnects_after_a_live_migration(kit, disk, tmp_path):
    from migrate_helpers import Destination, migrate

    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    hosts = [EchoHost(a), EchoHost(b)]
    con = CaptureConsole()
    desc_ = with_virtio(default_description("null"), [disk], False, vsocks=[f"cid=7,uds={a}"])
    vm = VirtualMachine.create(VmConfig("vsm", 64 * MB, 1, kernel=kit["virtio"],
                                        cmdline="blocks=2 frames=0", description=desc_),
                               console=con)
    try:
        vm.start()
        wait_rounds(con, 2)
        dest = Destination(bindings={"disk0": disk, "vsock0": f"cid=7,uds={b}"})
        stats = migrate(vm, dest, live=True)
        assert stats.state == "completed", stats.error
        try:
            runs_on(dest.vm, con, dest.console)
            assert b"vsock reset" in dest.console.buf and hosts[1].accepted >= 2
            assert b"echo:hello-vsock" in host_connect(b)
        finally:
            dest.vm.close()
    finally:
        vm.close()
        for h in hosts:
            h.close()


def test_vsock_splits_data_to_fit_the_guests_buffers(tmp_path):
    from pyhyve.devices.virtio.queue import Chain, Segment
    from pyhyve.devices.virtio.vsock import HDR, OP_RW, RX, Conn, Vsock

    v = Vsock(f"cid=9,uds={tmp_path}/v.sock")
    try:
        import socket
        a, _b = socket.socketpair()
        c = Conn(a, 1 << 30, 6000, connected=True)
        v.queued.append(v._packet(c, OP_RW, bytes(range(256)) * 40))  # 10240 bytes
        ram, got = FakeRam(), b""
        for _ in range(3):  # 4 KiB buffers, as Linux offers
            n = v.handle(RX, Chain(0, [], [Segment(0x1000, 4096, True)]), ram)
            hdr = HDR.unpack_from(bytes(ram.b[0x1000:0x1000 + HDR.size]))
            assert hdr[6] == OP_RW and hdr[4] == n - HDR.size <= 4096 - HDR.size
            got += bytes(ram.b[0x1000 + HDR.size:0x1000 + n])
        assert got == bytes(range(256)) * 40 and not v.queued
        a.close()
        _b.close()
    finally:
        v.close()


@pytest.mark.kvm
def test_the_device_guest_finds_everything_through_ecam_too(kit, disk):
    vm, con = device_vm(kit, disk, net="loop", extra="ecam")
    try:
        vm.start()
        wait_rounds(con, 2)
        assert b"virtio ready (ecam): blk sectors=32768 rng net" in con.buf
    finally:
        vm.close()


def test_ecam_and_port_cf8_show_the_same_configuration_spaces():
    from pyhyve.devices.pci import PciEcam, PciFunction, PciHostBridge

    host = PciHostBridge()
    host.add(3, PciFunction(0x1AF4, 0x1042, 0x018000))
    ecam = PciEcam(host)
    def cf8(dev, reg):
        host.write(0, 4, 0x8000_0000 | dev << 11 | reg)
        return host.read(4, 4)
    for dev in (0, 3):
        for reg in (0x00, 0x08, 0x3C):
            assert ecam.read(dev << 15 | reg, 4) == cf8(dev, reg)
    assert ecam.read(5 << 15, 4) == 0xFFFF_FFFF  # absent
    assert ecam.read(3 << 15 | 0x100, 4) == 0    # extended space: none
    ecam.write(3 << 15 | 0x3C, 1, 0x42)           # interrupt line, through ECAM
    assert cf8(3, 0x3C) & 0xFF == 0x42


@pytest.mark.kvm
def test_event_index_and_indirect_descriptors_end_to_end_across_a_suspend(kit, disk,
                                                                         tmp_path):
    """The guest negotiates EVENT_IDX (and notifies only as avail_event asks) and sends
    its disk requests through indirect tables: no request may stall or go astray."""
    con = suspended_busy(kit, disk, tmp_path / "s", 3, net="loop", extra="evidx indirect")
    vm2, con2 = restored(tmp_path / "s", {"disk0": disk, "net0": "loop"})
    try:
        for name in ("disk0", "net0", "rng0"):  # what the guest really negotiated
            assert vm2.devices[name].driver_features & (3 << 28) == 3 << 28, name
            assert all(q.event_idx for q in vm2.devices[name].queues if q.ready)
        runs_on(vm2, con, con2, disk)
    finally:
        vm2.close()


class FakeGuest:
    """Drives a Vsock as its guest would: packets in through TX, out of the queue."""

    def __init__(self, v) -> None:
        from pyhyve.devices.virtio.vsock import HDR

        self.v, self.HDR = v, HDR

    def send(self, op, gport, hport, data=b"", flags=0, buf_alloc=1 << 16, fwd=0):
        self.v._from_guest(self.HDR.pack(9, 2, gport, hport, len(data), 1, op, flags,
                                         buf_alloc, fwd) + data)

    def take(self, timeout=10.0):
        import time
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.v._lock:
                if self.v.queued:
                    pkt = self.v.queued.popleft()
                    f = self.HDR.unpack_from(pkt)
                    return f[6], f[2], f[3], pkt[self.HDR.size:]
            time.sleep(0.005)
        raise AssertionError("nothing for the guest")


def test_vsock_host_side_order_credit_and_closing(tmp_path):
    import socket
    import time

    from pyhyve.devices.virtio.vsock import (
        OP_REQUEST,
        OP_RESPONSE,
        OP_RST,
        OP_RW,
        OP_SHUTDOWN,
        Conn,
        Vsock,
    )

    v = Vsock(f"cid=9,uds={tmp_path}/v.sock")
    v.start()
    g = FakeGuest(v)
    try:
        # a host program: CONNECT with bytes right behind it; the guest accepts and writes
        # at once: the program reads OK before the guest's bytes, the guest gets its early
        # bytes
        h = socket.socket(socket.AF_UNIX)
        h.connect(f"{tmp_path}/v.sock")
        h.sendall(b"CONNECT 7\nearly-bytes")
        op, hport, gport, _ = g.take()
        assert (op, gport) == (OP_REQUEST, 7)
        g.send(OP_RESPONSE, 7, hport)
        g.send(OP_RW, 7, hport, b"BANNER\n")
        h.settimeout(5)
        got = b""
        while b"BANNER" not in got:
            got += h.recv(100)
        assert got == f"OK {hport}\n".encode() + b"BANNER\n"
        assert g.take()[0::3] == (OP_RW, b"early-bytes")
        # a guest that writes then closes: the program gets every byte before EOF
        big = bytes(range(256)) * 1000
        g.send(OP_RW, 7, hport, big)
        g.send(OP_SHUTDOWN, 7, hport, flags=3)
        time.sleep(0.2)
        rest = b""
        while chunk := h.recv(65536):
            rest += chunk
        assert rest == big
        ops = []
        while v.queued:
            ops.append(g.take()[0])
        assert OP_RST in ops
        h.close()
        # a service that is not accepting: refused at once, nothing blocks
        slow = socket.socket(socket.AF_UNIX)
        slow.bind(f"{tmp_path}/v.sock_80")
        slow.listen(0)
        fillers = []
        for _ in range(4):
            f = socket.socket(socket.AF_UNIX)
            f.setblocking(False)
            with __import__("contextlib").suppress(BlockingIOError):
                f.connect(f"{tmp_path}/v.sock_80")
            fillers.append(f)
        t0 = time.monotonic()
        for port in range(1000, 1004):
            g.send(OP_REQUEST, port, 80)
        assert time.monotonic() - t0 < 1.0
        for f in fillers:
            f.close()
        slow.close()
        # credit counted modulo 2^32, and no credit is not an end of stream
        a, b = socket.socketpair()
        c = Conn(a, 5, 6, connected=True, peer_buf=4096, peer_fwd=0xFFFF_FF00,
                 sent=0x10)  # 0x110 in flight across the wrap
        assert c.room() == 4096 - 0x110
        c.peer_buf = 0
        with v._lock:
            v.conns[c.key] = c
        b.sendall(b"x")
        v._host_data(c)
        assert v.conns.get(c.key) is c  # still open
        a.close()
        b.close()
    finally:
        v.close()


def test_a_unix_console_catches_a_slow_client_up_and_keeps_the_newest_output(tmp_path):
    import socket
    import time

    from pyhyve.devices.console import UnixConsole

    con = UnixConsole(str(tmp_path / "c.sock"))
    try:
        con.write(bytes(70000))
        assert con.unsent() == bytes(65536)  # one big write with no client: its last 64 KiB
        con.requeue(b"")
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(tmp_path / "c.sock"))
            time.sleep(0.2)
            got = b""
            for i in range(40):  # more than the socket holds while the client is not reading
                con.write(b"%05d" % i * 1000)
            con.write(b"PROMPT> ")  # and then the guest waits for input
            c.settimeout(5)
            while not got.endswith(b"PROMPT> "):
                got += c.recv(1 << 20)
        assert got.endswith(b"PROMPT> ") and con.unsent() == b""
    finally:
        con.close()


def test_a_restores_own_backend_options_are_never_recorded():
    """`force` (--disk-changed-ok), `clone=DIR` and `newmac` serve one restore; a snapshot
    taken later must not carry them (with --reuse-paths they would skip the next disk
    check, or choose a directory for scratch files)."""
    from dataclasses import replace

    d = with_virtio(default_description("null"), ["/img,ro,serial=x"], False,
                    nets=["tap:t0,mac=02:00:00:00:00:01"])
    opts = {"virtio-blk": ",clone=/tmp/x,force", "virtio-net": ",newmac"}
    changed = VmDescription(tuple(replace(x, backend=x.backend + opts[x.kind])
                                  if x.kind in opts else x for x in d.devices))
    backends = {x["id"]: x["backend"] for x in changed.to_dict()["devices"]}
    assert backends["disk0"] == "/img,ro,serial=x"
    assert backends["net0"] == "tap:t0,mac=02:00:00:00:00:01"


def blk_request(blk: Blk, ram: FakeRam, typ: int, body: bytes = b"", out: int = 0,
                sector: int = 0) -> int:
    """One virtio-blk request through handle(): header at 0x1000, `body` readable at
    0x2000, `out` writable bytes at 0x4000, status at 0x3000; returns the status."""
    from pyhyve.devices.virtio.queue import Chain, Segment

    struct.pack_into("<IIQ", ram.b, 0x1000, typ, 0, sector)
    ram.b[0x2000:0x2000 + len(body)] = body
    ram.b[0x3000] = 0xEE
    chain = Chain(0, [Segment(0x1000, 16, False)] + ([Segment(0x2000, len(body), False)]
                                                       if body else []),
                  ([Segment(0x4000, out, True)] if out else []) + [Segment(0x3000, 1, True)])
    blk.handle(0, chain, ram)
    return ram.b[0x3000]


def test_blk_discard_and_write_zeroes_clear_exactly_their_ranges(tmp_path):
    """Discard (a hole punched) and write-zeroes clear the sectors named and nothing else,
    for one range or several; the image keeps its size."""
    path = tmp_path / "d.img"
    path.write_bytes(b"\x5a" * 65536)
    blk = Blk(str(path))
    ram = FakeRam()
    try:
        ranges = struct.pack("<QII", 8, 8, 0) + struct.pack("<QII", 100, 1, 0)
        assert blk_request(blk, ram, 11, ranges) == 0  # discard: sectors 8-15 and 100
        assert blk_request(blk, ram, 13, struct.pack("<QII", 40, 2, 1)) == 0  # zeroes, unmap
        blk.flush()
        data = path.read_bytes()
        zero = set(range(8, 16)) | {100, 40, 41}
        for s in range(128):
            want = b"\0" * 512 if s in zero else b"\x5a" * 512
            assert data[s * 512:(s + 1) * 512] == want, s
        assert len(data) == 65536
    finally:
        blk.close()


@pytest.mark.parametrize("case", ["past-the-end", "too-long", "unmap-on-discard", "ragged",
                                  "empty", "read-only"])
def test_blk_discard_refusals_leave_the_image_alone(tmp_path, case):
    path = tmp_path / "d.img"
    path.write_bytes(b"\x5a" * 65536)
    blk = Blk(f"{path},ro" if case == "read-only" else str(path))
    ram = FakeRam()
    body = {"past-the-end": struct.pack("<QII", 120, 9, 0),
            "too-long": struct.pack("<QII", 0, (1 << 21) + 1, 0),
            "unmap-on-discard": struct.pack("<QII", 0, 1, 1),
            "ragged": struct.pack("<QII", 0, 1, 0) + b"\0" * 8,
            "empty": b"",
            "read-only": struct.pack("<QII", 0, 1, 0)}[case]
    want = 2 if case == "unmap-on-discard" else 1  # UNSUPP, else IOERR
    try:
        assert blk_request(blk, ram, 11, body) == want
    finally:
        blk.close()
    assert path.read_bytes() == b"\x5a" * 65536


def test_blk_get_id_is_the_serial_padded_and_flush_syncs(tmp_path, monkeypatch):
    path = tmp_path / "d.img"
    path.write_bytes(bytes(4096))
    blk = Blk(f"{path},serial=disk-42")
    ram = FakeRam()
    try:
        assert blk_request(blk, ram, 8, out=20) == 0
        assert bytes(ram.b[0x4000:0x4014]) == b"disk-42".ljust(20, b"\0")
        synced: list[int] = []
        monkeypatch.setattr("os.fdatasync", lambda fd: synced.append(fd))
        assert blk_request(blk, ram, 4) == 0 and synced == [blk.image.fd]
    finally:
        blk.close()


@pytest.mark.kvm
def test_every_device_s_state_round_trips_caught_busy(kit, disk, tmp_path):
    """restore(save(x)) saves identically, for every device of the device guest at once
    (blk, rng, console on a socket, net on its loop, vsock with connections made): the
    state is taken while all of them are busy, encoded and decoded as a snapshot or a
    migration carries it, loaded into the same device of a second VM built from the same
    description, and saved again."""
    from pyhyve.devices.virtio.pci import VirtioPci

    uds = str(tmp_path / "v.sock")
    host = EchoHost(uds)

    def build(name: str) -> tuple[VirtualMachine, CaptureConsole]:
        con = CaptureConsole()
        d = with_virtio(default_description("null"), [f"{disk},serial=kit-disk"], True,
                        vconsoles=[f"unix:{tmp_path / name}.sock"], nets=["loop"],
                        vsocks=[f"cid=7,uds={uds if name == 'rt-a' else uds + '-b'}"])
        return VirtualMachine.create(VmConfig(name, 64 * MB, 1, kernel=kit["virtio"],
                                              cmdline=f"blocks={BLOCKS} frames=16",
                                              description=d), console=con), con
    vm, con = build("rt-a")
    other = None
    try:
        vm.start()
        wait_rounds(con, 3)
        assert _VS.search(bytes(con.buf)), "no vsock traffic before the capture"
        vm.pause()
        st = vm.capture()
        kinds = {type(d.backend).__name__ for d in vm.devices.values()
                 if isinstance(d, VirtioPci)}
        assert kinds == {"Blk", "Rng", "VConsole", "Net", "Vsock"}, kinds
        other, _ = build("rt-b")
        checked = 0
        for name, saved in st.devices.items():
            dev = other.devices[name]
            dev.load_state(decode(type(saved), encode(saved)))  # as VirtualMachine.apply
            with dev.lock:  # as VirtualMachine.capture
                assert dev.save() == saved, name
            checked += isinstance(dev, VirtioPci)
        assert checked == 5
    finally:
        vm.close()
        if other is not None:
            other.close()
        host.close()


@pytest.mark.kvm
def test_a_migration_onto_another_disk_is_refused_and_the_source_runs_on(kit, disk, tmp_path):
    """The destination bound disk0 to an image that is not the source's (same size, other
    blocks): the disk's identity in the device state does not match, the destination
    refuses before its guest runs, and the source guest carries on with its own disk."""
    from migrate_helpers import Destination, migrate

    other = tmp_path / "other.img"
    other.write_bytes(b"\x33" * (16 * MB))
    vm, con = device_vm(kit, disk)
    vm.start()
    wait_rounds(con, 2)
    dest = Destination(bindings={"disk0": str(other)})
    try:
        stats = migrate(vm, dest, live=True)
        assert stats.state != "completed"
        dest.join()
        assert dest.vm is None and "changed since" in str(dest.error), dest.error
        assert vm.state == "running"
        wait_rounds(con, 2)  # the source guest goes on, on its own disk
        vm.pause()
        guestkit.check_blocks(disk, BLOCKS)
        assert other.read_bytes() == b"\x33" * (16 * MB)  # never written
    finally:
        vm.close()


def test_bhyve_s_ser_option_names_the_disk_s_serial(tmp_path):
    """`-s 4,virtio-blk,PATH,ser=ID` is how bhyve users give a disk its serial: it is the
    serial get-id returns, as `serial=ID` is."""
    path = tmp_path / "d.img"
    path.write_bytes(bytes(4096))
    d = with_virtio(default_description("null"), [], False,
                    [f"4,virtio-blk,{path},ser=BHYVE-7"])
    blk = Blk(next(x.backend for x in d.devices if x.id == "disk0"))
    ram = FakeRam()
    try:
        assert blk_request(blk, ram, 8, out=20) == 0
        assert bytes(ram.b[0x4000:0x4014]) == b"BHYVE-7".ljust(20, b"\0")
    finally:
        blk.close()
    with pytest.raises(ValueError, match="bad disk option"):
        Blk(f"{path},ser={'x' * 21}")  # at most 20 characters, as serial=


def test_blk_copies_what_a_write_or_discard_changes_before_it_changes_it(tmp_path, monkeypatch):
    """A checkpoint's disk copy (diskcopy.py) with its copier held back: each request
    that changes the disk has its chunk copied first."""
    import threading

    from pyhyve.devices.virtio.diskcopy import CHUNK, DiskCopy

    path = tmp_path / "d.img"
    path.write_bytes(b"\x5a" * (3 * CHUNK))
    gate = threading.Event()
    run = DiskCopy._run
    monkeypatch.setattr(DiskCopy, "_run", lambda self: (gate.wait(), run(self)))
    blk = Blk(str(path))
    ram = FakeRam()
    fd = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        blk.begin_copy(fd)
        assert blk_request(blk, ram, 1, b"\x11" * 512, sector=1) == 0  # a write, chunk 0
        discard = struct.pack("<QII", 2 * CHUNK // 512, 8, 0)
        assert blk_request(blk, ram, 11, discard) == 0  # a discard, chunk 2
        assert blk.copy is not None and blk.copy.left == 1  # chunk 1 waits for the copier
        gate.set()
        blk.copy.finish()
        assert os.pread(fd, 3 * CHUNK + 1, 0) == b"\x5a" * (3 * CHUNK)
        assert path.read_bytes()[512:1024] == b"\x11" * 512
    finally:
        gate.set()
        blk.close()
        os.close(fd)


@pytest.mark.kvm
@pytest.mark.parametrize("kind", ["checkpoint", "suspend"])
def test_a_save_with_every_device_busy_restores_with_none_lost(kit, disk, tmp_path, kind):
    """The device guest with blk, rng, net on its loop, a console port to a file and
    vsock, saved busy. A checkpoint's guest writes on, and is restored with the disk the
    checkpoint kept (a copy); a suspended one with its own disk. With new backends either
    way, its rounds go on from the save's round, the guest finds every block, frame and
    pong as it expects, the console stream resumes where the save was with no gap or
    repeat, vsock resets and reconnects, and the image is whole."""
    import shutil

    from pyhyve.snapshot.files import current_files

    uds = str(tmp_path / "v.sock")
    host = EchoHost(uds)

    def build(port: str) -> tuple[VirtualMachine, CaptureConsole]:
        con = CaptureConsole()
        d = with_virtio(default_description("null"), [f"{disk},serial=kit-disk"], True,
                        vconsoles=[f"file:{port}"], nets=["loop"], vsocks=[f"cid=7,uds={uds}"])
        return VirtualMachine.create(VmConfig("all", 64 * MB, 1, kernel=kit["virtio"],
                                              cmdline=f"blocks={BLOCKS} frames=16",
                                              description=d), console=con), con
    port_a, port_b = tmp_path / "a.out", tmp_path / "b.out"
    vm, con = build(str(port_a))
    try:
        vm.start()
        wait_rounds(con, 3)
        assert _VS.search(bytes(con.buf)), "no vsock traffic before the save"
        first = len(rounds(con))
        save(vm, str(tmp_path / "cp"), kind)
        last = len(rounds(con))
        if kind == "checkpoint":
            wait_rounds(con, 2)
    finally:
        vm.close()
    work = disk
    if kind == "checkpoint":
        work = str(tmp_path / "work.img")
        shutil.copy(current_files(str(tmp_path / "cp")).memory + ".disk0", work)
    vm2, con2 = restored(tmp_path / "cp", {"disk0": f"{work},serial=kit-disk",
                                           "vconsole0": f"file:{port_b}", "net0": "loop",
                                           "vsock0": f"cid=7,uds={uds}"})
    try:
        vm2.start()
        wait_rounds(con2, 3)
        vm2.pause()
        out = bytes(con2.buf)
        got = rounds(con2)
        assert first <= got[0] <= last + 1 and got == list(range(got[0], got[0] + len(got)))
        if kind == "suspend":
            continued(con, con2)
        nets = re.findall(rb"net (\d+) (\d+)\r?\n", out)
        assert nets and all(int(n) == int(r) * 16 for r, n in nets), nets[-3:]
        assert b"vsock reset" in out and _VS.search(out) and b"virtio ready" not in out
        after = vcon_lines(port_b)
        assert after and after == list(range(after[0], after[0] + len(after))), after
        # (the round in progress at the pause may have written its line already)
        assert first + 1 <= after[0] <= last + 2 and after[0] - 1 in vcon_lines(port_a)
        if kind == "suspend":  # the whole stream, across both files: no gap, no repeat
            lines = vcon_lines(port_a) + after
            assert lines == list(range(1, len(lines) + 1)), lines
        guestkit.check_blocks(work, BLOCKS)
    finally:
        vm2.close()
        host.close()
