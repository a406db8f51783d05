"""`pyhyve run` and `pyhyvectl` as a user meets them: flags, control socket, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest

from conftest import BIN, REPO, cli, spawn, wait_socket

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

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
    # ws=16M: a pass a tenth of a millisecond, so the replayed 64 KiB still hold the banner
    proc = spawn("pyhyve", "run", "u", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=16M",
                 "--console", f"unix:{path}", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_socket(rundir, "u")
        # connect only once the guest has printed its banner and passes (each byte out is
        # an exit; the banner alone is 34, boot a few hundred): so it reaches us as a replay
        deadline = time.monotonic() + 20
        while json.loads(cli("pyhyvectl", "--vm", "u", "--status", "--json").stdout)["exits"] < 5000:
            assert time.monotonic() < deadline, "the guest never printed"
            time.sleep(0.05)
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
        assert proc.poll() == 3  # --destroy returned once the process was gone; 3: destroyed
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
    assert proc.wait(20) == 143  # 128 + SIGTERM: a kill, not a guest power-off
    assert "SIGTERM" in proc.stderr.read()


@pytest.mark.parametrize("args,env,needle", [
    (["-m", "64M"], {"PYHYVE_KVM_DEVICE": "/nonexistent/kvm"}, "no such device"),
    (["-m", "64M", "-k", "/nonexistent.elf"], {}, "kernel /nonexistent.elf does not exist"),
    (["-m", "64M", "-k", "/etc"], {}, "kernel /etc is not a regular file"),
    (["-m", "64M", "-k", "/etc/hostname"], {}, "not a bootable kernel"),
    (["-m", "64X"], {}, "bad size '64X'"),
    (["-m", "0"], {}, "bad size '0'"),
    (["-m", "99999G"], {}, "more than this host has"),
    (["-m", "64M", "-c", "0"], {}, "cpus must be between"),
    (["-m", "64M", "-l", "com2,stdio"], {}, "bad -l"),
    (["-m", "64M", "--console", "tcp:1"], {}, "bad console"),
    (["-m", "64M", "--cpuid-clear", "warp"], {}, "unknown CPUID feature"),
    (["-m", "64M", "--initrd", "/nonexistent.img"], {}, "initrd /nonexistent.img does not exist"),
    (["-m", "64M", "-k", "/dev/zero"], {}, "kernel /dev/zero is not a regular file"),
    (["-m", "64M"], {"PYHYVE_RUNDIR": "/etc/passwd"}, "cannot create run directory"),
    (["-m", "64M"], {"PYHYVE_RUNDIR": "/tmp/" + "d" * 120}, "longer than the 107 bytes"),
], ids=["no-kvm", "missing", "directory", "not-bootable", "bad-size", "zero-size",
        "too-much-memory", "cpus", "bad-lpc", "bad-console", "bad-cpuid", "no-initrd",
        "dev-zero-kernel", "rundir-is-a-file", "rundir-too-long"])
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
        # and every time: a pipe whose reader is already gone (`| head -c0` only sometimes is)
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run([os.path.join(BIN, "pyhyvectl"), "--vm", "pipe", "--status"],
                               stdout=w, stderr=subprocess.PIPE, text=True, timeout=30)
        finally:
            os.close(w)
        assert p.returncode == -signal.SIGPIPE and p.stderr == "", (p.returncode, p.stderr)
    finally:
        cli("pyhyvectl", "--vm", "pipe", "--destroy")
        proc.wait(20)


def test_more_one_line_errors(kit, rundir, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    one_line_error(cli("pyhyve", "run", "e", "-k", fifo, timeout=20), "is not a regular file")
    one_line_error(cli("pyhyve", "run", "e", "-R", "7797", "--key-file", fifo, timeout=20),
                   "is not a regular file")
    one_line_error(cli("pyhyve", "run", "e", "-R", "7797", "--key-file", "/dev/zero"),
                   "is not a regular file")
    one_line_error(cli("pyhyvectl", "--vm", "x", "--status",
                       env={"PYHYVE_RUNDIR": "/etc/passwd"}), "not a directory")
    one_line_error(cli("pyhyvectl", "--vm", "v" * 120, "--status"), "longer than")
    one_line_error(cli("pyhyve", "snapshot"),
                   "choose a snapshot command: info FILE, verify FILE or merge FILE OUT")
    one_line_error(cli("pyhyve"), "choose a command")


def test_versions_and_help_defaults():
    for prog in ("pyhyve", "pyhyvectl"):
        p = cli(prog, "--version")
        assert p.returncode == 0 and p.stdout.strip().startswith(f"{prog} 0.")
    h = cli("pyhyve", "run", "--help").stdout
    assert "(default 512M)" in h and "com1,file:PATH" in h and "Ctrl-A x" in h
    assert "143 SIGTERM" in h


def test_migration_certs_refuse_to_overwrite(tmp_path):
    d = str(tmp_path / "certs")
    assert cli("pyhyve", "migration-certs", d).returncode == 0
    key = tmp_path / "certs" / "key.pem"
    before = key.read_text()
    one_line_error(cli("pyhyve", "migration-certs", d), "refusing to overwrite")
    assert key.read_text() == before


def test_status_is_human_and_has_no_empty_lines(kit, rundir):
    proc = spawn("pyhyve", "run", "st", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=1M",
                 "--console", "null", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "st")
        out = cli("pyhyvectl", "--vm", "st", "--status").stdout
        assert "memory: 64 MiB" in out and "\n\n" not in out
        assert all(not ln.rstrip().endswith(":") for ln in out.splitlines()), out
    finally:
        cli("pyhyvectl", "--vm", "st", "--destroy")
        proc.wait(20)


def test_a_stale_socket_after_kill_9_is_replaced(kit, rundir):
    proc = spawn("pyhyve", "run", "k9", "-m", "64M", "-k", kit["ab"], "--console", "null",
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(rundir, "k9")
    proc.kill()
    proc.wait()
    assert os.path.exists(os.path.join(rundir, "k9.sock"))  # left behind
    again = spawn("pyhyve", "run", "k9", "-m", "64M", "-k", kit["ab"], "--console", "null",
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while cli("pyhyvectl", "--vm", "k9", "--status").returncode != 0:
            assert time.monotonic() < deadline and again.poll() is None
            time.sleep(0.05)
    finally:
        cli("pyhyvectl", "--vm", "k9", "--destroy")
        again.wait(20)


def test_sigint_exit_status(kit, rundir):
    proc = spawn("pyhyve", "run", "si", "-m", "64M", "-k", kit["ab"], "--console", "null",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_socket(rundir, "si")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130 and "SIGINT" in proc.stderr.read()


SIGNAL_IN_A_LOCK = """
import os, signal, sys, threading
from pyhyve.cli.main import serve
from pyhyve.vm import VirtualMachine, VmConfig

class SignalledInside:
    # the VM's state lock, with a SIGINT to ourselves while start() holds it
    def __init__(self, lock):
        self.lock, self.fired = lock, False
    def __enter__(self):
        self.lock.acquire()
        if not self.fired and threading.current_thread() is threading.main_thread():
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs before __exit__
    def __exit__(self, *exc):
        self.lock.release()

vm = VirtualMachine.create(VmConfig("sl", 64 << 20, 1, kernel=sys.argv[1]))
vm._state_lock = SignalledInside(vm._state_lock)
sys.exit(serve(vm))
"""


def test_a_signal_that_lands_inside_a_lock_of_the_stop_path_still_stops(kit, rundir):
    """SIGINT while the main thread holds the lock that stopping takes (start() setting
    "running"): the handler must not stop the VM itself, or the process deadlocks."""
    proc = subprocess.run([os.path.join(BIN, "python"), "-c", SIGNAL_IN_A_LOCK, kit["ab"]],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYHYVE_RUNDIR": rundir})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "stopped by signal SIGINT" in proc.stderr


def test_a_waiting_destination_killed_says_so(rundir, tmp_path):
    (tmp_path / "key").write_text("k" * 32)
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    proc = spawn("pyhyve", "run", "d", "-R", f"127.0.0.1:{port}", "--key-file", str(tmp_path / "key"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert "waiting for a migration" in proc.stderr.readline()
    proc.terminate()
    assert proc.wait(20) == 143
    assert "stopped by signal SIGTERM while waiting for a migration" in proc.stderr.read()


@pytest.mark.parametrize("spec,shown", [("[::]:{port}", "[::]:{port}"),
                                        ("127.0.0.1", "127.0.0.1:7797 (the default port)")])
def test_destination_addresses(rundir, tmp_path, spec, shown):
    (tmp_path / "key").write_text("k" * 32)
    with socket.create_server(("::", 0), family=socket.AF_INET6) as s:
        port = s.getsockname()[1]
    proc = spawn("pyhyve", "run", "d", "-R", spec.format(port=port), "--key-file",
                 str(tmp_path / "key"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 text=True)
    try:
        line = proc.stderr.readline()
        assert f"waiting for a migration on {shown.format(port=port)}" in line, line
    finally:
        proc.terminate()
        proc.wait(20)


def test_demo_runs_and_writes_no_escape_codes_into_a_pipe():
    p = subprocess.run([os.path.join(REPO, "scripts", "demo")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\x1b[" not in p.stdout and "A-B invariant holds on the destination" in p.stdout


def test_stdin_reaches_the_guest_through_the_console(kit, rundir):
    """README: the console's default is guest output on stdout and stdin to the guest."""
    p = cli("pyhyve", "run", "echo", "-m", "16M", "-k", kit["echo"], input="hi\nq", timeout=20)
    assert p.returncode == 0, p.stderr
    assert "echo ready" in p.stdout and "<68><69><0a>" in p.stdout and "bye" in p.stdout, p.stdout


@pytest.mark.parametrize("where", ["env", "file"])
def test_migration_key_needs_16_bytes_from_the_environment_or_a_file(tmp_path, rundir, where):
    """README: PYHYVE_MIGRATION_KEY, or --key-file on both sides (>= 16 bytes)."""
    def listen(key: str) -> subprocess.CompletedProcess:
        (tmp_path / "key").write_text(key)
        args = ("--key-file", str(tmp_path / "key")) if where == "file" else ()
        env = {"PYHYVE_MIGRATION_KEY": key} if where == "env" else {}
        with socket.create_server(("127.0.0.1", 0)) as s:
            port = s.getsockname()[1]
        # a destination with a good key waits; --receive-timeout ends the wait at once
        return cli("pyhyve", "run", "d", "-R", f"127.0.0.1:{port}", "--receive-timeout", "0.2",
                   *args, env=env, timeout=30)
    one_line_error(listen("k" * 15), "at least 16 bytes")
    p = listen("k" * 16)
    assert "at least 16 bytes" not in p.stderr and "no migration arrived" in p.stderr, p.stderr
