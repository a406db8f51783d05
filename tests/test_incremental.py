"""Incremental snapshots: layers hold exactly the pages written since their parent, a
chain restores to the same guest as a full checkpoint of that moment, merge flattens it,
and a missing or changed parent is refused."""

from __future__ import annotations

import errno
import filecmp
import os
import shutil

import pytest

from pyhyve import guestkit
from pyhyve.machine.dirty import runs_of
from pyhyve.pipeline.pages import decode_runs, guest_runs
from pyhyve.snapshot.files import current_files
from pyhyve.snapshot.format import SnapshotError
from pyhyve.snapshot.merge import merge
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save

from conftest import CaptureConsole, cli, spawn, wait_socket

pytestmark = pytest.mark.kvm

MB = 1 << 20
PAGE = 4096


def layer_runs(base: str) -> list[tuple[int, int]]:
    snap = open_snapshot(base, verify_memory=False, parents=False)
    snap.close()
    return decode_runs(snap.blobs["memory-runs"], snap.meta["memory"]["size"] // PAGE)


def same_memory(a: str, b: str) -> bool:
    return filecmp.cmp(current_files(a).memory, current_files(b).memory, shallow=False)


@pytest.fixture
def chain(make_vm, tmp_path):
    """Ten incremental checkpoints L0..L9 of a running A-B guest, each with a full one
    F0..F9 taken at the same pause, and the pages a second dirty-log reader saw written
    between them."""
    vm, con = make_vm("ab", "ws=16M rate=40", memory=64 * MB)
    con.wait_count(b"B", 2, timeout=30)
    witness, seen = None, []
    for k in range(10):
        con.wait_count(b"B", con.buf.count(b"B") + 1, timeout=30)
        vm.pause()
        save(vm, str(tmp_path / f"L{k}"), "checkpoint", incremental=True)
        save(vm, str(tmp_path / f"F{k}"), "checkpoint")
        if witness is None:
            witness = vm.dirty.consumer("witness")
        else:
            seen.append(runs_of(witness.fetch()))
        vm.resume()
    witness.stop()
    return tmp_path, seen


def test_a_chain_of_ten_layers_each_holding_only_what_was_written(chain):
    d, seen = chain
    full0 = layer_runs(str(d / "F0"))
    assert layer_runs(str(d / "L0")) == full0  # the first one is full
    for k in range(1, 10):
        runs = layer_runs(str(d / f"L{k}"))
        assert runs == seen[k - 1], k  # exactly the pages written since the layer before
        pages = sum(n for _, n in runs)
        assert 0 < pages < sum(n for _, n in full0)
    for k in (1, 4, 9):  # merged: the full checkpoint's memory file, byte for byte
        _, n, _ = merge(str(d / f"L{k}"), str(d / f"M{k}"))
        assert n == k and same_memory(str(d / f"M{k}"), str(d / f"F{k}"))
        assert layer_runs(str(d / f"M{k}")) == layer_runs(str(d / f"F{k}"))


@pytest.mark.parametrize("k,lazy", [(3, True), (9, False)])
def test_restoring_a_layer_gives_the_guest_of_that_moment(chain, k, lazy):
    d, _ = chain
    want = guestkit.ab_check_file(str(d / f"F{k}"))
    snap = open_snapshot(str(d / f"L{k}"))
    con = CaptureConsole()
    vm = restore(snap, console=con, lazy=lazy)
    snap.close()
    try:
        ram = vm.memory.regions[0].array
        assert guestkit.ab_check(ram) == want  # same memory image, same A-B boundary
        with open(current_files(str(d / f"F{k}")).memory, "rb") as f:
            assert bytes(ram[:64 * MB]) == f.read()
        vm.start()
        con.wait_count(b"B", 3, timeout=30)
        vm.pause()
        assert guestkit.ab_check(ram).passes >= want.passes + 2
        # the chain goes on from the restored layer
        stats = save(vm, str(d / "next"), "checkpoint", incremental=True)
        assert stats.parent == str(d / f"L{k}")
        info = cli("pyhyve", "snapshot", "info", str(d / "next"))
        assert info.returncode == 0 and f"layer         {k + 1} over" in info.stdout
    finally:
        vm.close()


def test_a_missing_corrupt_or_changed_parent_is_refused(chain, make_vm):
    d, _ = chain
    shutil.copy(current_files(str(d / "L4")).memory, d / "L4.orig")
    with open(current_files(str(d / "L4")).memory, "r+b") as f:  # one flipped byte
        runs = layer_runs(str(d / "L4"))
        f.seek(runs[0][0] * PAGE + 100)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(SnapshotError, match=f"parent {d}/L4 of {d}/L5: .*checksum"):
        open_snapshot(str(d / "L9"))
    shutil.copy(d / "L4.orig", current_files(str(d / "L4")).memory)
    open_snapshot(str(d / "L9")).close()
    os.rename(d / "L2.meta", d / "L2.meta.away")
    with pytest.raises(SnapshotError, match=f"parent {d}/L2 of {d}/L3: .*missing"):
        open_snapshot(str(d / "L9"))
    r = cli("pyhyve", "run", "x", "-r", str(d / "L9"))
    assert r.returncode == 1 and f"parent {d}/L2" in r.stderr and r.stderr.count("\n") == 1
    r = cli("pyhyve", "snapshot", "info", str(d / "L9"))
    assert r.returncode == 1 and "MISSING" in r.stdout
    os.rename(d / "L2.meta.away", d / "L2.meta")
    vm, con = make_vm("ab", "ws=1M", memory=64 * MB)  # another save to a parent's path
    con.wait_count(b"B", 2)
    save(vm, str(d / "L6"), "checkpoint")
    with pytest.raises(SnapshotError, match=f"parent {d}/L6 of {d}/L7 has changed"):
        open_snapshot(str(d / "L9"))
    r = cli("pyhyve", "snapshot", "merge", str(d / "L9"), str(d / "out"))
    assert r.returncode == 1 and "has changed" in r.stderr and not os.path.exists(d / "out.meta")


def test_a_failed_layer_gives_its_pages_to_the_next(make_vm, tmp_path, monkeypatch):
    import pyhyve.snapshot.save as saving

    vm, con = make_vm("ab", "ws=8M rate=40", memory=64 * MB)
    con.wait_count(b"B", 2, timeout=30)
    save(vm, str(tmp_path / "A"), "checkpoint", incremental=True)
    con.wait_count(b"B", con.buf.count(b"B") + 2, timeout=30)
    real = saving.commit

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(saving, "commit", full_disk)
    with pytest.raises(SnapshotError, match="No space"):
        save(vm, str(tmp_path / "B"), "checkpoint", incremental=True)
    monkeypatch.setattr(saving, "commit", real)
    vm.pause()
    save(vm, str(tmp_path / "C"), "checkpoint", incremental=True)
    save(vm, str(tmp_path / "full"), "checkpoint")
    merge(str(tmp_path / "C"), str(tmp_path / "M"))
    assert same_memory(str(tmp_path / "M"), str(tmp_path / "full"))
    with pytest.raises(SnapshotError, match="stacks on it"):  # would destroy its own parent
        save(vm, str(tmp_path / "A"), "checkpoint", incremental=True)
    assert os.path.exists(current_files(str(tmp_path / "A")).memory)
    assert guest_runs(vm.memory)  # still running whole
    vm.resume()


def test_incremental_from_the_command_line(kit, tmp_path, rundir):
    p = spawn("pyhyve", "run", "inc", "-m", "64M", "-k", kit["ab"], "--cmdline",
              "ws=8M rate=40", "--console", "null", "--track-dirty")
    wait_socket(rundir, "inc")

    def ctl(*args):
        r = cli("pyhyvectl", "--vm", "inc", *args)
        assert r.returncode == 0, r.stderr
        return r.stdout
    assert "dirty_tracking: True" in ctl("--status")
    assert "incremental_parent: none (the next incremental snapshot is full)" in ctl("--status")
    first = ctl("--checkpoint", str(tmp_path / "c0"), "--incremental")
    assert "zero pages skipped" in first  # full: nothing to stack on yet
    second = ctl("--checkpoint", str(tmp_path / "c1"), "--incremental")
    assert f"a layer over {tmp_path}/c0" in second
    assert f"incremental_parent: {tmp_path}/c1" in ctl("--status")
    r = cli("pyhyvectl", "--vm", "inc", "--status", "--incremental")
    assert r.returncode == 2 and "--incremental goes with" in r.stderr
    ctl("--suspend", str(tmp_path / "c2"), "--incremental")
    p.wait(timeout=30)
    r = cli("pyhyve", "snapshot", "verify", str(tmp_path / "c2"))
    assert r.returncode == 0, r.stderr
    r = cli("pyhyve", "snapshot", "merge", str(tmp_path / "c2"), str(tmp_path / "flat"))
    assert r.returncode == 0 and "merged 2 layer(s)" in r.stdout, r.stderr
    r = cli("pyhyve", "snapshot", "merge", str(tmp_path / "flat"), str(tmp_path / "x"))
    assert r.returncode == 1 and "nothing to merge" in r.stderr
    r = cli("pyhyve", "snapshot", "merge", str(tmp_path / "c2"), str(tmp_path / "c1"))
    assert r.returncode == 1 and "part of the chain" in r.stderr
    # a restored layer continues the chain without being asked
    p = spawn("pyhyve", "run", "inc2", "-r", str(tmp_path / "c2"), "--console", "null")
    wait_socket(rundir, "inc2")
    st = cli("pyhyvectl", "--vm", "inc2", "--status").stdout
    assert f"incremental_parent: {tmp_path}/c2" in st
    assert cli("pyhyvectl", "--vm", "inc2", "--destroy").returncode == 0
    p.wait(timeout=30)


def test_layers_of_a_running_guest_miss_no_written_page(make_vm, tmp_path):
    """Layers taken while the guest runs (no pause): a page the dirty log missed would
    hold an older pass's value and break the A-B invariant of the stacked image."""
    vm, con = make_vm("ab", "ws=16M", memory=64 * MB)
    con.wait_count(b"B", 2, timeout=30)
    for k in range(6):
        con.wait_count(b"B", con.buf.count(b"B") + 1, timeout=30)
        save(vm, str(tmp_path / f"R{k}"), "checkpoint", incremental=True)
    for k in (2, 5):
        merge(str(tmp_path / f"R{k}"), str(tmp_path / f"MR{k}"))
        merged = guestkit.ab_check_file(str(tmp_path / f"MR{k}"))
        snap = open_snapshot(str(tmp_path / f"R{k}"))
        vm2 = restore(snap, console=CaptureConsole(), lazy=k == 2)
        snap.close()
        try:
            assert guestkit.ab_check(vm2.memory.regions[0].array) == merged
        finally:
            vm2.close()


def test_a_broken_chain_below_the_parent_makes_the_next_save_full(make_vm, tmp_path):
    vm, con = make_vm("ab", "ws=2M", memory=64 * MB)
    con.wait_count(b"B", 2, timeout=30)
    for k in range(3):
        save(vm, str(tmp_path / f"L{k}"), "checkpoint", incremental=True)
    save(vm, str(tmp_path / "L1"), "checkpoint")  # a plain save over the grandparent
    stats = save(vm, str(tmp_path / "L3"), "checkpoint", incremental=True)
    assert stats.parent is None and "L1, under the new layer, was replaced" in stats.note
    open_snapshot(str(tmp_path / "L3")).close()  # restorable on its own
    stats = save(vm, str(tmp_path / "L4"), "checkpoint", incremental=True)
    assert stats.parent == str(tmp_path / "L3")


@pytest.mark.parametrize("change,match", [
    (lambda p: p.update(path="/etc/passwd"), "bad parent path"),
    (lambda p: p.update(path="L0\u0000x"), "bad parent path"),
    (lambda p: p.update(path="not-a-snapshot"), "not-a-snapshot"),
    (lambda p: p.update(depth=5), "depth"),
])
def test_a_hostile_parent_record_is_refused(make_vm, tmp_path, change, match):
    import json

    from pyhyve.snapshot.format import meta_checksum

    vm, con = make_vm("ab", "ws=2M", memory=64 * MB)
    con.wait_count(b"B", 2, timeout=30)
    save(vm, str(tmp_path / "L0"), "checkpoint", incremental=True)
    save(vm, str(tmp_path / "L1"), "checkpoint", incremental=True)
    (tmp_path / "not-a-snapshot.meta").write_text("{}")
    path = tmp_path / "L1.meta"
    meta = json.loads(path.read_text())
    change(meta["parent"])
    meta["meta_checksum"] = meta_checksum(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(SnapshotError, match=match):
        open_snapshot(str(tmp_path / "L1"))
    for args in (["snapshot", "verify"], ["snapshot", "info"], ["run", "x", "-r"]):
        r = cli("pyhyve", *args, str(tmp_path / "L1"))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_parent_of_another_size_is_refused(make_vm, tmp_path):
    import json

    from pyhyve.snapshot.format import meta_checksum

    vm, con = make_vm("ab", "ws=2M", memory=64 * MB)
    con.wait_count(b"B", 2, timeout=30)
    save(vm, str(tmp_path / "L0"), "checkpoint", incremental=True)
    save(vm, str(tmp_path / "L1"), "checkpoint", incremental=True)
    other, c2 = make_vm("ab", "ws=2M", memory=32 * MB)
    c2.wait_count(b"B", 2, timeout=30)
    save(other, str(tmp_path / "small"), "checkpoint")
    path = tmp_path / "L1.meta"
    meta = json.loads(path.read_text())
    small = json.loads((tmp_path / "small.meta").read_text())
    meta["parent"].update(path="small", meta_checksum=small["meta_checksum"], depth=1)
    meta["meta_checksum"] = meta_checksum(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(SnapshotError, match="different memory size"):
        open_snapshot(str(tmp_path / "L1"))


def test_track_dirty_at_restore_and_no_clone_of_a_layer(make_vm, tmp_path, rundir):
    vm, con = make_vm("ab", "ws=2M", memory=64 * MB)
    con.wait_count(b"B", 2, timeout=30)
    save(vm, str(tmp_path / "full"), "checkpoint")
    save(vm, str(tmp_path / "L0"), "checkpoint", incremental=True)
    save(vm, str(tmp_path / "L1"), "checkpoint", incremental=True)
    p = spawn("pyhyve", "run", "td", "-r", str(tmp_path / "full"), "--console", "null",
              "--track-dirty")
    wait_socket(rundir, "td")
    assert f"incremental_parent: {tmp_path}/full" in cli("pyhyvectl", "--vm", "td",
                                                          "--status").stdout
    r = cli("pyhyvectl", "--vm", "td", "--checkpoint", str(tmp_path / "over"), "--incremental")
    assert r.returncode == 0 and f"a layer over {tmp_path}/full" in r.stdout, r.stderr
    assert cli("pyhyvectl", "--vm", "td", "--destroy").returncode == 0
    p.wait(timeout=30)
    for cmd in (["run", "c", "-r", str(tmp_path / "L1"), "--clone"],
                ["clone", str(tmp_path / "L1"), "--count", "2", "--name-prefix", "q"]):
        r = cli("pyhyve", *cmd)
        assert r.returncode == 1 and "incremental layer" in r.stderr, r.stderr
