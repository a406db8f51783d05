"""The loading set (snapshot/loadset.py): recorded at save, prefetched by a lazy restore,
and checked like every other state section: a damaged one refuses the snapshot."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from pyhyve import guestkit
from pyhyve.pipeline.pages import RUN, _written_pages
from pyhyve.snapshot.files import current_files
from pyhyve.snapshot.format import SnapshotError, checksum
from pyhyve.snapshot.loadset import MAX_HOT_RUNS, SECTION, blocks_of, hot_blocks, intersect
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save
from test_snapshot_refusals import edit_meta

from conftest import CaptureConsole, cli

pytestmark = pytest.mark.kvm

MB = 1 << 20
WS, COLD = 8 * MB, 24 * MB  # the A-B guest's working set at 4 MiB; cold data after it


@pytest.fixture(scope="module")
def hot_and_cold(tmp_path_factory, kit):
    """A suspended A-B guest that writes 8 MiB every pass and wrote 24 MiB once at boot."""
    from pyhyve.vm import VirtualMachine, VmConfig

    d = tmp_path_factory.mktemp("loadset")
    con = CaptureConsole()
    vm = VirtualMachine.create(VmConfig("ls", 64 * MB, 1, kernel=kit["ab"],
                                        cmdline="ws=8M ro=24M roevery=0"), console=con)
    vm.start()
    con.wait_for(b"BBB")
    save(vm, str(d / "snap"), "suspend", loading_window=0.1)
    vm.close()
    return str(d / "snap")


@pytest.fixture
def snap(hot_and_cold, tmp_path):
    src = current_files(hot_and_cold)
    for path in (src.memory, src.state, src.meta):
        shutil.copy(path, str(tmp_path / os.path.basename(path)))
    return str(tmp_path / "snap")


def section_of(base: str) -> tuple[dict, dict]:
    with open(current_files(base).meta) as f:
        meta = json.load(f)
    return meta, next(s for s in meta["state"]["sections"] if s["name"] == SECTION)


def test_the_set_is_the_working_set_and_a_lazy_restore_leaves_cold_data_in_the_file(snap):
    """The loading set is the 8 MiB the guest writes, not the 24 MiB it wrote once; a lazy
    restore copies the 8 MiB into memory of its own before the guest starts, and the 24
    MiB stay in the file while the guest runs on."""
    s = open_snapshot(snap)
    start = 4 * MB // 4096
    assert s.loading == [(start, WS // 4096)]  # not the cold 24 MiB after it
    con = CaptureConsole()
    vm = restore(s, console=con)
    s.close()
    try:
        r = vm.memory.regions[0]
        hot = slice(start, start + WS // 4096)
        assert _written_pages(r.host_addr, r.size)[hot].all()  # copied in before the start
        assert vm.memory.guard.prefetch is None  # type: ignore[union-attr]
        vm.start()
        n = con.text.count("B")
        con.wait_count(b"B", n + 5, timeout=30)
        vm.pause()
        private = _written_pages(r.host_addr, r.size)
        cold = slice(start + WS // 4096, start + (WS + COLD) // 4096)
        assert private[start:start + WS // 4096].all()
        assert not private[cold].any()  # never read: still only in the file
        assert private.sum() * 4096 < 2 * WS  # the guest's memory is what it uses
        saved = guestkit.ab_check(r.array)  # the invariant holds, and the cold data is whole
        assert saved.passes > 0
        with open(current_files(snap).memory, "rb") as f:
            f.seek(4 * MB + WS)
            assert f.read(COLD) == bytes(r.array[4 * MB + WS:4 * MB + WS + COLD])
    finally:
        vm.close()


def test_a_corrupt_loading_set_refuses_the_snapshot(snap):
    _, sec = section_of(snap)
    assert sec["length"] > 0
    with open(current_files(snap).state, "r+b") as f:
        f.seek(sec["offset"] + 3)
        b = f.read(1)
        f.seek(sec["offset"] + 3)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(SnapshotError, match="state section 'loading-set' checksum mismatch"):
        open_snapshot(snap)
    r = cli("pyhyve", "run", "ls", "-r", snap, "--lazy")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("checksum mismatch (corrupt)"), r.stderr


def test_a_missing_loading_set_refuses_a_version_5_snapshot(snap):
    def drop(m):
        m["state"]["sections"] = [s for s in m["state"]["sections"] if s["name"] != SECTION]
    edit_meta(snap, drop)
    with pytest.raises(SnapshotError, match="section 'loading-set' is missing"):
        open_snapshot(snap)


@pytest.mark.parametrize("runs", [[(2000, 10), (1000, 10)],   # unsorted
                                  [(1000, 10), (1005, 10)],   # overlapping
                                  [(16383, 2)],               # leaves RAM
                                  [(10, 0)]])                 # empty run
def test_a_malformed_loading_set_with_a_good_checksum_is_refused(snap, runs):
    meta, sec = section_of(snap)
    blob = b"".join(RUN.pack(p, n) for p, n in runs)
    state = current_files(snap).state
    with open(state, "r+b") as f:
        f.truncate(sec["offset"])
        f.seek(sec["offset"])
        f.write(blob)
        size = f.tell()

    def rewrite(m):
        m["state"]["size"] = size
        for s in m["state"]["sections"]:
            if s["name"] == SECTION:
                s.update(length=len(blob), checksum=checksum(blob))
    assert sec["offset"] + sec["length"] == meta["state"]["size"]  # the last section
    edit_meta(snap, rewrite)
    with pytest.raises(SnapshotError, match="state section 'loading-set': loading set is not "
                                            "sorted, overlaps or leaves RAM"):
        open_snapshot(snap)


def test_no_set_unless_asked_for_or_when_paused(make_vm, tmp_path):
    """Recording switches the dirty log on and off, which costs the guest: only when asked.
    A paused guest writes nothing to watch."""
    vm, con = make_vm("ab", "ws=4M", memory=32 * MB)
    con.wait_for(b"BB")
    save(vm, str(tmp_path / "d"), "checkpoint")
    vm.pause()
    save(vm, str(tmp_path / "p"), "checkpoint", loading_window=0.1)
    for name in ("d", "p"):
        s = open_snapshot(str(tmp_path / name))
        try:
            assert s.loading == [], name
        finally:
            s.close()


def test_pyhyvectl_records_a_loading_set_when_asked(kit, tmp_path, rundir):
    import subprocess

    from conftest import spawn, wait_socket

    p = spawn("pyhyve", "run", "ls", "-k", kit["ab"], "-m", "64M", "--cmdline",
              "ws=8M ro=24M roevery=0", "--console", "null", stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "ls")
        time.sleep(0.5)  # past the ro region's fill
        r = cli("pyhyvectl", "--vm", "ls", "--suspend", str(tmp_path / "s"), "--loading-set",
                "100")
        assert r.returncode == 0, r.stderr
        assert p.wait(30) == 0
        s = open_snapshot(str(tmp_path / "s"))
        try:
            assert s.loading == [(4 * MB // 4096, WS // 4096)], s.loading
        finally:
            s.close()
        bad = cli("pyhyvectl", "--vm", "ls", "--pause", "--loading-set", "100")
        assert bad.returncode == 2 and "--loading-set goes with" in bad.stderr
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_blocks_and_intersections():
    import numpy as np

    w = np.zeros(2048, dtype=bool)
    w[[5, 600, 1990]] = True  # blocks 0, 1 and the last, short one
    assert blocks_of(w[:2000], 2000) == [(0, 1024), (1536, 464)]
    w[:] = False
    w[600] = True
    assert blocks_of(w, 2048) == [(512, 512)]
    assert intersect([(0, 10), (20, 10)], [(5, 20)]) == [(5, 5), (20, 5)]
    assert intersect([(0, 10)], []) == []
    # the set's blocks that hold data, whole: block 1 has none, the last one ends with RAM
    assert hot_blocks([(0, 1536), (2048, 100)], [(5, 1), (1100, 10), (2050, 3)], 2148) == \
        [(0, 512), (1024, 512), (2048, 100)]
    # a set of scattered single pages still gives whole blocks, and at most MAX_HOT_RUNS
    scattered = [(p, 1) for p in range(0, 1 << 24, 1024)]
    runs = hot_blocks(scattered, [(0, 1 << 24)], 1 << 24)
    assert len(runs) == MAX_HOT_RUNS and all(n == 512 and p % 512 == 0 for p, n in runs)
    assert hot_blocks([], [(0, 10)]) == [] and hot_blocks(None, [(0, 10)]) == []


def test_a_restore_without_eager_or_lazy_is_lazy_with_a_set_and_eager_without(snap, rundir,
                                                                             make_vm,
                                                                             tmp_path):
    """The command line's default is whichever reaches full speed first: with a loading
    set a lazy restore (the set copied in, cold data left in the file), without one an
    eager restore; --eager and --lazy still choose."""
    import subprocess

    from conftest import spawn, suspended

    plain = suspended(make_vm, str(tmp_path / "plain"))
    for base, flags, want in ((snap, [], "(lazy)"), (plain, [], "(eager)"),
                              (snap, ["--eager"], "(eager)"), (plain, ["--lazy"], "(lazy)")):
        p = spawn("pyhyve", "run", "d", "-r", base, *flags, "--console", "null",
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            line = p.stderr.readline()
            assert want in line, (base, flags, line)
        finally:
            p.kill()
            p.wait()


def test_a_checkpoint_maps_the_cold_file_pages_before_its_pause(snap):
    """A lazily restored guest leaves its cold data in the snapshot file; a checkpoint of
    it would copy that data while holding the guest, from disk if need be. So the save
    maps those file pages first (save._warm, GIL released), and the pause copies at memory
    speed."""
    import numpy as np

    from pyhyve.pipeline.pages import candidate_runs
    from pyhyve.snapshot import save as save_mod

    def resident(vm, first: int, count: int) -> int:
        r = vm.memory.regions[0]
        with open("/proc/self/pagemap", "rb") as f:
            raw = os.pread(f.fileno(), count * 8, (r.host_addr // 4096 + first) * 8)
        return int(((np.frombuffer(raw, dtype=np.uint64) >> np.uint64(63)) & 1).sum())

    s = open_snapshot(snap)
    try:
        vm = restore(s, console=CaptureConsole(), lazy=True)
    finally:
        s.close()
    try:
        cold = (4 * MB + WS) // 4096, COLD // 4096
        assert resident(vm, *cold) < cold[1] // 2  # left in the file, not mapped yet
        save_mod._warm(vm, candidate_runs(vm.memory))
        assert resident(vm, *cold) == cold[1]
    finally:
        vm.close()
