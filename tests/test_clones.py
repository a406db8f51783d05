"""Clones: many guests from one snapshot at once, sharing its memory, each its own.

`pyhyve clone` starts detached VMs: the fixture below kills whatever a test leaves behind
(every process whose command line names the test's directory)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from pyhyve import guestkit

from conftest import cli, suspended, wait_file

pytestmark = pytest.mark.kvm

MB = 1 << 20
_G = re.compile(r"G(\d+) ([0-9a-f]{32})")


@pytest.fixture
def reaper(tmp_path):
    yield
    mark = str(tmp_path).encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if mark in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def console(d, name: str) -> str:
    with open(os.path.join(d, f"{name}.console"), errors="replace") as f:
        return f.read().replace("\r", "")


def after_restore(d, name: str, passes: int, timeout: float = 90) -> tuple[str, str]:
    """Wait for the clone's guest to print its new generation ID and `passes` passes
    after it; returns (ID, output since)."""
    deadline = time.monotonic() + timeout
    while True:
        text = console(d, name)
        m = [g for g in _G.finditer(text) if int(g.group(1)) >= 2]
        if m and text.count("B", m[0].end()) >= passes:
            return m[0].group(2), text[m[0].end():]
        assert time.monotonic() < deadline, f"{name}: {text[-300:]!r}"
        time.sleep(0.05)


def status(name: str) -> str:
    r = cli("pyhyvectl", "--vm", name, "--status")
    assert r.returncode == 0, r.stderr
    return r.stdout


def pids(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+): running, pid (\d+)",
                                                             out, re.M)}


def test_twenty_clones_run_independently_each_with_its_own_generation_id(
        make_vm, tmp_path, rundir, reaper):
    base = suspended(make_vm, str(tmp_path / "ab"), cmdline="ws=1M genid", ready=b"G1")
    r = cli("pyhyve", "clone", base, "--count", "20", "--name-prefix", "k", "--dir",
            str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    running = pids(r.stdout)
    assert sorted(running) == sorted(f"k-{i}" for i in range(1, 21))
    ids = {}
    for name in running:
        ids[name], _ = after_restore(tmp_path, name, 2)
        assert f"generation_id: {ids[name]}" in status(name)
    assert len(set(ids.values())) == 20  # every clone is told it is a new generation
    # killing one leaves the others running and making progress
    os.kill(running["k-7"], signal.SIGKILL)
    seen = {n: console(tmp_path, n).count("B") for n in running if n != "k-7"}
    for name, before in seen.items():
        deadline = time.monotonic() + 60
        while console(tmp_path, name).count("B") < before + 2:
            assert time.monotonic() < deadline, f"{name} stopped making progress"
            time.sleep(0.05)
        assert "state: running" in status(name)
    # each guest's memory holds the A-B invariant on its own (checked on a checkpoint)
    for name in ("k-1", "k-13", "k-20"):
        snap = str(tmp_path / f"cp-{name}")
        assert cli("pyhyvectl", "--vm", name, "--checkpoint", snap).returncode == 0
        assert guestkit.ab_check_file(snap).passes >= 3
    for name in running:
        if name != "k-7":
            assert cli("pyhyvectl", "--vm", name, "--destroy").returncode == 0


def _smaps(pid: int, memory_file: str, ram: int) -> tuple[int, int]:
    """(PSS of the guest's RAM, PSS of everything else) of one VMM, in bytes: RAM is the
    range the snapshot's memory file is mapped at (file offset 0 = guest RAM's start)."""
    vmas, base = [], None
    with open(f"/proc/{pid}/smaps") as f:
        cur = None
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \d+\s*(.*)$", line)
            if head:
                cur = [int(head.group(1), 16), int(head.group(2), 16), 0]
                vmas.append(cur)
                if head.group(4) == memory_file and base is None:
                    base = cur[0] - int(head.group(3), 16)
            elif line.startswith("Pss:") and cur is not None:
                cur[2] = int(line.split()[1]) * 1024
    assert base is not None, "the memory file is not mapped"
    guest = sum(p for s, e, p in vmas if base <= s and e <= base + ram)
    return guest, sum(p for _, _, p in vmas) - guest


@pytest.mark.parametrize("loading_set", [True, False], ids=["loading-set", "no-set"])
def test_clones_share_the_memory_they_only_read(make_vm, tmp_path, rundir, reaper,
                                                loading_set):
    """A guest that reads a 256 MiB region and writes a 4 MiB one, cloned 20 times, costs
    the host the snapshot's pages once plus what each clone writes and its VMM (issue 12).
    Recorded, the snapshot's loading set is the 4 MiB the guest writes; without one, each
    clone's prefetch maps every data page: for reading, shared."""
    from pyhyve.snapshot.save import save

    ram = 320 * MB
    base = str(tmp_path / "ro")
    vm, con = make_vm("ab", "ws=4M ro=256M genid", memory=ram)
    con.wait_for(b"G1")
    save(vm, base, "suspend", loading_window=0.1 if loading_set else 0.0)
    vm.stop("suspended")
    r = cli("pyhyve", "clone", base, "--count", "20", "--name-prefix", "s", "--dir",
            str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    running = pids(r.stdout)
    for name in running:  # two passes: the whole 256 MiB read twice, 4 MiB written
        _, out = after_restore(tmp_path, name, 2, timeout=240)
        assert "changed" not in out
    memory_file = status("s-1").split("snapshot_file: ")[1].split()[0]
    guest = own = 0
    for pid in running.values():
        g, o = _smaps(pid, memory_file, ram)
        guest, own = guest + g, own + o
    total, n = guest + own, len(running)
    assert total < 256 * MB + 1.2 * (n * 4 * MB + own), (guest // MB, own // MB)
    assert guest < 1.2 * (256 + n * 4) * MB, guest // MB  # the 256 MiB once, not 20 times


def test_clone_refusals_and_a_failing_clone_is_named(make_vm, tmp_path, rundir, reaper):
    base = suspended(make_vm, str(tmp_path / "ab"), cmdline="ws=1M")
    r = cli("pyhyve", "run", "x", "-r", base, "--clone", "--eager")
    assert r.returncode == 1 and "--clone" in r.stderr and "--eager" in r.stderr
    r = cli("pyhyve", "run", "x", "--clone", "-k", "/nonexistent")
    assert r.returncode == 1 and "--clone goes with --restore" in r.stderr
    for args, words in ((["--count", "0"], "--count"), (["--name-prefix", "a/b"], "prefix")):
        full = ["--count", "2", "--name-prefix", "p", *args]
        r = cli("pyhyve", "clone", base, *full, "--dir", str(tmp_path))
        assert r.returncode in (1, 2) and words in r.stderr and r.stderr.count("\n") == 1
    with open(base + ".meta", "rb") as f:  # corrupt: refused before any clone starts
        meta = f.read()
    with open(base + ".meta", "wb") as f:
        f.write(meta.replace(b'"suspend"', b'"suspenD"'))
    r = cli("pyhyve", "clone", base, "--count", "3", "--name-prefix", "c", "--dir", str(tmp_path))
    assert r.returncode == 1 and "checksum" in r.stderr and not os.path.exists(
        tmp_path / "c-1.log")
    base2 = suspended(make_vm, str(tmp_path / "ok"), cmdline="ws=1M")
    os.mkdir(tmp_path / "f-2.console")  # that clone's console cannot be opened
    r = cli("pyhyve", "clone", base2, "--count", "3", "--name-prefix", "f", "--dir",
            str(tmp_path), timeout=120)
    assert r.returncode == 1 and "1 of 3 clones failed: f-2" in r.stderr
    assert sorted(pids(r.stdout)) == ["f-1", "f-3"]
    wait_file(tmp_path / "f-1.console", "B")
    for name in ("f-1", "f-3"):
        assert cli("pyhyvectl", "--vm", name, "--destroy").returncode == 0
    os.symlink(tmp_path / "elsewhere", tmp_path / "g-1.log")  # planted in a shared --dir
    r = cli("pyhyve", "clone", base2, "--count", "2", "--name-prefix", "g", "--dir",
            str(tmp_path), timeout=120)
    assert r.returncode == 1 and "1 of 2 clones failed: g-1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "elsewhere")
    assert sorted(pids(r.stdout)) == ["g-2"]
    assert cli("pyhyvectl", "--vm", "g-2", "--destroy").returncode == 0


def test_generation_id_changes_on_restore_and_stays_across_a_migration(make_vm, tmp_path):
    """The running guest sees the new ID without a reboot; a live migration duplicates
    nothing, so the guest keeps its ID there."""
    from migrate_helpers import Destination, migrate
    from pyhyve.snapshot.restore import open_snapshot, restore
    from pyhyve.snapshot.save import save

    from conftest import CaptureConsole

    def line(c, counter: int) -> str:
        """The guest's whole "G<counter> <id>" line, once it has printed it."""
        at = c.wait_for(f"\nG{counter} ", timeout=30)
        c.wait_for("\n", start=at + 1)
        return _G.match(c.text[at + 1:]).group(2)

    vm, con = make_vm("ab", "ws=1M genid", memory=32 * MB)
    first = line(con, 1)
    assert vm.status()["generation_id"] == first
    save(vm, str(tmp_path / "s"), "checkpoint")
    seen = {first}
    for n in range(2):  # two restores of one snapshot: two new IDs, each counter 2
        c2 = CaptureConsole()
        snap = open_snapshot(str(tmp_path / "s"))
        vm2 = restore(snap, console=c2)
        snap.close()
        try:
            vm2.start()
            got = line(c2, 2)
            assert got == vm2.status()["generation_id"] and got not in seen, n
            seen.add(got)
            if n == 1:
                dest = Destination()
                stats = migrate(vm2, dest, live=True)
                assert stats.state == "completed", stats.error
                try:
                    dest.console.wait_count(b"B", 3, timeout=60)
                    assert dest.vm.status()["generation_id"] == got
                    assert b"\nG" not in dest.console.buf  # no change seen by the guest
                finally:
                    dest.vm.close()
        finally:
            vm2.close()
