"""Prefetch for a lazily restored guest: pull the snapshot's data pages in on a background
thread while the guest runs, so it does not pay a fault-and-read per page at first touch.

The pages come in run order (the recorded run table), in 2 MiB steps, through madvise
(MADV_POPULATE_*), which drops the GIL and never changes a byte the guest sees: a page the
guest already wrote is left alone. It stops when the VM closes or its memory is detached.
"""

from __future__ import annotations

import threading

from ..machine.memory import PAGE, GuestMemory
from ..pipeline.pages import Runs

STEP = 2 << 20


class Prefetcher:
    def __init__(self, memory: GuestMemory, runs: Runs, write: bool) -> None:
        self.memory, self.runs, self.write = memory, runs, write
        self.done_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        for page, count in self.runs:
            for off, n in self.memory.pieces(page * PAGE, (page + count) * PAGE, STEP):
                if self._stop.is_set():
                    return
                self.memory.populate(off, n, self.write)
                self.done_bytes += n

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
