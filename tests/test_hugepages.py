"""Guest RAM in the host's reserved 2 MiB pages (`--hugepages`, hugetlbfs): a guest booted,
saved, restored and live-migrated on them keeps its memory (the A-B invariant, passes that
add up), says so in its status, and a host without enough of them gives ordinary memory
instead (docs/architecture.md's backing table)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from migrate_helpers import Destination, migrate
from pyhyve import guestkit
from pyhyve.machine.memory import GuestMemory
from pyhyve.snapshot.format import SnapshotError
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save
from pyhyve.vm import VirtualMachine, VmConfig

from conftest import CaptureConsole, cli

pytestmark = pytest.mark.kvm

MB = 1 << 20
MEMORY = 64 * MB
NR = "/proc/sys/vm/nr_hugepages"
HUGETLB = "hugetlb 2 MiB pages"


def _set_pool(pages: int) -> int:
    with open(NR, "w") as f:
        f.write(str(pages))
    with open(NR) as f:
        return int(f.read())


@pytest.fixture
def pool() -> Iterator[int]:
    """Room for two guests (source and destination) in the host's huge page pool, given
    back afterwards. Only root can size the pool: CI runs as root."""
    with open(NR) as f:
        before = int(f.read())
    want = before + 2 * MEMORY // (2 * MB)
    try:
        with open("/proc/sys/vm/compact_memory", "w") as f:  # a fragmented host has them
            f.write("1")                                      # after compaction
        got = _set_pool(want)
    except PermissionError:
        pytest.fail(f"cannot size the huge page pool ({NR}): run the tests as root")
    try:
        assert got == want, f"the host gave {got} of {want} huge pages"
        yield got
    finally:
        _set_pool(before)


def ab_vm(kit, hugepages: bool) -> tuple[VirtualMachine, CaptureConsole]:
    con = CaptureConsole()
    vm = VirtualMachine.create(VmConfig("hp", MEMORY, 1, kernel=kit["ab"], cmdline="ws=16M",
                                        hugepages=hugepages), console=con)
    vm.start()
    return vm, con


def passes_on(vm, con, more: int = 3) -> guestkit.AbResult:
    n = con.buf.count(b"B")
    con.wait_count(b"B", n + more, timeout=60)
    vm.pause()
    try:
        return guestkit.ab_check(vm.memory.regions[0].array)
    finally:
        vm.resume()


def test_a_guest_on_huge_pages_is_saved_and_restored_onto_them(kit, pool, tmp_path):
    vm, con = ab_vm(kit, hugepages=True)
    try:
        st = vm.status()
        assert st["memory_backing"] == HUGETLB
        passes_on(vm, con)
        assert vm.status()["huge_pages"] >= 16 * MB  # the working set is in 2 MiB pages
        save(vm, str(tmp_path / "s"), "suspend")
    finally:
        vm.close()
    snap = open_snapshot(str(tmp_path / "s"))
    try:
        con2 = CaptureConsole()
        vm2 = restore(snap, console=con2, lazy=False, hugepages=True)
    finally:
        snap.close()
    try:
        assert vm2.memory.hugetlb and vm2.status()["memory_backing"] == HUGETLB
        vm2.start()
        res = passes_on(vm2, con2)
        assert res.ws_size == 16 * MB
        assert res.passes >= con.buf.count(b"B") - 1 + con2.buf.count(b"B") - 3
        assert b"A-B start" not in con2.buf  # it continued, it did not boot again
    finally:
        vm2.close()


def test_a_live_migration_lands_on_huge_pages(kit, pool):
    vm, con = ab_vm(kit, hugepages=True)
    dest = Destination(hugepages=True)
    try:
        con.wait_count(b"B", 3, timeout=60)
        stats = migrate(vm, dest, live=True)
        assert stats.state == "completed", stats.error
        assert dest.error is None and dest.vm is not None
        assert dest.vm.status()["memory_backing"] == HUGETLB
        res = passes_on(dest.vm, dest.console)
        assert res.ws_size == 16 * MB
        assert res.passes >= con.buf.count(b"B") - 1 + dest.console.buf.count(b"B") - 3
    finally:
        vm.close()
        if dest.vm is not None:
            dest.vm.close()


def test_without_enough_huge_pages_ordinary_memory_is_used():
    over = "/proc/sys/vm/nr_overcommit_hugepages"
    with open(NR) as f:
        total = int(f.read())
    with open(over) as f:
        overcommit = f.read().strip()
    with open(over, "w") as f:  # no surplus pages: the pool is all there is
        f.write("0")
    try:
        mem = GuestMemory((total + 8) * 2 * MB, hugetlb=True)  # more than the pool holds
        try:
            assert not mem.hugetlb
            assert mem.backing()["memory_backing"] == "anonymous memory"
        finally:
            mem.close()
    finally:
        with open(over, "w") as f:
            f.write(overcommit)


def test_huge_pages_cannot_back_a_lazy_restore(make_vm, tmp_path):
    vm, con = make_vm("ab", "ws=4M", memory=32 * MB)
    con.wait_for("BB")
    save(vm, str(tmp_path / "s"), "suspend")
    vm.close()
    snap = open_snapshot(str(tmp_path / "s"))
    try:
        with pytest.raises(SnapshotError, match="eager"):
            restore(snap, lazy=True, hugepages=True)
    finally:
        snap.close()
    r = cli("pyhyve", "run", "x", "-r", str(tmp_path / "s"), "--lazy", "--hugepages")
    assert r.returncode == 2 and "--hugepages cannot be combined with --lazy" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
