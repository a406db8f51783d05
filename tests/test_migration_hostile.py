"""Hostile or broken peers: refused cleanly, nothing allocated without bound, no crash."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate_helpers import KEY, Destination, migrate
from pyhyve.migration import protocol as P
from pyhyve.migration.protocol import PROTOCOL_VERSION, Channel, T
from pyhyve.migration.security import authenticate

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

MB = 1 << 20


def raw_peer(dest: Destination) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", dest.port))
    s.settimeout(10)
    return s


def frame(ftype: int, payload: bytes, length: int | None = None, magic: bytes = P.MAGIC) -> bytes:
    n = len(payload) if length is None else length
    return P.HEADER.pack(magic, ftype, 0, n) + payload


def expect_refusal(dest: Destination, needle: str) -> None:
    dest.join(20)
    assert dest.vm is None
    assert dest.error is not None and needle in str(dest.error), repr(dest.error)


def authed(dest: Destination) -> Channel:
    ch = Channel(raw_peer(dest), b"S", b"D")
    authenticate(ch, KEY, False, False)
    return ch


def test_garbage_instead_of_frames():
    dest = Destination()
    s = raw_peer(dest)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
    expect_refusal(dest, "bad frame magic")
    s.close()


@pytest.mark.parametrize("data,needle", [
    (frame(T.AUTH, b'{"nonce": "00"}', length=4000), "closed the connection"),  # truncated
    (frame(T.AUTH, b"", length=1 << 62), "over its limit"),  # 4 EiB: refused, not allocated
    (frame(T.HELLO, b"{}"), "expected AUTH, got HELLO"),  # skipping authentication
], ids=["truncated", "oversized", "unauthenticated"])
def test_bad_first_frames(data, needle):
    dest = Destination()
    s = raw_peer(dest)
    s.recv(4096)  # CHALLENGE
    s.sendall(data)
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_WR)
    expect_refusal(dest, needle)
    s.close()


def test_tampered_frame_after_authentication():
    dest = Destination()
    ch = authed(dest)
    ch.key = b"z" * 32  # sign with a key the destination does not share
    ch.send_json(T.HELLO, {"protocol": 1})
    expect_refusal(dest, "frame authentication failed")
    ch.close()


def test_bad_hello_is_refused():
    dest = Destination()
    ch = authed(dest)
    ch.send_json(T.HELLO, {"protocol": PROTOCOL_VERSION, "vm": {"memory": 1 << 50, "cpus": 1}})
    reason = ch.recv(T.REFUSE).json()["reason"]
    assert "'memory' is missing or out of range" in reason
    expect_refusal(dest, "refused")
    ch.close()


def good_hello(vm) -> dict:
    from pyhyve.migration.source import Migration, Options
    return Migration(vm, "x", 1, KEY, Options())._hello()


@pytest.mark.parametrize("payload,needle", [
    (struct.pack("<QII", 1 << 40, 1, 0) + bytes(4096), "outside guest memory"),
    (struct.pack("<QII", 0, 0, 0), "outside guest memory"),
    (struct.pack("<QII", 0, 2, 0) + bytes(4096), "does not match its page count"),
    (struct.pack("<QII", 0, 1, 1) + b"not zstd", "corrupt zstd"),
    (struct.pack("<QII", 0, 1, 2) + b"\xff" * 9, "corrupt lz4"),
    (struct.pack("<QII", 0, 1, 9), "unknown MEM encoding"),
    (struct.pack("<QII", 0, 1, 3) + b"x", "ZERO MEM frame carries data"),
    (b"short", "short MEM frame"),
])
def test_hostile_memory_frames(make_vm, payload, needle):
    vm, _con = make_vm("hashchain", "", memory=32 * MB, start=False)
    dest = Destination()
    ch = authed(dest)
    ch.send_json(T.HELLO, good_hello(vm))
    ch.recv(T.ACCEPT)
    ch.send(T.MEM, payload)
    expect_refusal(dest, needle)
    ch.close()


def test_state_for_a_device_that_does_not_exist(make_vm):
    vm, _con = make_vm("hashchain", "", memory=32 * MB, start=False)
    dest = Destination()
    ch = authed(dest)
    ch.send_json(T.HELLO, good_hello(vm))
    ch.recv(T.ACCEPT)
    real = [{"name": n, "kind": k, "version": 1} for n, (k, _) in vm.device_classes().items()]
    ch.send_json(T.COMPLETE, {"devices": [*real, {"name": "evil", "kind": "x", "version": 1}]})
    expect_refusal(dest, "state section")
    ch.close()


def test_complete_without_the_vm_s_devices_is_refused(make_vm):
    vm, _con = make_vm("hashchain", "", memory=32 * MB, start=False)
    dest = Destination()
    ch = authed(dest)
    ch.send_json(T.HELLO, good_hello(vm))
    ch.recv(T.ACCEPT)
    ch.send_json(T.COMPLETE, {"devices": []})  # as if the UART and PCI had no state
    expect_refusal(dest, "device list is incomplete")
    ch.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_after_authentication(payload):
    dest = Destination()
    ch = authed(dest)
    with contextlib.suppress(OSError):  # the destination may hang up first, as it should
        ch.sock.sendall(payload)  # raw, unframed and unsigned
        ch.sock.shutdown(socket.SHUT_WR)
    dest.join(20)
    assert dest.vm is None and dest.error is not None
    ch.close()


def test_hostile_destination_leaves_source_running(make_vm):
    """A 'destination' that authenticates nothing and answers with junk."""
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    srv = socket.create_server(("127.0.0.1", 0))

    def junk() -> None:
        c, _ = srv.accept()
        c.sendall(frame(T.CHALLENGE, json.dumps({"auth": "key", "nonce": "zz"}).encode()))
        c.recv(65536)
        c.close()

    threading.Thread(target=junk, daemon=True).start()
    from pyhyve.migration.source import Migration, Options
    stats = Migration(vm, "127.0.0.1", srv.getsockname()[1], KEY, Options(io_timeout=5)).run()
    assert stats.state == "failed" and "malformed CHALLENGE" in stats.error
    assert vm.state == "running"
    srv.close()


def test_destination_that_dies_mid_stream(make_vm):
    vm, con = make_vm("ab", "ws=16M", memory=64 * MB)
    con.wait_count(b"B", 2)
    dest = Destination()
    real_memory = dest.receiver._memory
    calls = []

    def dying(*args):  # the destination crashes after a few pages
        calls.append(1)
        if len(calls) > 3:
            raise MemoryError("simulated out-of-memory on the destination")
        return real_memory(*args)

    dest.receiver._memory = dying
    stats = migrate(vm, dest, live=True, compress="lz4")
    assert stats.state == "failed"
    assert "out-of-memory" in stats.error or "connection lost" in stats.error, stats.error
    assert vm.state == "running" and dest.vm is None
    n = con.buf.count(b"B")
    con.wait_count(b"B", n + 2)
