"""The guest kit under pyhyve: each guest boots and runs; pause/resume keeps it coherent."""

from __future__ import annotations

import itertools
import os
import subprocess
import time

import numpy as np
import pytest

from pyhyve import guestkit
from pyhyve.guestkit import KitError

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

MB = 1 << 20
ON_PVM = os.path.exists("/sys/module/kvm_pvm")


def test_hashchain_runs_to_the_end(make_vm):
    vm, con = make_vm("hashchain", "steps=40")
    assert vm.wait(30)
    assert "hashchain done" in con.text
    assert guestkit.check_hashchain(con.text) == {0: 40}
    assert vm.exit_code == 0


def test_two_vcpus_run_their_own_chains(make_vm):
    vm, con = make_vm("hashchain", "cpus=2 steps=60", cpus=2)
    assert vm.wait(30)
    assert "hashchain cpus=2" in con.text
    assert guestkit.check_hashchain(con.text) == {0: 60, 1: 60}


def test_int3_at_cpl0_is_delivered(make_vm):
    vm, con = make_vm("hashchain", "int3 steps=1")
    assert vm.wait(30)
    assert "[kit] int3 at cpl0 handled" in con.text
    assert guestkit.check_hashchain(con.text) == {0: 1}


def test_ab_256m_working_set_on_1g_keeps_passing(make_vm):
    vm, con = make_vm("ab", "ws=256M", memory=1024 * MB)
    con.wait_for("A-B start ws=256M")
    ram = vm.memory.regions[0].array
    seen = 0
    for _ in range(8):
        con.wait_count(b"B", seen + 3, timeout=30)
        vm.pause()
        res = guestkit.ab_check(ram)  # RAM read while paused: the invariant must hold
        assert res.ws_size == 256 * MB and res.ws_start == 4 * MB
        vm.resume()
        seen = con.buf.count(b"B")
    assert res.passes >= 20


def test_pause_resume_keeps_ab_consistent(make_vm):
    vm, con = make_vm("ab", "ws=64M", memory=256 * MB)
    con.wait_for("B")
    ram = vm.memory.regions[0].array
    passes = []
    for _ in range(50):
        vm.pause()
        assert vm.state == "paused"
        printed = con.buf.count(b"B")
        before = ram[4 * MB:68 * MB:4096].copy()
        time.sleep(0.002)  # a paused guest changes nothing (a window, not a wait)
        assert np.array_equal(before, ram[4 * MB:68 * MB:4096])
        assert con.buf.count(b"B") == printed
        passes.append(guestkit.ab_check(ram).passes)
        vm.resume()
        # a pass since: its counter is bumped just before its B goes out, so a pause can
        # fall between the two; the second B after the pause surely follows a new pass
        con.wait_count(b"B", printed + 2)
    assert all(b > a for a, b in itertools.pairwise(passes)), passes


def test_ab_idle_guest_prints_markers(make_vm):
    vm, con = make_vm("ab", "ws=0")
    body = con.wait_for("\n") + 1  # the banner "A-B start" has a B of its own
    con.wait_count(b"B", 5, timeout=20, start=body)
    vm.pause()
    res = guestkit.ab_check(vm.memory.regions[0].array)
    assert res.ws_size == 0 and res.passes >= 5


def test_checker_catches_a_broken_page(make_vm):
    vm, con = make_vm("ab", "ws=16M")
    con.wait_count(b"B", 3)
    vm.pause()
    ram = vm.memory.regions[0].array
    guestkit.ab_check(ram)
    ram[4 * MB + 100 * 4096] ^= 0x55
    with pytest.raises(KitError, match=r"invariant broken|pages read"):
        guestkit.ab_check(ram)


def test_checker_on_synthetic_images():
    ram = np.zeros(16 * MB, dtype=np.uint8)
    words = ram[:4096].view(np.uint64)
    words[0], words[1] = guestkit.AB_MAGIC, ~np.uint64(guestkit.AB_MAGIC)
    words[2], words[3], words[4] = 4 * MB, 4 * MB, 9  # start, size, passes
    firsts = ram[4 * MB:8 * MB:4096]
    firsts[:] = 9
    assert guestkit.ab_check(ram).boundary == 0
    firsts[:100] = 10
    assert guestkit.ab_check(ram).boundary == 100
    firsts[:] = 10
    assert guestkit.ab_check(ram).boundary == 1024
    firsts[500] = 9  # two boundaries
    with pytest.raises(KitError):
        guestkit.ab_check(ram)
    firsts[:] = 7  # value does not match the pass counter
    with pytest.raises(KitError, match="passes"):
        guestkit.ab_check(ram)
    words[0] = 0
    with pytest.raises(KitError, match="not found"):
        guestkit.ab_check(ram)


def test_hashchain_checker_catches_gaps_and_repeats():
    h1 = guestkit.hashchain_step(guestkit.hashchain_seed(0), 1)
    h2 = guestkit.hashchain_step(h1, 2)
    good = f"H0 1 {h1:016x}\nH0 2 {h2:016x}\n"
    assert guestkit.check_hashchain(good) == {0: 2}
    with pytest.raises(KitError, match="follows"):
        guestkit.check_hashchain(good + f"H0 2 {h2:016x}\n")
    with pytest.raises(KitError, match="follows"):
        guestkit.check_hashchain(f"H0 2 {h2:016x}\n")
    with pytest.raises(KitError, match="expected"):
        guestkit.check_hashchain(f"H0 1 {h2:016x}\n")


# --- exits that stop the VM with a message ----------------------------------------------

def _raw_kernel(tmp_path, asm: str):
    """A bzImage around raw 64-bit code (see test_boot.fake_bzimage)."""
    from test_boot import fake_bzimage
    (tmp_path / "k.S").write_text(asm)
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "k.o"), str(tmp_path / "k.S")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "k.o"),
                    str(tmp_path / "k.bin")], check=True)
    path = tmp_path / "bzImage"
    path.write_bytes(fake_bzimage(tmp_path, (tmp_path / "k.bin").read_bytes()))
    return str(path)


def test_triple_fault_stops_with_message(tmp_path, make_vm):
    vm, _ = make_vm(_raw_kernel(tmp_path, ".code64\nud2\n"), memory=128 * MB)
    assert vm.wait(30)
    assert vm.exit_code == 1
    assert "triple fault" in vm.stop_reason and "rip=0x1000200" in vm.stop_reason
    assert "instruction bytes: 0f 0b" in vm.stop_reason  # ud2, where it died


def test_emulation_failure_names_rip_and_bytes(tmp_path, make_vm):
    # clac at CPL0: the kvm_pvm emulator cannot run it; a VMX/SVM host raises #UD instead
    # (no SMAP), which here ends in a triple fault since there is no IDT.
    vm, _ = make_vm(_raw_kernel(tmp_path, ".code64\nnop\nclac\n"), memory=128 * MB)
    assert vm.wait(30)
    assert vm.exit_code == 1
    if ON_PVM:
        assert "KVM_EXIT_INTERNAL_ERROR (emulation failure)" in vm.stop_reason
        assert "rip=0x1000201" in vm.stop_reason
        assert "0f 01 ca" in vm.stop_reason
    else:  # the #UD becomes a triple fault, at the clac: named with its rip and bytes
        assert "triple fault" in vm.stop_reason and "rip=0x1000201" in vm.stop_reason
        assert "instruction bytes: 0f 01 ca" in vm.stop_reason
