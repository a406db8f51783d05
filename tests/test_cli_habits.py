"""What a user of bhyve or QEMU expects at the command line: a raw console with an
escape, a live migration progress line, clear TLS and cancel messages, paused guests that
migrate, a missed downtime target said as such, and snapshot errors in one line."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import termios
import time

import pytest

from migrate_helpers import Destination, migrate, slow_cli_migration
from pyhyve.migration.security import load_key
from pyhyve.snapshot.files import current_files
from pyhyve.snapshot.format import meta_checksum

from conftest import BIN, cli, spawn, suspended, wait_socket

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

MB = 1 << 20


def read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        left = deadline - time.monotonic()
        assert left > 0, out[-300:]
        if select.select([fd], [], [], left)[0]:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out


def test_stdio_console_on_a_terminal_is_raw_with_an_escape(kit, rundir):
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([os.path.join(BIN, "pyhyve"), "run", "tty", "-m", "64M", "-k",
                             kit["hashchain"]], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, text=True)
    try:
        out = read_until(master, b"H0 3 ")
        assert b"\r\r\n" not in out and b"\r\n" in out  # the guest's CR LF, not doubled
        os.write(master, b"\x03")  # Ctrl-C goes to the guest, not to us as SIGINT
        time.sleep(0.5)
        assert proc.poll() is None
        os.write(master, b"\x01h")
        read_until(master, b"Ctrl-A x quit")
        os.write(master, b"\x01x")
        assert proc.wait(20) == 3
        assert "quit from the console" in proc.stderr.read()
        assert termios.tcgetattr(slave) == before  # the terminal is given back as it was
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def test_live_migration_shows_progress_on_a_terminal(kit, rundir, monkeypatch):
    monkeypatch.setenv("PYHYVE_MIGRATION_KEY", "k" * 32)
    dest = Destination(key=load_key(None))
    src = spawn("pyhyve", "run", "pg", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=16M",
                "--console", "null", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    master, slave = pty.openpty()
    try:
        wait_socket(rundir, "pg")
        time.sleep(0.5)
        mig = subprocess.Popen([os.path.join(BIN, "pyhyvectl"), "--vm", "pg", "--migrate-live",
                                f"127.0.0.1:{dest.port}", "--bandwidth", "8M", "--compress",
                                "none"], stdout=subprocess.PIPE, stderr=slave, text=True)
        shown = read_until(master, b"MiB sent", timeout=30)
        assert b"\rpg: migrating:" in shown and b"pages" in shown
        out, _ = mig.communicate(timeout=60)
        assert mig.returncode == 0 and "completed" in out
        dest.join()
    finally:
        os.close(master)
        os.close(slave)
        if src.poll() is None:
            src.kill()
            src.wait()
        if dest.vm:
            dest.vm.close()


def test_tls_mismatch_says_tls(make_vm, tmp_path):
    from pyhyve.migration.security import make_certs
    make_certs(str(tmp_path / "c"))
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    dest = Destination(tls_dir=str(tmp_path / "c"))
    t0 = time.monotonic()
    stats = migrate(vm, dest, live=True)  # a plain source against a TLS destination
    assert stats.state == "failed" and "--tls-dir" in stats.error, stats.error
    assert time.monotonic() - t0 < 20 and vm.state == "running"
    dest = Destination()
    stats = migrate(vm, dest, live=True, tls_dir=str(tmp_path / "c"))  # and the other way
    assert stats.state == "failed" and "TLS" in stats.error and "--tls-dir" in stats.error
    assert vm.state == "running"


def test_a_paused_guest_migrates_and_stays_paused(make_vm):
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 5 ")
    vm.pause()
    n = con.text.count("H0 ")
    dest = Destination()
    stats = migrate(vm, dest, live=True)
    assert stats.state == "completed", stats.error
    try:
        assert dest.vm.state == "paused"
        time.sleep(0.3)
        assert dest.console.text.count("H0 ") == 0  # nothing ran while paused
        dest.vm.resume()
        dest.console.wait_for(f"H0 {n + 3} ")
    finally:
        dest.vm.close()


def test_a_missed_downtime_target_is_reported(make_vm):
    vm, con = make_vm("ab", "ws=16M", memory=64 * MB)
    con.wait_count(b"B", 2)
    dest = Destination()
    stats = migrate(vm, dest, live=True, downtime_ms=0.001)
    assert stats.state == "completed" and stats.target_missed
    assert "missed the 0.001 ms target" in stats.line()
    dest.vm.close()


def test_cancel_message_says_it_once(kit, rundir, monkeypatch):
    monkeypatch.setenv("PYHYVE_MIGRATION_KEY", "k" * 32)
    dest = Destination(key=load_key(None))
    with slow_cli_migration(kit, rundir, "cc", dest, ws="64M", memory="256M",
                            bandwidth="4M") as mig:
        assert cli("pyhyvectl", "--vm", "cc", "--migrate-cancel").returncode == 0
        _, err = mig.communicate(timeout=30)
        assert mig.returncode == 1 and err.count("cancelled") == 1, err


# --- snapshots: one line for every bad file, and info shows what it can -----------------

def snapshot(make_vm, tmp_path) -> str:
    return suspended(make_vm, str(tmp_path / "s"), "hashchain", "", ready=b"H0 2 ")


def one_line(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_huge_sparse_state_file_is_one_line(make_vm, tmp_path, rundir):
    base = snapshot(make_vm, tmp_path)
    kern = current_files(base).state
    huge = 200 << 30
    os.truncate(kern, huge)  # sparse: costs nothing on disk
    with open(base + ".meta") as f:
        meta = json.load(f)
    meta["state"]["size"] = huge
    meta["meta_checksum"] = meta_checksum(meta)
    with open(base + ".meta", "w") as f:
        json.dump(meta, f)
    one_line(cli("pyhyve", "snapshot", "verify", base), "out of range")
    one_line(cli("pyhyve", "run", "x", "-r", base), "out of range")


def test_deeply_nested_metadata_is_one_line(make_vm, tmp_path, rundir):
    base = snapshot(make_vm, tmp_path)
    with open(base + ".meta", "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    one_line(cli("pyhyve", "snapshot", "verify", base), "nested")
    one_line(cli("pyhyve", "run", "x", "-r", base), "nested")
    one_line(cli("pyhyve", "snapshot", "info", base), "nested")


def test_info_shows_what_is_readable_and_marks_the_corrupt_section(make_vm, tmp_path):
    base = snapshot(make_vm, tmp_path)
    kern = current_files(base).state
    with open(kern, "r+b") as f:
        f.seek(os.path.getsize(kern) - 50)
        f.write(b"\xff" * 8)
    p = cli("pyhyve", "snapshot", "info", base)
    assert p.returncode == 1 and "vcpu0" in p.stdout and "CORRUPT" in p.stdout
    assert p.stdout.count("CORRUPT") == 1 and "is corrupt" in p.stderr


def test_a_closed_stdio_console_stops_reading_stdin(monkeypatch):
    """A console that ends (a failed migration attempt, a closed VM) must not go on
    taking keystrokes meant for the next one."""
    import sys
    import threading

    from pyhyve.devices.console import StdioConsole
    r, w = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(r, "rb", buffering=0))
    got: list[bytes] = []
    con = StdioConsole()
    con.start_input(got.append)
    os.write(w, b"a")
    deadline = time.monotonic() + 5
    while not got:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    con.close()
    deadline = time.monotonic() + 5
    while any(t.name == "console-stdin" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the stdin reader outlived its console"
        time.sleep(0.01)
    os.write(w, b"b")
    time.sleep(0.1)
    assert got == [b"a"]
    os.close(w)


def test_tls_wrong_certificate_is_refused_and_tls_really_encrypts(make_vm, tmp_path):
    """--tls-dir is used on both sides: a source with another certificate pair is refused,
    and with the right pair nothing on the wire is a readable frame."""
    from migrate_helpers import CuttingProxy
    from pyhyve.migration.security import make_certs
    make_certs(str(tmp_path / "a"))
    make_certs(str(tmp_path / "b"))
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    dest = Destination(tls_dir=str(tmp_path / "a"))
    stats = migrate(vm, dest, live=True, tls_dir=str(tmp_path / "b"))
    assert stats.state == "failed" and "TLS" in stats.error, stats.error
    assert vm.state == "running" and dest.vm is None
    dest.receiver.close()
    dest = Destination(tls_dir=str(tmp_path / "a"))
    tap = CuttingProxy(dest.port, 1 << 40)  # forwards everything, and keeps what it saw
    stats = migrate(vm, dest, port=tap.port, live=True, tls_dir=str(tmp_path / "a"))
    assert stats.state == "completed", stats.error
    try:
        assert tap.forwarded > 8 << 10 and not tap.saw(b"PHMG")  # no frame header in clear
        dest.console.wait_for("H0 ")
    finally:
        dest.vm.close()
