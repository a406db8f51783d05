"""virtio-vsock half-closes, both ways, as a TCP socket has them: a guest that stops
sending still receives, a host program that stops sending still receives, and the stream
ends when both directions have. No KVM: the device is driven as its guest would."""

from __future__ import annotations

import socket
import time

import pytest

from pyhyve.devices.virtio.vsock import (
    HDR,
    OP_CREDIT_UPDATE,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Vsock,
)
from test_virtio import FakeGuest

GPORT = 7


def take(v: Vsock, timeout: float = 10.0) -> tuple[int, int, bytes]:
    """The next packet for the guest but credit updates: (op, flags, data)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with v._lock:
            if v.queued:
                pkt = v.queued.popleft()
                f = HDR.unpack_from(pkt)
                if f[6] != OP_CREDIT_UPDATE:
                    return f[6], f[7], pkt[HDR.size:]
                continue
        time.sleep(0.005)
    raise AssertionError("nothing for the guest")


def recv_all(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(65536)
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return got


@pytest.fixture
def stream(tmp_path):
    """A host program's stream to guest port 7, accepted by the guest."""
    v = Vsock(f"cid=9,uds={tmp_path}/v.sock")
    v.start()
    g = FakeGuest(v)
    h = socket.socket(socket.AF_UNIX)
    h.settimeout(10)
    h.connect(f"{tmp_path}/v.sock")
    h.sendall(b"CONNECT 7\n")
    end = time.monotonic() + 10
    while not v.queued:
        assert time.monotonic() < end
        time.sleep(0.005)
    with v._lock:
        hport = HDR.unpack_from(v.queued.popleft())[2]
    g.send(OP_RESPONSE, GPORT, hport)
    assert recv_all(h, len(f"OK {hport}\n")) == f"OK {hport}\n".encode()
    yield v, g, h, hport
    h.close()
    v.close()


def test_a_guest_that_stops_sending_still_receives(stream):
    v, g, h, hport = stream
    last = bytes(range(256)) * 400
    g.send(OP_RW, GPORT, hport, last)
    g.send(OP_SHUTDOWN, GPORT, hport, flags=SHUTDOWN_SEND)
    got = b""
    while chunk := h.recv(65536):  # every byte, then EOF
        got += chunk
    assert got == last
    h.sendall(b"the answer")  # the other direction is still open
    op, _, data = take(v)
    assert (op, data) == (OP_RW, b"the answer")
    h.close()  # and now both directions have ended
    op, flags, _ = take(v)
    assert (op, flags) == (OP_SHUTDOWN, SHUTDOWN_BOTH)
    with v._lock:
        assert not v.conns


def test_a_host_program_that_stops_sending_still_receives(stream):
    v, g, h, hport = stream
    h.sendall(b"request")
    h.shutdown(socket.SHUT_WR)
    assert take(v)[0::2] == (OP_RW, b"request")
    op, flags, _ = take(v)
    assert (op, flags) == (OP_SHUTDOWN, SHUTDOWN_SEND)  # not the end of the stream
    with v._lock:
        assert len(v.conns) == 1
    g.send(OP_RW, GPORT, hport, b"reply")  # the guest answers on the open direction
    assert recv_all(h, 5) == b"reply"
    g.send(OP_SHUTDOWN, GPORT, hport, flags=SHUTDOWN_SEND)
    assert h.recv(100) == b""  # the program's EOF: both directions have ended
    ops = [take(v)[0]]
    assert OP_RST in ops
    with v._lock:
        assert not v.conns


def test_a_guest_that_stops_receiving_makes_the_programs_writes_fail(stream):
    v, g, h, hport = stream
    g.send(OP_SHUTDOWN, GPORT, hport, flags=SHUTDOWN_RCV)
    g.send(OP_RW, GPORT, hport, b"still talking")  # its own direction stays open
    assert recv_all(h, 13) == b"still talking"
    h.settimeout(2)  # a write that blocks (no EPIPE) would time out instead: not this
    with pytest.raises(BrokenPipeError):  # EPIPE: the guest takes nothing more
        for _ in range(100):
            h.sendall(b"x" * 65536)
    h.settimeout(10)
    g.send(OP_SHUTDOWN, GPORT, hport, flags=SHUTDOWN_SEND)  # the rest: a full close
    assert OP_RST in [take(v)[0]]
    assert h.recv(100) == b""
