"""virtio-console's output to a UNIX socket whose client falls behind: the device holds
the guest's requests (WAIT, back into the ring) instead of letting the socket's backlog
drop the oldest output, and takes them again once the client has read; a client that
stays behind past the hold (Linux spins while it waits) is treated as stalled. No KVM:
the device's handle() is driven directly, as the transport drives it."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pyhyve.devices.console import UnixConsole
from pyhyve.devices.virtio.console import TX, WAIT, VConsole


class Tx:
    """A transmit request as handle() sees it: only read() is used."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, _mem: object) -> bytes:
        return self.data


def line(i: int) -> bytes:
    return b"line %06d " % i + b"x" * 1000 + b"\n"


def send(dev: VConsole, i: int) -> int:
    return dev.handle(TX, Tx(line(i)), None)  # type: ignore[arg-type]


@pytest.fixture
def port(tmp_path):
    con = UnixConsole(str(tmp_path / "port.sock"))
    dev = VConsole(con)
    dev.hold_s = 30.0  # these tests are about holding, not about its limit
    kicks = threading.Semaphore(0)
    dev.kick = lambda queue: kicks.release() if queue == TX else None
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "port.sock"))
    assert kicks.acquire(timeout=5)  # the client's arrival (room: the backlog went out)
    yield dev, con, client, kicks
    client.close()
    dev.close()


def fill(dev: VConsole) -> int:
    """Transmit lines until the device holds one; returns how many it took."""
    sent = 0
    while send(dev, sent) == 0:
        sent += 1
        assert sent < 10_000, "the device never held a request"
    return sent


def test_a_client_that_stops_reading_holds_the_guests_output_instead_of_losing_it(port):
    dev, con, client, kicks = port
    sent = fill(dev)
    # the socket and the backlog are full; nothing was dropped to make room
    assert sent * len(line(0)) > con.BACKLOG
    assert len(con.unsent()) <= con.BACKLOG
    held = sent
    client.settimeout(10)
    got = client.recv(1 << 20)  # the client reads again: the device is told
    assert kicks.acquire(timeout=5), "no kick when the client read"
    while send(dev, sent) == WAIT:
        got += client.recv(1 << 20)
        assert kicks.acquire(timeout=5), "no kick while the client reads"
    assert sent == held  # the held request went out as itself, once
    sent += 1
    want = b"".join(line(i) for i in range(sent))
    while len(got) < len(want):
        got += client.recv(1 << 20)
    assert got == want  # every line, in order, none twice


def test_a_client_that_goes_away_releases_a_held_request(port):
    dev, con, client, kicks = port
    sent = fill(dev)
    client.close()  # without reading: the held request must not wait forever
    assert kicks.acquire(timeout=5), "no kick when the client went"
    assert send(dev, sent) == 0
    # with nobody attached the socket keeps the newest output for the next client
    assert con.unsent().endswith(line(sent))


def test_a_client_that_only_closed_its_sending_side_still_gets_output(port):
    dev, _con, client, kicks = port
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.2)  # the console's pump sees the end of the client's input
    sent = fill(dev)
    client.settimeout(10)
    got = client.recv(1 << 20)
    assert kicks.acquire(timeout=5)
    while send(dev, sent) == WAIT:
        got += client.recv(1 << 20)
        assert kicks.acquire(timeout=5)
    sent += 1
    want = b"".join(line(i) for i in range(sent))
    while len(got) < len(want):
        got += client.recv(1 << 20)
    assert got == want


def test_a_client_behind_for_longer_than_the_hold_no_longer_holds_the_guest(port):
    dev, con, client, kicks = port
    dev.hold_s = 0.05  # the real limit: Linux spins with interrupts off while it waits
    sent = fill(dev)
    assert kicks.acquire(timeout=5), "no kick when the hold ran out"
    assert time.monotonic() - dev._held_since >= 0.05
    for i in range(sent, sent + 100):  # stalled: taken at once, the newest output kept
        assert send(dev, i) == 0
    assert con.unsent().endswith(line(sent + 99)) and len(con.unsent()) <= con.BACKLOG
    client.settimeout(10)
    client.recv(1 << 20)  # it reads again: holding resumes
    assert kicks.acquire(timeout=5)
    fill(dev)  # (returns only once the device held a request again)
