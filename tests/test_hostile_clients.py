"""Anyone who can reach the destination's port or the control socket: dropped, bounded,
never able to stop the VM or the destination from doing their work."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time

import pytest

from migrate_helpers import KEY, Destination, migrate, slow_cli_migration
from pyhyve.control.client import ControlClient
from pyhyve.control.session import Session
from pyhyve.migration import listen
from pyhyve.migration import protocol as P
from pyhyve.migration.dest import ReceiveError, ReceiveOptions, Receiver
from pyhyve.migration.protocol import T
from pyhyve.migration.source import Migration, Options

from conftest import BIN, cli, spawn, wait_socket

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

MB = 1 << 20


def frame(ftype: int, payload: bytes) -> bytes:
    return P.HEADER.pack(P.MAGIC, ftype, 0, len(payload)) + payload


def read_challenge(s: socket.socket) -> None:
    """The destination's whole CHALLENGE frame (header and payload may come apart)."""
    buf = b""
    while len(buf) < P.HEADER.size:
        buf += s.recv(P.HEADER.size - len(buf))
    length = P.HEADER.unpack(buf[:P.HEADER.size])[3]
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))


def wait_failures(dest: Destination, n: int, timeout: float = 20) -> list[str]:
    rx = dest.receiver
    with rx.listener.cond:
        assert rx.listener.cond.wait_for(lambda: len(rx.failures) >= n, timeout), rx.failures
    return list(rx.failures)


def migrates_fine_after(make_vm, dest: Destination) -> None:
    """The destination still takes a real migration, and the guest runs there."""
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    stats = migrate(vm, dest, live=True)
    assert stats.state == "completed", stats.error
    dest.console.wait_for("H0 ")
    dest.vm.close()


# --- the destination, before authentication ---------------------------------------------

def test_connect_and_close_does_not_end_the_destination(make_vm):
    dest = Destination()
    for _ in range(5):
        socket.create_connection(("127.0.0.1", dest.port)).close()
    wait_failures(dest, 5)
    assert dest.thread.is_alive()
    migrates_fine_after(make_vm, dest)


def test_silent_peers_are_dropped_and_do_not_block_the_source(make_vm, monkeypatch):
    monkeypatch.setattr(listen, "HANDSHAKE_TIMEOUT", 1.0)
    dest = Destination()
    silent = [socket.create_connection(("127.0.0.1", dest.port)) for _ in range(3)]
    t0 = time.monotonic()
    migrates_fine_after(make_vm, dest)  # while the silent ones are still connected
    assert time.monotonic() - t0 < 10
    for s in silent:
        s.close()


def test_trickling_peer_is_dropped_at_the_handshake_deadline(monkeypatch):
    """The deadline is for the whole handshake: a byte now and then does not extend it."""
    monkeypatch.setattr(listen, "HANDSHAKE_TIMEOUT", 1.0)
    dest = Destination()
    s = socket.create_connection(("127.0.0.1", dest.port))
    s.settimeout(10)
    read_challenge(s)
    t0 = time.monotonic()
    msg = frame(T.AUTH, b'{"nonce": "' + b"0" * 64 + b'", "proof": "' + b"1" * 64 + b'"}')
    for b in msg[:-1]:
        try:
            s.sendall(bytes([b]))
        except OSError:
            break
        time.sleep(0.2)
        if time.monotonic() - t0 > 5:
            break
    assert time.monotonic() - t0 < 4, "a trickle kept the handshake alive"
    assert "did not authenticate within 1 s" in wait_failures(dest, 1)[0]
    dest.receiver.close()
    s.close()


def test_silent_peer_is_dropped_after_the_handshake_deadline(monkeypatch):
    monkeypatch.setattr(listen, "HANDSHAKE_TIMEOUT", 0.5)
    dest = Destination()
    s = socket.create_connection(("127.0.0.1", dest.port))
    s.settimeout(10)
    read_challenge(s)
    t0 = time.monotonic()
    rest = s.recv(4096)
    took = time.monotonic() - t0
    fails = wait_failures(dest, 1)
    assert rest == b"" and took < 5, (rest, took, fails)  # nothing but a hang-up
    assert "did not authenticate within 0.5 s" in fails[0], fails
    dest.receiver.close()
    s.close()


def test_deeply_nested_json_before_authentication(make_vm):
    dest = Destination()
    s = socket.create_connection(("127.0.0.1", dest.port))
    s.settimeout(10)
    read_challenge(s)
    s.sendall(frame(T.AUTH, b"[" * 2000 + b"]" * 2000))
    assert "nested" in wait_failures(dest, 1)[0]
    s.close()
    migrates_fine_after(make_vm, dest)


def test_too_many_handshakes_at_once_are_turned_away(make_vm, monkeypatch):
    monkeypatch.setattr(listen, "HANDSHAKE_TIMEOUT", 1.0)
    dest = Destination()
    crowd = [socket.create_connection(("127.0.0.1", dest.port)) for _ in range(listen.MAX_HANDSHAKES + 8)]
    fails = wait_failures(dest, 8)
    assert sum("too many connections authenticating" in f for f in fails) >= 1
    for s in crowd:
        s.close()
    listener = dest.receiver.listener  # the crowd's slots come free (a loaded host is slow
    deadline = time.monotonic() + 20   # to notice the closes): then a real source gets in
    while listener._handshaking:
        assert time.monotonic() < deadline, "the crowd's handshake slots never came free"
        time.sleep(0.02)
    migrates_fine_after(make_vm, dest)


def test_destination_gives_up_at_its_deadline():
    rx = Receiver("d", "127.0.0.1", 0, KEY, ReceiveOptions(console="null", receive_timeout=0.5))
    t0 = time.monotonic()
    with pytest.raises(ReceiveError, match="no migration arrived within"):
        rx.receive()
    assert time.monotonic() - t0 < 5


def test_cli_destination_survives_a_port_scan_then_receives(kit, tmp_path, rundir, monkeypatch):
    monkeypatch.setenv("PYHYVE_MIGRATION_KEY", "k" * 32)
    log = tmp_path / "dst.log"
    port = _free_port()
    dst = spawn("pyhyve", "run", "dst", "-R", str(port), "--console", f"file:{log}",
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = dst.stderr.readline()
    assert "every address" in line, line
    _wait_port(port)
    for _ in range(10):
        socket.create_connection(("127.0.0.1", port)).close()
    src = spawn("pyhyve", "run", "src", "-m", "32M", "-k", kit["hashchain"], "--console", "null",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "src")
        p = cli("pyhyvectl", "--vm", "src", "--migrate", f"[::1]:{port}")
        assert p.returncode == 0 and "completed" in p.stdout, p.stderr
        wait_socket(rundir, "dst")
        assert cli("pyhyvectl", "--vm", "dst", "--destroy").returncode == 0
        assert dst.wait(20) == 3
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
                p.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the destination never listened"
            time.sleep(0.05)


# --- the source, against a stalled destination --------------------------------------------

def test_warm_migration_to_a_stalled_destination_frees_the_guest(make_vm):
    vm, con = make_vm("ab", "ws=32M", memory=128 * MB)
    con.wait_count(b"B", 2)
    srv = socket.create_server(("127.0.0.1", 0))

    def stall() -> None:  # authenticates, accepts, then never reads again
        from pyhyve.migration.protocol import Channel
        from pyhyve.migration.security import accept_peer
        c, _ = srv.accept()
        ch = Channel(c, b"D", b"S")
        accept_peer(ch, KEY, False)
        ch.recv(T.HELLO)
        ch.send_json(T.ACCEPT, {})
        time.sleep(30)
        c.close()
    threading.Thread(target=stall, daemon=True).start()
    t0 = time.monotonic()
    stats = Migration(vm, "127.0.0.1", srv.getsockname()[1], KEY,
                      Options(live=False, compress="none", paused_io_timeout=1.0)).run()
    assert stats.state == "failed" and "timed out" in stats.error
    assert time.monotonic() - t0 < 10 and vm.state == "running"
    n = con.buf.count(b"B")
    con.wait_count(b"B", n + 2)
    srv.close()


def test_migration_setup_never_asks_a_running_vcpu(make_vm, monkeypatch):
    """KVM_GET_TSC_KHZ on a vCPU inside KVM_RUN waits for its next exit (seconds for a busy
    guest): the TSC rate is read once, before the vCPUs run."""
    from pyhyve.kvm.api import Vcpu
    from pyhyve.pipeline.record import host_facts
    vm, con = make_vm("ab", "ws=8M", memory=64 * MB)
    con.wait_count(b"B", 1)

    def forbidden(self):
        raise AssertionError("KVM_GET_TSC_KHZ issued on a running vCPU")
    monkeypatch.setattr(Vcpu, "get_tsc_khz", forbidden)
    assert host_facts(vm)["tsc_khz"] == vm.tsc_khz > 0


# --- the control socket -------------------------------------------------------------------

@pytest.fixture
def served(make_vm, rundir):
    vm, _con = make_vm("ab", "ws=4M", memory=32 * MB)
    s = Session(vm)
    s.listen()
    yield vm, os.path.join(rundir, f"{vm.config.name}.sock")
    s.close()


def raw(path: str, data: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(path)
        c.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = c.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


@pytest.mark.parametrize("payload,needle", [
    (b'{"cmd": "status", "x": ' + b"9" * 5000 + b"}\n", "not acceptable JSON"),
    (b"[" * 100000 + b"]" * 100000 + b"\n", "too long"),
    (b'{"cmd": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "nested"),
    (b"\xff\xfe\n", "JSON"),
])
def test_bad_control_requests_get_an_error_reply(served, payload, needle):
    vm, path = served
    reply = raw(path, payload)
    assert reply["ok"] is False and needle in reply["error"], reply
    with ControlClient(vm.config.name) as c:
        assert c.call("status")["state"] == "running"


def test_idle_control_clients_are_timed_out(served, monkeypatch):
    from pyhyve.control import server
    monkeypatch.setattr(server, "IDLE_TIMEOUT", 0.5)
    _, path = served
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(path)
        t0 = time.monotonic()
        assert c.recv(10) == b""  # hung up on
        assert time.monotonic() - t0 < 5


def test_sixty_concurrent_status_calls(kit, rundir):
    proc = spawn("pyhyve", "run", "busy", "-m", "32M", "-k", kit["ab"], "--cmdline", "ws=1M",
                 "--console", "null", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_socket(rundir, "busy")
        ctl = os.path.join(BIN, "pyhyvectl")
        procs = [subprocess.Popen([ctl, "--vm", "busy", "--status"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(60)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [e for _, e in outs if e][:3]
        assert all("state: running" in o for o, _ in outs)
    finally:
        cli("pyhyvectl", "--vm", "busy", "--destroy")
        _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err


def test_control_survives_running_out_of_descriptors(kit, rundir):
    proc = spawn("pyhyve", "run", "fds", "-m", "32M", "-k", kit["ab"], "--cmdline", "ws=1M",
                 "--console", "null", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    idle: list[socket.socket] = []
    try:
        wait_socket(rundir, "fds")
        time.sleep(0.3)  # let start-up finish opening what it needs
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (64, hard))
        path = os.path.join(rundir, "fds.sock")
        for _ in range(100):  # far past the limit: the VMM cannot accept them all
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            try:
                s.connect(path)
            except OSError:
                s.close()
                break
            idle.append(s)
        time.sleep(0.5)
        for s in idle:
            s.close()
        idle.clear()
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
        deadline = time.monotonic() + 20
        while True:  # control comes back once the idle clients are gone
            st = cli("pyhyvectl", "--vm", "fds", "--status")
            if st.returncode == 0:
                break
            assert time.monotonic() < deadline, st.stderr
            time.sleep(0.2)
        assert "state: running" in st.stdout
    finally:
        for s in idle:
            s.close()
        cli("pyhyvectl", "--vm", "fds", "--destroy")
        _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err


def test_closing_the_receiver_ends_handshakes_in_progress(monkeypatch):
    monkeypatch.setattr(listen, "HANDSHAKE_TIMEOUT", 30.0)
    dest = Destination()
    silent = [socket.create_connection(("127.0.0.1", dest.port)) for _ in range(3)]
    lst = dest.receiver.listener
    deadline = time.monotonic() + 10
    while len(lst._in_handshake) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    dest.receiver.close()
    deadline = time.monotonic() + 5
    while lst._in_handshake:  # their threads ended at once, not at the 30 s deadline
        assert time.monotonic() < deadline, len(lst._in_handshake)
        time.sleep(0.02)
    for s in silent:
        s.close()


def test_trickling_control_client_is_dropped(served, monkeypatch):
    from pyhyve.control import server
    monkeypatch.setattr(server, "IDLE_TIMEOUT", 1.0)
    _, path = served
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(path)
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            for b in b'{"cmd": "status", "padding": "' + b"x" * 100:
                c.sendall(bytes([b]))
                time.sleep(0.2)
                if time.monotonic() - t0 > 5:
                    break
        assert time.monotonic() - t0 < 4, "a trickle kept the control connection"


def test_a_held_guest_is_migrated_running_not_paused(make_vm):
    """Only the user's pause travels: a guest merely held (by a save, the lease guard) is
    migrated warm and runs over there."""
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 3 ")
    dest = Destination()
    with vm.paused():
        assert not vm.user_paused
        stats = migrate(vm, dest, live=True)
    assert stats.state == "completed", stats.error
    try:
        assert dest.vm.state == "running"
        dest.console.wait_for("H0 ")
    finally:
        dest.vm.close()


def test_ctrl_c_on_pyhyvectl_cancels_the_migration(kit, rundir, monkeypatch):
    from pyhyve.migration.security import load_key
    monkeypatch.setenv("PYHYVE_MIGRATION_KEY", "k" * 32)
    dest = Destination(key=load_key(None))
    with slow_cli_migration(kit, rundir, "cc", dest) as mig:
        mig.send_signal(signal.SIGINT)
        _, err = mig.communicate(timeout=30)
        assert mig.returncode == 130 and "Traceback" not in err
        assert "migration cancelled" in err and err.count("\n") == 1, err
        deadline = time.monotonic() + 20
        while "state: running" not in cli("pyhyvectl", "--vm", "cc", "--status").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
