"""Device state saved by an earlier pyhyve restores in this one: every
tests/fixtures/devices-vN/ (tests/fixtures/make_devices.py wrote it: the kit's device guest
with every virtio device, suspended while all were busy) is restored with its backends
bound, and the guest runs on: rounds continue with no gap or repeat, every block on the
image is whole, and vsock's reset reaches the guest."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest

from pyhyve import guestkit
from pyhyve.snapshot.restore import open_snapshot, restore
from test_virtio import BLOCKS, EchoHost, continued, wait_rounds

from conftest import REPO, CaptureConsole

pytestmark = pytest.mark.kvm
FIXTURES = os.path.join(REPO, "tests", "fixtures")
VERSIONS = sorted(d for d in os.listdir(FIXTURES) if d.startswith("devices-v"))


def test_there_is_a_device_fixture():
    assert VERSIONS


@pytest.mark.parametrize("fixture", VERSIONS)
def test_device_state_of_an_earlier_pyhyve_restores_and_the_guest_runs_on(
        tmp_path, monkeypatch, fixture):
    from pyhyve.pipeline import build

    # saved on a host whose TSC ran at its own rate; refusing a rate that cannot be
    # scaled is tests/test_snapshot_refusals.py's subject, not this test's
    monkeypatch.setattr(build, "TSC_TOLERANCE_PPM", 1 << 40)
    src = os.path.join(FIXTURES, fixture)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    with open(tmp_path / "console.txt", "rb") as f:
        before = SimpleNamespace(buf=f.read())
    disk, uds = str(tmp_path / "disk.img"), str(tmp_path / "v.sock")
    host = EchoHost(uds)
    snap = open_snapshot(str(tmp_path / "dev"))
    con = CaptureConsole()
    try:
        assert snap.meta["format_version"] == int(fixture.rsplit("v", 1)[1])
        vm = restore(snap, console=con, bindings={
            "disk0": f"{disk},serial=kit-disk", "vconsole0": f"file:{tmp_path}/port.out",
            "net0": "loop", "vsock0": f"cid=7,uds={uds}"})
    finally:
        snap.close()
    try:
        vm.start()
        wait_rounds(con, 3)
        continued(before, con)
        assert b"vsock reset" in con.buf
        vm.pause()
        guestkit.check_blocks(disk, BLOCKS)
    finally:
        vm.close()
        host.close()
