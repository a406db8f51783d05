"""A short soak of everything reachable before authentication: a few hundred concurrent,
idle and garbage clients on the control socket, and a few hundred unauthenticated peers
on a destination's port, bounded in count and time. The guest keeps running throughout,
control answers once the crowd is gone, and the destination still takes the real
migration."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time

import pytest

from migrate_helpers import Destination, migrate
from pyhyve.migration import protocol as P
from pyhyve.migration.protocol import T

from conftest import cli, spawn, wait_file, wait_socket

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

MB = 1 << 20
SOAK_S = 6.0


def count_b(path) -> int:
    return path.read_bytes().count(b"B")


def test_control_socket_soak(kit, rundir, tmp_path):
    log = tmp_path / "c.log"
    vmm = spawn("pyhyve", "run", "soak", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=4M",
                "--console", f"file:{log}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True)
    path = os.path.join(rundir, "soak.sock")
    idle: list[socket.socket] = []
    try:
        wait_socket(rundir, "soak")
        wait_file(log, "BB")
        rnd = random.Random(7)
        stop = time.monotonic() + SOAK_S
        errors: list[str] = []

        def hammer() -> None:
            while time.monotonic() < stop:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                try:
                    s.connect(path)
                    kind = rnd.randrange(4)
                    if kind == 0:
                        s.sendall(b'{"cmd":"status"}\n')
                        s.recv(65536)
                    elif kind == 1:
                        s.sendall(rnd.randbytes(rnd.randrange(1, 4096)) + b"\n")
                        s.recv(65536)
                    elif kind == 2:
                        s.sendall(b"[" * 3000 + b"\n")
                        s.recv(65536)
                    # kind 3: connect and hang up
                except OSError as e:
                    errors.append(type(e).__name__)
                finally:
                    s.close()

        for _ in range(150):  # idle clients holding connections open
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(path)
                idle.append(s)
            except OSError:
                s.close()
        before = count_b(log)
        threads = [threading.Thread(target=hammer) for _ in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SOAK_S + 30)
        assert count_b(log) > before + 10  # the guest ran on throughout
        for s in idle:
            s.close()
        idle.clear()
        st = cli("pyhyvectl", "--vm", "soak", "--status")
        assert st.returncode == 0 and "state: running" in st.stdout, st.stderr
        assert vmm.poll() is None
    finally:
        for s in idle:
            s.close()
        cli("pyhyvectl", "--vm", "soak", "--destroy")
        _, err = vmm.communicate(timeout=30)
    assert "Traceback" not in err and "Exception" not in err, err[-2000:]


def frame(ftype: int, payload: bytes) -> bytes:
    return P.HEADER.pack(P.MAGIC, ftype, 0, len(payload)) + payload


def test_destination_port_soak(make_vm):
    dest = Destination()
    rnd = random.Random(11)
    stop = time.monotonic() + SOAK_S
    held: list[socket.socket] = []
    lock = threading.Lock()

    def peer() -> None:
        while time.monotonic() < stop:
            try:
                s = socket.create_connection(("127.0.0.1", dest.port), timeout=5)
            except OSError:
                continue
            kind = rnd.randrange(5)
            try:
                if kind == 0:
                    s.close()
                elif kind == 1:  # silent: holds a handshake slot until the deadline
                    with lock:
                        held.append(s)
                    continue
                elif kind == 2:
                    s.sendall(rnd.randbytes(rnd.randrange(1, 2048)))
                elif kind == 3:
                    s.recv(4096)
                    s.sendall(frame(T.AUTH, b"[" * 2000 + b"]" * 2000))
                else:
                    s.recv(4096)
                    s.sendall(frame(T.AUTH, b'{"nonce": "00", "proof": "11"}'))
                s.close()
            except OSError:
                s.close()

    threads = [threading.Thread(target=peer) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SOAK_S + 30)
    assert len(dest.receiver.failures) >= 50 and dest.thread.is_alive()
    for s in held:
        s.close()
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    stats = migrate(vm, dest, live=True)  # the real source still gets through
    assert stats.state == "completed", stats.error
    dest.console.wait_for("H0 ")
    dest.vm.close()
