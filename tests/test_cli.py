"""`pyhyve run` and `pyhyvectl` as a user meets them: flags, control socket, errors."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time

import pytest

from conftest import BIN, cli, spawn, wait_socket

FOREIGN_PVH = r"""
/* A PVH guest that is not part of the kit: 32-bit, prints at entry, then resets. */
    .section .note.Xen, "a"
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .p2align 2
    .long _start
    .text
    .code32
    .globl _start
_start:
    movl $msg, %esi
    movw $0x3f8, %dx
1:  movb (%esi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incl %esi
    jmp 1b
2:  movb $0xfe, %al
    outb %al, $0x64
3:  jmp 3b
    .data
msg: .asciz "hello from a foreign PVH guest\n"
"""


@pytest.fixture
def foreign_elf(tmp_path):
    (tmp_path / "f.S").write_text(FOREIGN_PVH)
    subprocess.run(["as", "--32", "-o", str(tmp_path / "f.o"), str(tmp_path / "f.S")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext-segment=0x100000", "-o", str(tmp_path / "f.elf"),
                    str(tmp_path / "f.o")], check=True)
    return str(tmp_path / "f.elf")


def one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode != 0, p
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0], lines[0]


def test_foreign_pvh_elf_prints_on_stdout(foreign_elf, rundir):
    p = cli("pyhyve", "run", "foreign", "-m", "32M", "-c", "1", "-k", foreign_elf)
    assert p.returncode == 0, p.stderr
    assert "hello from a foreign PVH guest" in p.stdout


def test_kit_guest_with_long_flags_and_cmdline(kit, rundir):
    p = cli("pyhyve", "run", "hc", "--memory", "64M", "--cpus", "2", "--kernel",
            kit["hashchain"], "--cmdline", "cpus=2 steps=5", "--console", "stdio")
    assert p.returncode == 0, p.stderr
    from pyhyve.guestkit import check_hashchain
    assert check_hashchain(p.stdout) == {0: 5, 1: 5}


def test_console_to_file_with_bhyve_alias(kit, rundir, tmp_path):
    out = tmp_path / "console.log"
    p = cli("pyhyve", "run", "f", "-m", "64M", "-k", kit["hashchain"], "--cmdline", "steps=3",
            "-l", f"com1,file:{out}")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert "hashchain done" in out.read_text()


def test_console_on_unix_socket(kit, rundir, tmp_path):
    path = str(tmp_path / "con.sock")
    proc = spawn("pyhyve", "run", "u", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=1M",
                 "--console", f"unix:{path}", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_socket(rundir, "u")
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.settimeout(10)
        data = b""
        while b"BB" not in data:
            data += s.recv(4096)
        assert b"A-B start" in data  # output from before we connected is replayed
        s.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_control_socket_status_pause_resume_destroy(kit, rundir):
    proc = spawn("pyhyve", "run", "ctl", "-m", "128M", "-k", kit["ab"], "--cmdline", "ws=8M",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_socket(rundir, "ctl")
        sock = os.path.join(rundir, "ctl.sock")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        st = cli("pyhyvectl", "--vm", "ctl", "--status")
        assert st.returncode == 0 and "state: running" in st.stdout
        assert cli("pyhyvectl", "--vm", "ctl", "--pause").stdout.strip() == "ctl: paused"
        st = cli("pyhyvectl", "--vm", "ctl", "--status", "--json")
        assert '"state": "paused"' in st.stdout
        again = cli("pyhyvectl", "--vm", "ctl", "--pause")  # idempotent, as QEMU's `stop`
        assert again.returncode == 0 and again.stdout.strip() == "ctl: paused"
        assert cli("pyhyvectl", "--vm", "ctl", "--resume").stdout.strip() == "ctl: running"
        dup = cli("pyhyve", "run", "ctl", "-m", "64M", "-k", kit["ab"])
        one_line_error(dup, "already running")
        assert cli("pyhyvectl", "--vm", "ctl", "--destroy").returncode == 0
        assert proc.wait(20) == 0
        assert "destroyed" in proc.stderr.read()
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_stops_cleanly(kit, rundir):
    proc = spawn("pyhyve", "run", "sig", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=1M",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_socket(rundir, "sig")
    time.sleep(0.2)
    proc.terminate()
    assert proc.wait(20) == 0
    assert "SIGTERM" in proc.stderr.read()


@pytest.mark.parametrize("args,env,needle", [
    (["-m", "64M"], {"PYHYVE_KVM_DEVICE": "/nonexistent/kvm"}, "no such device"),
    (["-m", "64M", "-k", "/nonexistent.elf"], {}, "cannot read kernel /nonexistent.elf"),
    (["-m", "64M", "-k", "/etc"], {}, "cannot read kernel /etc"),
    (["-m", "64M", "-k", "/etc/hostname"], {}, "not a bootable kernel"),
    (["-m", "64X"], {}, "bad size '64X'"),
    (["-m", "0"], {}, "bad size '0'"),
    (["-m", "99999G"], {}, "more than this host has"),
    (["-m", "64M", "-c", "0"], {}, "cpus must be between"),
    (["-m", "64M", "-l", "com2,stdio"], {}, "bad -l"),
    (["-m", "64M", "--console", "tcp:1"], {}, "bad console"),
    (["-m", "64M", "--cpuid-clear", "warp"], {}, "unknown CPUID feature"),
    (["-m", "64M", "--initrd", "/nonexistent.img"], {}, "cannot read initrd"),
], ids=["no-kvm", "missing", "directory", "not-bootable", "bad-size", "zero-size",
        "too-much-memory", "cpus", "bad-lpc", "bad-console", "bad-cpuid", "no-initrd"])
def test_errors_are_one_clear_line(kit, rundir, args, env, needle):
    if "-k" not in args:
        args = [*args, "-k", kit["ab"]]
    one_line_error(cli("pyhyve", "run", "e", *args, env=env), needle)


def test_usage_errors(rundir):
    one_line_error(cli("pyhyve", "run"), "required")
    one_line_error(cli("pyhyvectl", "--vm", "nope", "--status"), "no running VM named 'nope'")
    one_line_error(cli("pyhyvectl", "--vm", "x"), "required")


def test_output_into_a_closed_pipe_is_quiet(kit, rundir):
    proc = spawn("pyhyve", "run", "pipe", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=1M",
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "pipe")
        p = subprocess.run(f"{os.path.join(BIN, 'pyhyvectl')} --vm pipe --status | head -1",
                           shell=True, capture_output=True, text=True, timeout=30)
        assert p.stdout.startswith("name: pipe") and "Traceback" not in p.stderr
    finally:
        cli("pyhyvectl", "--vm", "pipe", "--destroy")
        proc.wait(20)
