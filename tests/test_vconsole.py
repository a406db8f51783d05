"""virtio-console's output to a UNIX socket whose client falls behind: the device holds
the guest's requests (WAIT, back into the ring) instead of letting the socket's backlog
drop the oldest output, and takes them again once the client has read. No KVM: the
device's handle() is driven directly, as the transport drives it."""

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


@pytest.fixture
def port(tmp_path):
    con = UnixConsole(str(tmp_path / "port.sock"))
    dev = VConsole(con)
    kicks = threading.Semaphore(0)
    dev.kick = lambda queue: kicks.release() if queue == TX else None
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "port.sock"))
    deadline = time.monotonic() + 5
    while con.client is None:  # the console's accept thread takes it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield dev, con, client, kicks
    client.close()
    dev.close()


def test_a_client_that_stops_reading_holds_the_guests_output_instead_of_losing_it(port):
    dev, con, client, kicks = port
    sent = 0
    while dev.handle(TX, Tx(line(sent)), None) == 0:  # type: ignore[arg-type]
        sent += 1
        assert sent < 10_000, "the device never held a request"
    # the socket and the backlog are full; nothing was dropped to make room
    assert sent * len(line(0)) > con.BACKLOG
    assert len(con.unsent()) <= con.BACKLOG
    held = sent
    got = b""
    client.settimeout(10)
    while len(got) < 64 << 10:  # the client reads again: the device is told at once
        got += client.recv(1 << 20)
    assert kicks.acquire(timeout=5)
    while dev.handle(TX, Tx(line(sent)), None) == WAIT:  # type: ignore[arg-type]
        assert kicks.acquire(timeout=5), "no kick while the client reads"
        got += client.recv(1 << 20)
    assert sent == held  # the held request went out as itself, once
    sent += 1
    want = b"".join(line(i) for i in range(sent))
    while len(got) < len(want):
        got += client.recv(1 << 20)
    assert got == want  # every line, in order, none twice


def test_a_client_that_goes_away_releases_a_held_request(port):
    dev, con, client, kicks = port
    sent = 0
    while dev.handle(TX, Tx(line(sent)), None) == 0:  # type: ignore[arg-type]
        sent += 1
    client.close()  # without reading: the held request must not wait forever
    assert kicks.acquire(timeout=5)
    deadline = time.monotonic() + 5
    while dev.handle(TX, Tx(line(sent)), None) == WAIT:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "still held with no client"
        kicks.acquire(timeout=1)
    # with nobody attached the socket keeps the newest output for the next client
    assert con.unsent().endswith(line(sent))


def test_a_client_that_only_closed_its_sending_side_still_gets_output(port):
    dev, _con, client, _kicks = port
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.2)  # the console's pump sees the end of the client's input
    sent = 0
    while dev.handle(TX, Tx(line(sent)), None) == 0:  # type: ignore[arg-type]
        sent += 1
    got = b""
    client.settimeout(10)
    while dev.handle(TX, Tx(line(sent)), None) == WAIT:  # type: ignore[arg-type]
        got += client.recv(1 << 20)
    sent += 1
    want = b"".join(line(i) for i in range(sent))
    while len(got) < len(want):
        got += client.recv(1 << 20)
    assert got == want
