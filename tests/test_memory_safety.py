"""Guest pages are never lost or fed wrong: pages in swap are saved and migrated, and a
lazily restored guest survives its snapshot file being truncated or rewritten."""

from __future__ import annotations

import ctypes as C
import os
import subprocess
import threading
import time

import pytest

from migrate_helpers import Destination, migrate
from pyhyve import guestkit
from pyhyve.snapshot.files import current_files, remove
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save

from conftest import CaptureConsole, cli, spawn, suspended, wait_file, wait_socket

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

MB = 1 << 20
MADV_PAGEOUT = 21
libc = C.CDLL(None, use_errno=True)


@pytest.fixture
def swap():
    """A swap file for the length of one test (the host may have none)."""
    path = "/var/tmp/pyhyve-test-swap"
    subprocess.run(["swapoff", path], capture_output=True)
    subprocess.run(["fallocate", "-l", "512M", path], check=True)
    os.chmod(path, 0o600)
    subprocess.run(["mkswap", path], check=True, capture_output=True)
    subprocess.run(["swapon", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["swapoff", path], check=True)
        os.unlink(path)


def swap_used_pages() -> int:
    with open("/proc/swaps") as f:
        return sum(int(line.split()[3]) for line in f.readlines()[1:]) // 4


def page_out(mem) -> int:
    """Push the VM's guest pages to swap, as memory pressure would; returns how many went
    (counted in the swap itself, whatever pagemap shows)."""
    before = swap_used_pages()
    for r in mem.regions:
        assert libc.madvise(C.c_void_p(r.host_addr), C.c_size_t(r.size), MADV_PAGEOUT) == 0
    return swap_used_pages() - before


def ab_restored(make_vm, tmp_path, ws_mb: int = 16):
    base = suspended(make_vm, str(tmp_path / "a"), cmdline=f"ws={ws_mb}M", memory=64 * MB)
    snap = open_snapshot(base)
    con2 = CaptureConsole()
    vm2 = restore(snap, console=con2)
    snap.close()
    vm2.start()
    con2.wait_count(b"B", 2)
    return vm2, con2


def same_memory(a: str, b: str) -> None:
    ma, mb = (open_snapshot(x, verify_memory=False) for x in (a, b))
    ma.close()
    mb.close()
    assert mb.meta["memory"]["data_pages"] == ma.meta["memory"]["data_pages"]
    assert mb.meta["memory"]["checksum"] == ma.meta["memory"]["checksum"]


@pytest.mark.parametrize("lazy", [True, False], ids=["lazily-restored", "fresh"])
def test_pages_in_swap_are_saved(swap, make_vm, tmp_path, lazy):
    if lazy:
        vm, _ = ab_restored(make_vm, tmp_path)
    else:
        vm, con = make_vm("ab", "ws=16M", memory=64 * MB)
        con.wait_count(b"B", 2)
    vm.pause()
    # pages that were holes in the snapshot file, written after restore: they exist only
    # in this process (anonymous), and are what a scan blind to swap used to lose
    for page in range(5120, 10240, 3):
        vm.memory.write(page * 4096 + 100, b"written after restore")
    try:
        ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
        save(vm, ref, "checkpoint", keep_paused=True)
        assert page_out(vm.memory) >= 16 * MB // 4096, "pages did not go to swap"
        save(vm, out, "checkpoint", keep_paused=True)
        assert open_snapshot(out, verify_memory=False).meta["memory"]["data_pages"] >= 1700
        same_memory(ref, out)
        assert guestkit.ab_check_file(out).ws_size == 16 * MB
    finally:
        vm.close()


def test_pages_in_swap_are_migrated(swap, make_vm, tmp_path):
    vm, _ = ab_restored(make_vm, tmp_path)
    vm.pause()
    for page in range(5120, 10240, 3):  # holes of the file, written after restore
        vm.memory.write(page * 4096 + 100, b"written after restore")
    ref = str(tmp_path / "ref")
    save(vm, ref, "checkpoint", keep_paused=True)
    before = guestkit.ab_check_file(ref)
    assert page_out(vm.memory) >= 16 * MB // 4096
    vm.resume()
    dest = Destination()
    stats = migrate(vm, dest, live=False)
    assert stats.state == "completed", stats.error
    try:
        dest.console.wait_count(b"B", 2, timeout=30)
        dest.vm.pause()
        after = guestkit.ab_check(dest.vm.memory.regions[0].array)
        assert after.passes >= before.passes + 2
        for page in range(5120, 10240, 3):
            assert dest.vm.memory.read(page * 4096 + 100, 21) == b"written after restore"
    finally:
        dest.vm.close()


def ab_continues(vm, con, more: int = 3) -> None:
    vm.pause()  # the guest's memory is only consistent to read while it is paused
    before = guestkit.ab_check(vm.memory.regions[0].array).passes
    vm.resume()
    n = con.buf.count(b"B")
    con.wait_count(b"B", n + more, timeout=30)
    vm.pause()
    after = guestkit.ab_check(vm.memory.regions[0].array)
    vm.resume()
    assert after.passes >= before + more - 1


@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_lazy_guest_survives_its_snapshot_file_changing(make_vm, tmp_path, how):
    vm, con = ab_restored(make_vm, tmp_path)
    try:
        dep = vm.snapshot_dependency()
        assert dep["depends_on_snapshot"] and dep["snapshot_file"].endswith("a.g1")
        path = current_files(str(tmp_path / "a")).memory
        done = threading.Event()

        def writer() -> None:  # held back by the kernel until the VMM let go of the file
            if how == "truncate":
                os.truncate(path, 0)
            else:
                with open(path, "r+b") as f:
                    f.write(b"\xff" * (8 * MB))
            done.set()
        t0 = time.monotonic()
        threading.Thread(target=writer, daemon=True).start()
        assert done.wait(30), "the writer was never let through"
        assert time.monotonic() - t0 < 30
        assert not vm.snapshot_dependency()["depends_on_snapshot"]
        ab_continues(vm, con)
        assert not vm.stopped
    finally:
        vm.close()


def test_a_lazy_guest_keeps_its_file_when_a_new_save_replaces_it(make_vm, tmp_path):
    """A save to the same path removes the old generation's files; the one a lazily
    restored guest maps is only unlinked (never emptied first, which its lease would
    have to be broken for): the guest still reads it, undisturbed."""
    vm, con = ab_restored(make_vm, tmp_path)
    try:
        old = current_files(str(tmp_path / "a")).memory
        save(vm, str(tmp_path / "a"), "checkpoint")  # generation 2: a.g1 goes
        assert not os.path.exists(old)
        dep = vm.snapshot_dependency()
        assert dep["depends_on_snapshot"] and dep["snapshot_file"] == old
        ab_continues(vm, con)
        assert not vm.stopped and vm.snapshot_dependency()["depends_on_snapshot"]
    finally:
        vm.close()


def test_without_a_lease_the_guest_is_made_independent_at_restore(make_vm, tmp_path):
    base = suspended(make_vm, str(tmp_path / "a"), cmdline="ws=8M", memory=64 * MB)
    path = current_files(base).memory
    with open(path, "r+b") as writer:  # a writer holds it open: no lease is possible
        snap = open_snapshot(base)
        con2 = CaptureConsole()
        vm2 = restore(snap, console=con2)
        snap.close()
        try:
            dep = vm2.snapshot_dependency()
            assert not dep["depends_on_snapshot"] and "no lease" in dep["snapshot_note"], dep
            writer.truncate(0)
            vm2.start()
            con2.wait_count(b"B", 2)
            ab_continues(vm2, con2)
        finally:
            vm2.close()


def test_status_says_whether_the_vm_depends_on_its_snapshot(kit, tmp_path, rundir):
    log = tmp_path / "c.log"
    p = spawn("pyhyve", "run", "s1", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=8M",
              "--console", f"file:{log}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(rundir, "s1")
    wait_file(log, "BB")
    assert "depends_on_snapshot: False" in cli("pyhyvectl", "--vm", "s1", "--status").stdout
    assert cli("pyhyvectl", "--vm", "s1", "--suspend", str(tmp_path / "snap")).returncode == 0
    p.wait(20)
    p = spawn("pyhyve", "run", "s2", "-r", str(tmp_path / "snap"), "--lazy", "--console", "null",
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "s2")
        st = cli("pyhyvectl", "--vm", "s2", "--status").stdout
        assert "depends_on_snapshot: True" in st and "snap.g1" in st
        # a save replacing the snapshot removes snap.g1 as a stale generation: the guest
        # keeps reading it, its lease never broken (files.py: only unlinked)
        assert remove([str(tmp_path / "snap.g1")]) == [str(tmp_path / "snap.g1")]
        time.sleep(1.0)  # a broken lease would have the VMM copy everything in by now
        st = cli("pyhyvectl", "--vm", "s2", "--status").stdout
        assert "depends_on_snapshot: True" in st and "state: running" in st, st
    finally:
        cli("pyhyvectl", "--vm", "s2", "--destroy")
        p.wait(20)


def test_guest_stops_with_one_line_when_it_cannot_be_moved_off_in_time(make_vm, tmp_path,
                                                                       monkeypatch):
    """If moving the guest off its file keeps failing until the kernel would let the writer
    through, the VM stops with one clear line instead of running on changed memory."""
    from pyhyve.machine.memory import GuestMemory
    from pyhyve.snapshot import lease

    vm, _ = ab_restored(make_vm, tmp_path)
    monkeypatch.setattr(lease, "lease_break_time", lambda: 1.0)

    def no_memory(self, paused):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(GuestMemory, "detach_from_file", no_memory)
    path = current_files(str(tmp_path / "a")).memory
    threading.Thread(target=lambda: open(path, "r+b").close(), daemon=True).start()
    assert vm.wait(20), "the VM kept running on a file it could not leave"
    assert "could not move guest memory off" in vm.stop_reason
    assert "Cannot allocate memory" in vm.stop_reason and vm.exit_code == 1
    dep = vm.snapshot_dependency()
    assert dep["depends_on_snapshot"]
    vm.close()  # lets go of the lease: the writer gets through


@pytest.mark.parametrize("how", ["loading-set", "paused", "no-prefetch"])
def test_prefetch_pulls_the_loading_set_in_and_changes_none(make_vm, tmp_path, how):
    """A lazily restored guest gets its snapshot's loading set (the blocks it was writing
    before the save: loadset.py) copied into memory of its own before it starts, byte for
    byte what the file holds; cold data stays in the file. A snapshot of a paused VM has
    no set: a background thread faults every data page in for writing (so a first touch
    is not a fault and a file read). Without prefetch, nothing is pulled in."""
    import numpy as np

    from pyhyve.pipeline.pages import _written_pages
    from pyhyve.snapshot.loadset import intersect
    vm, con = make_vm("ab", "ws=16M", memory=64 * MB)
    con.wait_for(b"BB")
    vm.memory.write(32 * MB, os.urandom(8 * MB))  # cold data, written before the window
    if how == "paused":
        vm.pause()
    save(vm, str(tmp_path / "a"), "suspend", loading_window=0.1)
    vm.stop("suspended")
    snap = open_snapshot(str(tmp_path / "a"))
    vm2 = restore(snap, console=CaptureConsole(), prefetch=how != "no-prefetch")  # not started
    try:
        runs, mem = snap.runs, vm2.memory
        pf = mem.guard.prefetch  # type: ignore[union-attr]
        if how == "paused":
            assert snap.loading == []
            hot = runs
            deadline = time.monotonic() + 30
            while pf.done_bytes < sum(n for _, n in hot) * 4096:
                assert time.monotonic() < deadline, pf.done_bytes
                time.sleep(0.01)
        else:  # the working set (4 MiB + 16 MiB), not the cold 8 MiB: copied in at once
            assert snap.loading == [(1024, 4096)], snap.loading
            hot = intersect(snap.loading, runs)
            assert pf is None
        r = mem.regions[0]
        private = _written_pages(r.host_addr, r.size)
        wanted = np.zeros(r.size // 4096, dtype=bool)
        for page, count in hot:
            wanted[page:page + count] = True
        assert private[wanted].all()
        cold = slice(32 * MB // 4096, 40 * MB // 4096)
        assert private[cold].all() if how == "paused" else not private[cold].any()
        with open(snap.memory_path, "rb") as f:
            for page, count in runs:
                f.seek(page * 4096)
                assert f.read(count * 4096) == bytes(r.array[page * 4096:(page + count) * 4096])
    finally:
        snap.close()
        vm2.close()
