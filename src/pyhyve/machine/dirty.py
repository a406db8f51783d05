"""Dirty-page tracking: one owner of KVM's dirty log, any number of independent consumers.

KVM's log is one bitmap per memory slot, so two readers would steal each other's bits (a
migration and an incremental snapshot, say). Only the tracker reads it: each collect ORs
what KVM reports into every consumer's own pending bitmap, and a consumer's fetch returns
(and clears) only its own. A consumer sees every page written since it was created or last
fetched, whoever else reads. Logging is switched on with the first consumer and off when the
last one stops; stopping one leaves the others untouched. Writes the VMM makes itself
(GuestMemory.write/fill: loaders, device DMA) are merged in through `mark`.

Where KVM offers manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET;
our hosts do), reading the log and write-protecting pages again are two steps, and a
migration that is the only consumer uses that ("deferred"): logging starts with every page
counted dirty and none protected, and the sender protects each chunk (`arm`) just before it
reads it, as QEMU does. Write-protecting all of guest RAM at once instead makes the guest's
next pass take a fault per page, all in one go (0.3-0.5 s of silence for 512 MiB here);
armed chunk by chunk, the same faults come a chunk at a time. A second consumer ends the
deferred mode: everything is protected, and pages that were not go to the migration as
written. Without the capability the classic read-and-clear serves every consumer.

Bitmaps are bool arrays over file pages (regions in file order), the page numbers
snapshots use.
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
        self.manual: bool | None = None  # manual protection: decided when logging starts
        self._deferred: DirtyConsumer | None = None
        self._unarmed: np.ndarray | None = None  # deferred: pages KVM does not protect
        memory.on_write = self.mark

    @property
    def active(self) -> bool:
        return bool(self._consumers)

    def consumer(self, name: str, deferred: bool = False) -> DirtyConsumer:
        """A new consumer; it sees pages written from now on. `deferred`: it protects
        pages itself, chunk by chunk (`DirtyConsumer.arm`), if it is the only consumer
        and KVM can; `c.deferred` says whether it does."""
        import numpy as np

        with self._lock:
            c = DirtyConsumer(self, name)
            if not self._consumers:
                self._enable_manual()
                self._register(I.KVM_MEM_LOG_DIRTY_PAGES)
                if deferred and self.manual:  # every bit set, no page protected
                    self._deferred, self._unarmed = c, np.ones(self.pages, dtype=bool)
                else:
                    self._read_kvm()  # start clean: what came before logging is not "dirty"
            else:
                self._end_deferred()
                self._collect()  # what the others have not fetched yet is not this one's
            self._consumers.append(c)
            return c

    def mark(self, first_page: int, count: int) -> None:
        """Pages the VMM wrote itself (KVM does not see those writes). Without consumers,
        no lock (every device completion comes here): a write done before a consumer
        exists is never its to see, with or without the lock."""
        if not self._consumers:
            return
        with self._lock:
            for c in self._consumers:
                c.pending[first_page:first_page + count] = True

    def _enable_manual(self) -> None:
        if self.manual is not None:
            return
        want = I.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | I.KVM_DIRTY_LOG_INITIALLY_SET
        self.manual = False
        try:
            if self.vm.check_extension(I.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & want == want:
                self.vm.enable_cap(I.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, want)
                self.manual = True
        except OSError:  # an older KVM: the classic read-and-clear
            pass

    def _register(self, flags: int) -> None:
        for slot, r in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, r.gpa, r.size, r.host_addr, flags)

    def _read_kvm(self) -> np.ndarray:
        """Pages written since the last read (protected again, unless deferred)."""
        import numpy as np

        if not self._bitmaps:
            self._bitmaps = [np.zeros((r.size // PAGE + 63) // 64, dtype=np.uint64)
                             for r in self.memory.regions]
        parts = []
        for slot, (r, bm) in enumerate(zip(self.memory.regions, self._bitmaps, strict=True)):
            self.vm.get_dirty_log(slot, bm.ctypes.data)
            bits = np.unpackbits(bm.view(np.uint8), bitorder="little")[: r.size // PAGE]
            parts.append(bits.astype(bool))
        mask = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if not self.manual:
            return mask  # KVM cleared and protected them as it reported them
        if self._unarmed is not None:  # deferred: handed out unprotected, armed when sent
            mask &= ~self._unarmed
            self._unarmed |= mask
        else:
            self._clear(mask)
        return mask

    def _clear(self, mask: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
        """Write-protect the pages of mask[lo:hi] again (manual protection), one
        KVM_CLEAR_DIRTY_LOG per slot, on 64-page boundaries as KVM requires."""
        import numpy as np

        hi = self.pages if hi is None else hi
        for slot, r in enumerate(self.memory.regions):
            base, n = r.layout.file_offset // PAGE, r.size // PAGE
            a, b = max(lo, base) - base, min(hi, base + n) - base
            if a >= b or not mask[base + a:base + b].any():
                continue
            first = a // 64 * 64
            count = min(n, (b + 63) // 64 * 64) - first
            bits = np.zeros(count, dtype=bool)
            bits[a - first:b - first] = mask[base + a:base + b]
            words = np.zeros((count + 63) // 64, dtype=np.uint64)
            packed = np.packbits(bits, bitorder="little")
            words.view(np.uint8)[: len(packed)] = packed
            self.vm.clear_dirty_log(slot, first, count, words.ctypes.data)

    def _arm(self, c: DirtyConsumer, lo: int, hi: int) -> None:
        with self._lock:
            if c is not self._deferred or self._unarmed is None:
                return
            if self._unarmed[lo:hi].any():
                self._clear(self._unarmed, lo, hi)
                self._unarmed[lo:hi] = False

    def _arm_mask(self, c: DirtyConsumer, mask: np.ndarray) -> None:
        with self._lock:
            if c is not self._deferred or self._unarmed is None:
                return
            sel = mask & self._unarmed
            self._clear(sel)
            self._unarmed &= ~sel

    def _end_deferred(self) -> None:
        """Protect every page (another consumer needs the whole log): those that were not
        protected may have been written unseen, so the deferred consumer gets them."""
        if self._deferred is None or self._unarmed is None:
            return
        unarmed, c = self._unarmed, self._deferred
        self._deferred = self._unarmed = None
        self._clear(unarmed)
        c.pending |= unarmed

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
            if c is self._deferred:
                self._deferred = self._unarmed = None
            if not self._consumers:
                self._register(0)


class DirtyConsumer:
    """One reader's view of the dirty log (a migration, an incremental snapshot)."""

    def __init__(self, tracker: DirtyTracker, name: str) -> None:
        import numpy as np

        self.tracker, self.name = tracker, name
        self.pending = np.zeros(tracker.pages, dtype=bool)

    @property
    def deferred(self) -> bool:
        """Must this consumer `arm` pages before it reads them?"""
        return self.tracker._deferred is self

    def fetch(self) -> np.ndarray:
        """Pages written since this consumer's last fetch (or its creation). A deferred
        consumer must `arm` each before reading it, or later writes go unseen."""
        return self.tracker._fetch(self)

    def arm(self, first_page: int, count: int) -> None:
        """Deferred: protect these pages now, so writes from here on are logged; call it
        just before reading them. A no-op otherwise."""
        self.tracker._arm(self, first_page, first_page + count)

    def arm_mask(self, mask: np.ndarray) -> None:
        """`arm` for every page set in `mask`."""
        self.tracker._arm_mask(self, mask)

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
