"""virtio-blk's I/O paths: direct disks (O_DIRECT) through native AIO, completing out of
order; unaligned buffers through a bounce buffer; a full AIO context falling back to
synchronous I/O; a polling driver that must never see a completion before its status; and
INTx lines told to KVM only when their level changes."""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import struct
import time

import pytest

from pyhyve.description import default_description, with_virtio
from pyhyve.devices import base
from pyhyve.devices.virtio import blk as blkmod
from pyhyve.devices.virtio.backend import ASYNC
from pyhyve.devices.virtio.blk import Blk
from pyhyve.devices.virtio.image import RawImage
from pyhyve.devices.virtio.queue import Chain, Segment
from pyhyve.vm import VirtualMachine, VmConfig
from test_virtqueue import RAM, FakeRam

from conftest import CaptureConsole

MB = 1 << 20
DATA = 0x40000  # guest buffers from here in FakeRam (4 KiB each)


class AlignedRam(FakeRam):
    """FakeRam on page-aligned memory, as guest RAM is (O_DIRECT wants aligned buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = mmap.mmap(-1, RAM)  # type: ignore[assignment]


@pytest.fixture
def image(tmp_path):
    """4 MiB of random data, on a disk-backed file system (O_DIRECT)."""
    path = tmp_path / "d.img"
    path.write_bytes(os.urandom(4 * MB))
    return path


def request(ram: FakeRam, i: int, typ: int, sector: int, length: int = 4096) -> Chain:
    """Request i: header at 0x1000 + 32 i, data at DATA + i * length, status after the
    header."""
    hdr = 0x1000 + 32 * i
    struct.pack_into("<IIQ", ram.b, hdr, typ, 0, sector)
    ram.b[hdr + 16] = 0xFF
    data = Segment(DATA + i * length, length, typ == 0)
    return Chain(i, [Segment(hdr, 16, False)] + ([data] if typ == 1 else []),
                 ([data] if typ == 0 else []) + [Segment(hdr + 16, 1, True)])


def finish(disk: Blk, ram: FakeRam, n: int) -> dict[int, int]:
    """Start the batch and reap until n requests are back: head -> bytes written."""
    disk.commit()
    done: dict[int, int] = {}
    deadline = time.monotonic() + 10
    while len(done) < n:
        assert time.monotonic() < deadline, done
        assert disk.completion_fd is not None
        select.select([disk.completion_fd], [], [], 1)
        got = disk.reap(ram, 3)  # a few at a time, as the transport does
        assert len(got) <= 3
        for _, chain, written in got:
            done[chain.head] = written
        if disk._later:  # more finished than taken: the fd says so, no waiting on it
            assert select.select([disk.completion_fd], [], [], 0)[0]
    return done


def test_a_direct_disk_bypasses_the_page_cache_and_a_buffered_one_does_not(image):
    direct, buffered = Blk(f"{image},direct"), Blk(f"{image}")
    try:
        for disk, want in ((direct, True), (buffered, False)):
            assert isinstance(disk.image, RawImage)
            flags = fcntl.fcntl(disk.image.fd, fcntl.F_GETFL)
            assert bool(flags & os.O_DIRECT) == want
            assert (disk.aio is not None) == want and (disk.completion_fd is not None) == want
    finally:
        direct.close()
        buffered.close()


def test_32_direct_reads_and_writes_run_on_aio_and_land_where_they_should(image):
    content = image.read_bytes()
    ram = AlignedRam()
    disk = Blk(f"{image},direct")
    try:
        sectors = [(i * 37 % 1000) * 8 for i in range(32)]  # 4 KiB apart, scattered
        for i, s in enumerate(sectors):
            assert disk.handle(0, request(ram, i, 0, s), ram) == ASYNC
        disk.commit()
        assert disk.aio is not None and disk.aio.in_flight == 32  # all in the kernel at once
        assert finish(disk, ram, 32) == {i: 4097 for i in range(32)}
        for i, s in enumerate(sectors):
            assert ram.b[0x1000 + 32 * i + 16] == 0, i  # status OK
            assert ram.b[DATA + i * 4096:DATA + (i + 1) * 4096] == \
                content[s * 512:s * 512 + 4096], i
        # what was read into guest RAM was reported to dirty tracking
        marked = {gpa for gpa, _ in ram.marked}
        assert all(DATA + i * 4096 in marked for i in range(32))
        fresh = os.urandom(32 * 4096)
        ram.b[DATA:DATA + len(fresh)] = fresh
        for i in range(32):
            assert disk.handle(0, request(ram, i, 1, 8 * (800 + i)), ram) == ASYNC
        assert finish(disk, ram, 32) == {i: 1 for i in range(32)}
        assert all(ram.b[0x1000 + 32 * i + 16] == 0 for i in range(32))
    finally:
        disk.close()
    assert image.read_bytes()[800 * 4096:832 * 4096] == fresh


def test_a_full_aio_context_falls_back_to_synchronous_io(image, monkeypatch):
    monkeypatch.setattr(blkmod, "AIO_DEPTH", 4)
    content = image.read_bytes()
    ram = AlignedRam()
    disk = Blk(f"{image},direct")
    try:
        results = [disk.handle(0, request(ram, i, 0, 8 * i), ram) for i in range(10)]
        assert results.count(ASYNC) == 4 and results.count(4097) == 6
        assert finish(disk, ram, 4) == {i: 4097 for i in range(4)}
        assert ram.b[DATA:DATA + 10 * 4096] == content[:10 * 4096]
        assert all(ram.b[0x1000 + 32 * i + 16] == 0 for i in range(10))
    finally:
        disk.close()


def test_an_io_error_on_the_bounce_path_is_an_io_error(image):
    """A failed direct transfer through the bounce buffer stays an OSError (the device's
    I/O error status), not a BufferError from closing memory a traceback still views."""
    img = RawImage(-1, 4 * MB, direct=True)  # every transfer fails: EBADF
    buf = bytearray(4097)
    with pytest.raises(OSError):
        img.readinto(0, [memoryview(buf)[1:]])
    with pytest.raises(OSError):
        img.writefrom(0, [memoryview(buf)[1:]])


def test_a_direct_disk_of_an_odd_size_still_has_an_identity(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(os.urandom(10000))  # not whole sectors: the last read is cut short
    disk = Blk(f"{path},direct")
    try:
        assert disk.identity()["size"] == 10000
        assert disk.image.read(9000, 4096) == path.read_bytes()[9000:]
    finally:
        disk.close()


def test_unaligned_buffers_of_a_direct_disk_go_through_a_bounce_buffer(image):
    content = image.read_bytes()
    fd = os.open(image, os.O_RDWR | os.O_DIRECT)
    img = RawImage(fd, 4 * MB, direct=True)
    try:
        buf = bytearray(3 * 4096 + 3)
        views = [memoryview(buf)[1:1025], memoryview(buf)[1025:1025 + 7168]]  # odd places
        img.readinto(8192, views)
        assert bytes(buf[1:1 + 8192]) == content[8192:16384]
        data = os.urandom(8192)
        src = bytearray(b"x" + data)
        img.writefrom(4096 * 100, [memoryview(src)[1:]])
        assert img.read(4096 * 100, 8192) == data
        assert img.read(4 * MB - 512, 4096) == content[-512:]  # clamped at the end
    finally:
        img.close()


@pytest.mark.kvm
@pytest.mark.parametrize("spec,qd", [("", 1), ("", 32), (",direct", 1), (",direct", 32)])
def test_a_polling_driver_never_sees_a_completion_before_its_status(kit, image, spec, qd):
    """The kit guest's benchmark mode polls the used ring with qd requests in flight and
    checks every status byte the moment the used index shows its request: a device that
    published the index before the status, or let the index go through another value on
    its way (struct.pack_into zero-fills first), fails it within a few hundred requests."""
    con = CaptureConsole()
    desc = with_virtio(default_description("null"), [f"{image}{spec}"], False)
    ms = 1000  # the torn index shows only while the vCPU and the device run at once
    vm = VirtualMachine.create(VmConfig("bench", 256 * MB, 1, kernel=kit["virtio"],
                                        cmdline=f"bench=blk bs=4096 qd={qd} ms={ms} rand "
                                                f"span={2 * MB}",
                                        description=desc), console=con)
    try:
        if spec:  # the direct disk really runs on AIO
            assert vm.devices["disk0"].backend.aio is not None
        vm.start()
        deadline = time.monotonic() + 60  # until "BENCH end ops=N bytes=M", or an error
        while b" bytes=" not in con.buf and b"VIRTIO ERROR" not in con.buf:
            assert time.monotonic() < deadline, bytes(con.buf[-300:])
            time.sleep(0.02)
        assert b"VIRTIO ERROR" not in con.buf, bytes(con.buf[-300:])
        ops = int(bytes(con.buf).split(b"BENCH end ops=")[1].split()[0])
        assert ops > 50, ops
    finally:
        vm.close()


def test_an_intx_line_reaches_kvm_only_when_its_level_changes():
    told: list[tuple[int, int]] = []
    lines = base.IrqLines(lambda irq, level: told.append((irq, level)))
    a, b = lines.source(), lines.source()
    a(10, 1)
    a(10, 1)          # a virtio device raises its line at every completion
    b(10, 1)
    assert told == [(10, 1)]
    a(10, 0)          # b still holds it
    assert told == [(10, 1)]
    b(10, 0)
    a(11, 1)
    assert told == [(10, 1), (10, 0), (11, 1)]
    a(10, 1)
    assert told[-1] == (10, 1)
