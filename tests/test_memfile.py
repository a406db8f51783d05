"""The memory-file building blocks: runs, their table, and scanning private mappings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyhyve.pipeline import pages as pagelib
from pyhyve.snapshot.files import current_files
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save

from conftest import CaptureConsole

MB = 1 << 20


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=30))
def test_merge_is_the_union(runs):
    merged = pagelib.merge(runs)
    want = set()
    for p, n in runs:
        want.update(range(p, p + n))
    got = set()
    for p, n in merged:
        got.update(range(p, p + n))
    assert got == want
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(merged))


@given(st.sets(st.integers(0, 63)))
def test_nonzero_runs_find_exactly_the_nonzero_pages(pages):
    a = np.zeros(64 * 4096, dtype=np.uint8)
    for p in pages:
        a[p * 4096 + (p * 37) % 4096] = 1
    runs = pagelib.nonzero_runs(a, 10)
    found = {p - 10 for s, n in runs for p in range(s, s + n)}
    assert found == pages


def test_run_table_round_trip_and_checks():
    runs = [(0, 3), (10, 1), (100, 5)]
    assert pagelib.decode_runs(pagelib.encode_runs(runs), 105) == runs
    for bad in ([(0, 3), (2, 1)], [(5, 0)], [(100, 6)], [(10, 1), (0, 1)]):
        with pytest.raises(ValueError):
            pagelib.decode_runs(pagelib.encode_runs(bad), 105)
    with pytest.raises(ValueError):
        pagelib.decode_runs(b"\0" * 15, 105)


def suspend_and_restore(vm, base: str):
    """Suspend `vm` to `base` and restore it lazily (not started)."""
    save(vm, base, "suspend")
    vm.stop("suspended")
    snap = open_snapshot(base)
    try:
        return restore(snap, console=CaptureConsole())
    finally:
        snap.close()


@pytest.mark.kvm
def test_writes_into_holes_of_a_lazily_restored_vm_are_saved(make_vm, tmp_path):
    vm, con = make_vm("hashchain", "", memory=256 * MB)
    con.wait_for("H0 3 ")
    vm2 = suspend_and_restore(vm, str(tmp_path / "a"))
    try:
        assert vm2.memory.fd >= 0 and list(vm2.memory.file_backed())  # reads the file
        vm2.memory.write(200 * MB + 4096 * 3, b"written after restore")  # a hole in the file
        save(vm2, str(tmp_path / "b"), "checkpoint")
        with open(current_files(str(tmp_path / "b")).memory, "rb") as f:
            f.seek(200 * MB + 4096 * 3)
            assert f.read(21) == b"written after restore"
    finally:
        vm2.close()


@pytest.mark.kvm
def test_status_says_what_backs_guest_ram(make_vm, tmp_path):
    """--status names the backing and how much of it the host gave as 2 MiB pages."""
    with open("/proc/sys/vm/compact_memory", "w") as f:  # a fragmented host (page cache
        f.write("1")                                      # full of files) has them after
    vm, con = make_vm("ab", "ws=16M", memory=64 * MB)
    con.wait_count(b"B", 2)
    st = vm.status()
    assert st["memory_backing"] == "anonymous memory"
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read()
    if "[never]" in thp:
        assert st["huge_pages"] == 0
    else:  # asked for with MADV_HUGEPAGE: the written working set is mostly in 2 MiB pages
        assert st["huge_pages"] >= 8 * MB, st
    vm2 = suspend_and_restore(vm, str(tmp_path / "s"))
    try:
        assert vm2.status()["memory_backing"] == "snapshot file, copy-on-write"
    finally:
        vm2.close()
