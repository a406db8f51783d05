"""Dirty-page tracking: one owner of KVM's dirty log, any number of independent consumers.

KVM_GET_DIRTY_LOG clears as it reads, so two readers would steal each other's bits (a
migration and an incremental snapshot, say). Only the tracker reads it: each collect ORs
what KVM reports into every consumer's own pending bitmap, and a consumer's fetch returns
(and clears) only its own. A consumer sees every page written since it was created or last
fetched, whoever else reads. Logging is switched on with the first consumer and off when the
last one stops; stopping one leaves the others untouched. Writes the VMM makes itself
(GuestMemory.write/fill: loaders, device DMA) are merged in through `mark`.

Bitmaps are bool arrays over file pages (regions in file order), the page numbers
snapshots use. KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (reported by our hosts, with
INITIALLY_SET) would let a consumer re-protect pages in chunks just before sending them;
the classic read-and-clear serves every consumer today (docs/architecture.md).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..kvm import ioctls as I
from .memory import PAGE

if TYPE_CHECKING:  # numpy is imported when first used: it costs ~80 ms of every start
    import numpy as np

    from ..kvm import Vm
    from .memory import GuestMemory


class DirtyTracker:
    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        self.vm, self.memory = vm, memory
        self.pages = memory.size // PAGE
        self._bitmaps: list[np.ndarray] = []  # KVM's, per slot, once logging starts
        self._consumers: list[DirtyConsumer] = []
        self._lock = threading.Lock()
        memory.on_write = self.mark

    @property
    def active(self) -> bool:
        return bool(self._consumers)

    def consumer(self, name: str) -> DirtyConsumer:
        """A new consumer; it sees pages written from now on."""
        with self._lock:
            if not self._consumers:
                self._register(I.KVM_MEM_LOG_DIRTY_PAGES)
                self._read_kvm()  # start clean: what came before logging is not "dirty"
            else:
                self._collect()  # what the others have not fetched yet is not this one's
            c = DirtyConsumer(self, name)
            self._consumers.append(c)
            return c

    def mark(self, first_page: int, count: int) -> None:
        """Pages the VMM wrote itself (KVM does not see those writes)."""
        with self._lock:
            for c in self._consumers:
                c.pending[first_page:first_page + count] = True

    def _register(self, flags: int) -> None:
        for slot, r in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, r.gpa, r.size, r.host_addr, flags)

    def _read_kvm(self) -> np.ndarray:
        import numpy as np

        if not self._bitmaps:
            self._bitmaps = [np.zeros((r.size // PAGE + 63) // 64, dtype=np.uint64)
                             for r in self.memory.regions]
        parts = []
        for slot, (r, bm) in enumerate(zip(self.memory.regions, self._bitmaps, strict=True)):
            self.vm.get_dirty_log(slot, bm.ctypes.data)
            bits = np.unpackbits(bm.view(np.uint8), bitorder="little")[: r.size // PAGE]
            parts.append(bits.astype(bool))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _collect(self) -> None:
        mask = self._read_kvm()
        for c in self._consumers:
            c.pending |= mask

    def _fetch(self, c: DirtyConsumer) -> np.ndarray:
        import numpy as np

        with self._lock:
            if c not in self._consumers:
                raise ValueError(f"dirty consumer '{c.name}' was stopped")
            self._collect()
            out, c.pending = c.pending, np.zeros(self.pages, dtype=bool)
            return out

    def _stop(self, c: DirtyConsumer) -> None:
        with self._lock:
            if c not in self._consumers:
                return
            self._consumers.remove(c)
            if not self._consumers:
                self._register(0)


class DirtyConsumer:
    """One reader's view of the dirty log (a migration, an incremental snapshot)."""

    def __init__(self, tracker: DirtyTracker, name: str) -> None:
        import numpy as np

        self.tracker, self.name = tracker, name
        self.pending = np.zeros(tracker.pages, dtype=bool)

    def fetch(self) -> np.ndarray:
        """Pages written since this consumer's last fetch (or its creation)."""
        return self.tracker._fetch(self)

    def give_back(self, mask: np.ndarray) -> None:
        """Pages fetched for work that failed: they count as written again."""
        with self.tracker._lock:
            self.pending |= mask

    def stop(self) -> None:
        self.tracker._stop(self)


def runs_of(mask: np.ndarray, base: int = 0) -> list[tuple[int, int]]:
    """(base + first page, count) for each run of True in `mask`."""
    import numpy as np

    if len(mask) == 0:
        return []
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    starts = np.nonzero(edges == 1)[0]
    ends = np.nonzero(edges == -1)[0]
    return [(base + int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]
