"""virtio-console (virtio 1.x, 5.3), one port: the guest's stream to a host UNIX socket or
file, and the socket's bytes back to the guest.

Transmit requests are written to the backend as they come, never blocking. A UNIX
socket's attached client that falls behind holds them instead: a request its backlog
(64 KiB) cannot take whole stays in the ring until the client has read (the console's
`on_room` kicks the queue), so the guest waits, as on a real port, and no output is lost;
with no client attached the socket keeps the newest 64 KiB for the next one. Receive
buffers the guest offers stay in its ring until input arrives. The transport puts a
request back when `handle` returns WAIT, so no request is held across a save: the state
is the input not yet delivered, at most MAX_PENDING bytes (more is dropped and counted,
as a UART's FIFO drops), and the output the client has not taken yet.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections.abc import Callable

from ..console import Console
from .queue import Chain, Memory

WAIT = -2  # handle(): no input yet; the request goes back to the ring
F_EMERG_WRITE = 1 << 2
MAX_PENDING = 64 << 10
RX, TX = 0, 1


class VConsole:
    device_type = 3
    class_code = 0x078000
    queue_sizes: tuple[int, ...] = (256, 256)

    def __init__(self, console: Console) -> None:
        self.con = console
        self.pending = bytearray()
        self.dropped = 0
        self._lock = threading.Lock()
        self.kick: Callable[[int], None] = lambda queue: None  # set by the transport
        console.on_room = lambda: self.kick(TX)

    def features(self) -> int:
        return F_EMERG_WRITE

    def config(self) -> bytes:
        return struct.pack("<HHII", 80, 25, 1, 0)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == 8:  # emerg_wr: one character, before the queues work
            self.con.write(data[:1])

    def start(self) -> None:
        self.con.start_input(self._input)

    def _input(self, data: bytes) -> None:
        with self._lock:
            room = MAX_PENDING - len(self.pending)
            self.pending += data[:room]
            self.dropped += max(0, len(data) - room)
        self.kick(RX)

    def handle(self, queue: int, chain: Chain, mem: Memory) -> int:
        if queue == TX:
            data = chain.read(mem)
            if data:
                if not self.con.accepts(len(data)):
                    return WAIT  # the port's reader is behind: wait for it (on_room)
                self.con.write(data)
            return 0
        with self._lock:
            if not self.pending:
                return WAIT
            n = chain.write(mem, bytes(self.pending[:chain.out_room]))
            del self.pending[:n]
            return n

    def reset(self) -> None:
        with self._lock:
            self.pending.clear()

    def state(self) -> bytes:
        """Input not yet delivered, and output not yet taken by the port's client."""
        with self._lock:
            return json.dumps({"pending": base64.b64encode(bytes(self.pending)).decode(),
                               "dropped": self.dropped,
                               "unsent": base64.b64encode(self.con.unsent()).decode()}).encode()

    def load(self, raw: bytes) -> None:
        try:
            st = json.loads(raw)
            pending = base64.b64decode(st["pending"], validate=True)
            unsent = base64.b64decode(st.get("unsent", ""), validate=True)
            dropped = int(st["dropped"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError("vconsole: saved state is malformed") from None
        if len(pending) > MAX_PENDING or len(unsent) > MAX_PENDING:
            raise ValueError("vconsole: saved input or output is larger than the device keeps")
        self.pending, self.dropped = bytearray(pending), dropped
        self.con.requeue(unsent)

    def close(self) -> None:
        self.con.close()
