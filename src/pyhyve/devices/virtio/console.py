"""virtio-console (virtio 1.x, 5.3), one port: the guest's stream to a host UNIX socket or
file, and the socket's bytes back to the guest.

Transmit requests are written to the backend as they come, never blocking. A UNIX
socket's attached client that falls behind holds them instead, for a moment: a request
its backlog (64 KiB) cannot take whole stays in the ring until the client has read (the
console's `on_room` kicks the queue), so a reader that is briefly slow loses nothing. Not
longer than HOLD_S: Linux's hvc driver waits for each transmit with interrupts off,
spinning, so a client that stops reading would freeze the guest. A hold that runs out
marks the client stalled: from then on the socket keeps the newest 64 KiB, as with no
client attached, until the client reads again. Receive
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
import time
from collections.abc import Callable

from ..console import Console
from .queue import Chain, Memory

WAIT = -2  # handle(): no input yet; the request goes back to the ring
F_EMERG_WRITE = 1 << 2
MAX_PENDING = 64 << 10
HOLD_S = 0.05  # how long a transmit may wait for a client that is behind (see above)
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
        self.hold_s = HOLD_S
        self._held_since = 0.0   # when the transmit now waiting began to (0: none waits)
        self._stalled = False    # the client let a hold run out; cleared when it reads
        console.on_room = self._room

    def _room(self) -> None:
        self._stalled = False
        self.kick(TX)

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
                if not self._stalled and not self.con.accepts(len(data)):
                    now = time.monotonic()
                    if not self._held_since:  # a kick once the hold runs out, at the latest
                        self._held_since = now
                        timer = threading.Timer(self.hold_s + 0.01, self.kick, (TX,))
                        timer.daemon = True
                        timer.start()
                    if now - self._held_since < self.hold_s:
                        return WAIT  # the port's reader is behind: wait for it (on_room)
                    self._stalled = True
                self._held_since = 0.0
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
