"""Every way a snapshot can be wrong is refused with one clear message, before any guest runs."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhyve.machine.cpuid import FEATURES
from pyhyve.snapshot.files import current_files
from pyhyve.snapshot.format import SnapshotError, meta_checksum
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save

from conftest import REPO, CaptureConsole, cli

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

MB = 1 << 20


@pytest.fixture(scope="module")
def good(tmp_path_factory, kit):
    """One valid snapshot of a 2-vCPU guest, copied fresh for each test."""
    from pyhyve.vm import VirtualMachine, VmConfig

    d = tmp_path_factory.mktemp("good")
    con = CaptureConsole()
    vm = VirtualMachine.create(VmConfig("g", 64 * MB, 2, kernel=kit["hashchain"],
                                        cmdline="cpus=2"), console=con)
    vm.start()
    con.wait_for("H1 5 ")
    save(vm, str(d / "snap"), "suspend")
    vm.close()
    return str(d / "snap")


def P(base: str, suffix: str) -> str:
    """The current file of a snapshot: "" memory, ".kern" state, ".meta" metadata."""
    f = current_files(base)
    return {"": f.memory, ".kern": f.state, ".meta": f.meta}[suffix]


def copy_snapshot(src: str, dst: str) -> str:
    for suffix in ("", ".kern", ".meta"):
        path = P(src, suffix)
        shutil.copy(path, dst + path[len(src):])
    return dst


@pytest.fixture
def snap(good, tmp_path):
    return copy_snapshot(good, str(tmp_path / "snap"))


def edit_meta(base: str, change) -> None:
    with open(P(base, ".meta")) as f:
        meta = json.load(f)
    change(meta)
    meta["meta_checksum"] = meta_checksum(meta)
    with open(P(base, ".meta"), "w") as f:
        json.dump(meta, f)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def refused(base: str, needle: str) -> None:
    with pytest.raises(SnapshotError, match=needle):
        s = open_snapshot(base)
        try:
            vm = restore(s, console=CaptureConsole())
            vm.close()
        finally:
            s.close()


def first_data_offset(base: str) -> int:
    with open(P(base, ".meta")) as f:
        meta = json.load(f)
    return meta["memory"]["data_pages"] and os.lseek(os.open(P(base, ""), os.O_RDONLY), 0, os.SEEK_DATA)


def test_good_snapshot_restores(snap):
    """The untouched copy every refusal below starts from restores and runs on: both
    vCPUs continue their chains (so a refusal is about the edit, not a broken fixture)."""
    s = open_snapshot(snap)
    con = CaptureConsole()
    vm = restore(s, console=con)
    s.close()
    try:
        vm.start()
        con.wait_count(b"H0 ", 5)  # (the save's loading-set window let the chains go on
        con.wait_count(b"H1 ", 5)  # past "H1 5" before the pause)
        vm.pause()
        for cpu in (0, 1):  # each chain goes on where it was saved (not from 1), step by step
            steps = [int(n) for n in re.findall(rf"^H{cpu} (\d+) ", con.text, re.M)]
            assert steps[0] > 1 and steps == list(range(steps[0], steps[0] + len(steps)))
    finally:
        vm.close()


@pytest.mark.parametrize("suffix,needle", [("", "memory file .* is missing"),
                                           (".kern", "state file .* is missing"),
                                           (".meta", "is missing")])
def test_missing_files(snap, suffix, needle):
    os.unlink(P(snap, suffix))
    refused(snap, needle)


def test_truncated_memory_file(snap):
    os.truncate(P(snap, ""), os.path.getsize(P(snap, "")) - 4096)
    refused(snap, "truncated or replaced")


def test_truncated_state_file(snap):
    os.truncate(P(snap, ".kern"), os.path.getsize(P(snap, ".kern")) - 10)
    refused(snap, "truncated or replaced")


def test_truncated_meta(snap):
    os.truncate(P(snap, ".meta"), os.path.getsize(P(snap, ".meta")) // 2)
    refused(snap, "not valid metadata")


def test_wrong_magic(snap):
    edit_meta(snap, lambda m: m.update(format="qemu-savevm"))
    refused(snap, "not a pyhyve snapshot")


def test_wrong_version(snap):
    edit_meta(snap, lambda m: m.update(format_version=99))
    refused(snap, "format version 99 is not supported")


def test_state_file_bad_magic(snap):
    flip(P(snap, ".kern"), 0)
    refused(snap, "bad magic")


def test_state_section_corrupt(snap):
    flip(P(snap, ".kern"), os.path.getsize(P(snap, ".kern")) - 100)
    refused(snap, "checksum mismatch")


def test_memory_data_corrupt(snap):
    flip(P(snap, ""), first_data_offset(snap) + 77)
    refused(snap, "memory file .* checksum mismatch")


def test_data_written_into_a_hole(snap):
    with open(P(snap, ""), "r+b") as f:
        f.seek(os.path.getsize(P(snap, "")) - 8192)  # far above the guest image: a hole
        f.write(b"\x01")
    refused(snap, "has data at .* where the snapshot has a zero page")


def test_meta_edited_without_checksum(snap):
    with open(P(snap, ".meta")) as f:
        meta = json.load(f)
    meta["vm"]["cmdline"] = "cpus=1"
    with open(P(snap, ".meta"), "w") as f:
        json.dump(meta, f)
    refused(snap, "metadata checksum mismatch")


def test_meta_disagrees_with_files(snap):
    def bigger(m):
        m["vm"]["memory"] *= 2
        m["memory"]["size"] *= 2
        m["memory"]["regions"][0]["size"] *= 2
    edit_meta(snap, bigger)
    refused(snap, "memory file .* bytes, metadata says")


def test_meta_missing_vcpu_section(snap):
    edit_meta(snap, lambda m: m["vm"].update(cpus=3))
    refused(snap, "section 'vcpu2' is missing")


def test_cpuid_feature_missing_on_host(snap):
    from pyhyve.kvm import Kvm
    kvm = Kvm()
    supported = {(e.function, e.index): e for e in kvm.supported_cpuid()}
    kvm.close()
    absent = [(n, f) for n, f in FEATURES.items() if (e := supported.get(f[:2])) is not None
              and not getattr(e, f[2]) >> f[3] & 1]
    if not absent:
        pytest.fail("this host supports every named CPUID feature; cannot build the case")
    name, (leaf, sub, reg, bit) = absent[0]

    def add_feature(m):
        for row in m["cpuid"]:
            if row[0] == leaf and (row[1] == sub or not row[2] & 1):
                row[3 + ["eax", "ebx", "ecx", "edx"].index(reg)] |= 1 << bit
    edit_meta(snap, add_feature)
    refused(snap, f"lacks CPU features the guest uses: .*{name}")


def test_tsc_frequency_differs(snap):
    saved: list[int] = []

    def halve(m):
        m["host"]["tsc_khz"] //= 2
        saved.append(m["host"]["tsc_khz"])
    edit_meta(snap, halve)
    from pyhyve.kvm import Kvm
    from pyhyve.kvm import ioctls as I
    kvm = Kvm()
    scalable = kvm.check_extension(I.KVM_CAP_TSC_CONTROL)
    kvm.close()
    if scalable:  # a host that can scale TSC restores it at the saved rate instead
        s = open_snapshot(snap)
        vm = restore(s, console=CaptureConsole())
        try:  # the guest's TSC runs at its own rate, as KVM reports it for every vCPU
            assert vm.tsc_khz == saved[0]
            assert all(v.get_tsc_khz() == saved[0] for v in vm.vcpus)
        finally:
            vm.close()
            s.close()
    else:
        refused(snap, "TSC frequency differs")


def test_more_memory_than_host(snap):
    huge = 1 << 40

    def grow(m):
        m["vm"]["memory"] = m["memory"]["size"] = huge
        m["memory"]["regions"] = [{"guest_phys_addr": 0, "size": 0xC0000000, "file_offset": 0},
                                  {"guest_phys_addr": 1 << 32, "size": huge - 0xC0000000,
                                   "file_offset": 0xC0000000}]
        m["memory"]["zero_pages"] = huge // 4096 - m["memory"]["data_pages"]
    edit_meta(snap, grow)
    os.truncate(P(snap, ""), huge)  # sparse: costs nothing on disk
    refused(snap, "this host has")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from([".kern", ".meta"]), data=st.data())
def test_random_corruption_is_always_refused(good, tmp_path_factory, which, data):
    d = tmp_path_factory.mktemp("fuzz")
    base = copy_snapshot(good, str(d / "snap"))
    size = os.path.getsize(P(base, which))
    for pos in data.draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=4)):
        flip(P(base, which), pos)  # distinct positions: two flips of one byte would cancel
    refused(base, ".")


def test_cli_refuses_without_starting_a_guest(snap, rundir):
    flip(P(snap, ".kern"), os.path.getsize(P(snap, ".kern")) - 100)
    p = cli("pyhyve", "run", "bad", "-r", snap)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "checksum mismatch" in p.stderr
    assert p.stdout == ""  # no guest ever printed anything
    assert not os.path.exists(os.path.join(rundir, "bad.sock"))
    v = cli("pyhyve", "snapshot", "verify", snap)
    assert v.returncode != 0 and "checksum mismatch" in v.stderr


@pytest.mark.parametrize("where", ["data", "hole"])
def test_restore_verifies_memory_it_was_not_told_about(snap, where):
    """restore() on a snapshot opened without memory verification checks it itself (on a
    thread, while the VM is built) and returns no VM when it fails."""
    if where == "data":
        flip(P(snap, ""), first_data_offset(snap) + 5)
    else:
        with open(P(snap, ""), "r+b") as f:
            f.seek(os.path.getsize(P(snap, "")) - 4096)
            f.write(b"\x07")
    s = open_snapshot(snap, verify_memory=False)
    try:
        with pytest.raises(SnapshotError, match=r"checksum mismatch|has data at"):
            restore(s, console=CaptureConsole())
    finally:
        s.close()


def test_newer_device_state_version_is_refused_with_names(snap):
    edit_meta(snap, lambda m: [d.update(version=99) for d in m["devices"] if d["name"] == "com1"])
    refused(snap, "device 'com1' has UartState state version 99; this pyhyve reads up to version 1")


def test_a_bug_while_restoring_is_not_relabelled(snap, monkeypatch):
    """Only user and host errors become "cannot restore"; a bug escapes as itself."""
    from pyhyve.vm import VirtualMachine

    def bug(self, state):
        raise ValueError("bug: a field went missing")
    monkeypatch.setattr(VirtualMachine, "apply", bug)
    s = open_snapshot(snap)
    try:
        with pytest.raises(ValueError, match="bug: a field") as ei:
            restore(s, console=CaptureConsole())
        assert not isinstance(ei.value, SnapshotError)
    finally:
        s.close()


@pytest.mark.parametrize("copies,needle", [
    ({"disk0": {"size": 1 << 20, "sample": "0" * 32}}, "names no disk of the snapshot"),
    ({"kern": {"size": 1 << 20, "sample": "0" * 32}}, "names no disk of the snapshot"),
    ({"../x": {"size": 1 << 20, "sample": "0" * 32}}, "names no disk of the snapshot"),
    ([], "'disk_copies' is missing"),
])
def test_meta_disk_copies_must_name_disks_of_the_snapshot(snap, copies, needle):
    """disk_copies (a checkpoint's kept disks) is untrusted: it may name only the
    snapshot's own disks, by ids that derive a file FILE.gN.diskK, nothing else."""
    edit_meta(snap, lambda m: m.update(disk_copies=copies))
    refused(snap, needle)


def test_meta_disk_copies_in_a_format_1_snapshot_is_refused(tmp_path):
    """Format 1 had no generations, so no FILE.gN.diskK to name: the key is refused
    there (it used to reach code that needs a generation)."""
    from pyhyve.snapshot.format import read_meta

    v1 = copy_snapshot(os.path.join(REPO, "tests", "fixtures", "snapshot-v1", "ab"),
                       str(tmp_path / "ab"))
    read_meta(v1 + ".meta")  # the fixture as it is: fine
    edit_meta(v1, lambda m: m.update(disk_copies={}))
    with pytest.raises(SnapshotError, match="format-1 snapshot keeps no disk copies"):
        read_meta(v1 + ".meta")
