"""Dirty-page tracking with KVM_MEM_LOG_DIRTY_PAGES and KVM_GET_DIRTY_LOG.

Each fetch returns the pages written since the previous fetch (KVM clears and re-protects
them), as one boolean array indexed by file page (regions in file order), so callers use
the same page numbers as snapshots. Writes made by the VMM itself (device DMA) are not seen
by KVM; devices that write guest memory must report them (none do yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..kvm import ioctls as I
from .memory import PAGE

if TYPE_CHECKING:
    from ..kvm import Vm
    from .memory import GuestMemory


class DirtyLog:
    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        self.vm, self.memory = vm, memory
        self.bitmaps = [np.zeros((r.size // PAGE + 63) // 64, dtype=np.uint64)
                        for r in memory.regions]
        self.active = False

    def _register(self, flags: int) -> None:
        for slot, r in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, r.gpa, r.size, r.host_addr, flags)

    def start(self) -> None:
        """Begin tracking; pages written before this call are not reported."""
        self._register(I.KVM_MEM_LOG_DIRTY_PAGES)
        self.active = True
        self.fetch()

    def fetch(self) -> np.ndarray:
        """Pages written since the last fetch: bool array over all file pages."""
        parts = []
        for slot, (r, bm) in enumerate(zip(self.memory.regions, self.bitmaps, strict=True)):
            self.vm.get_dirty_log(slot, bm.ctypes.data)
            bits = np.unpackbits(bm.view(np.uint8), bitorder="little")[: r.size // PAGE]
            parts.append(bits.astype(bool))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def stop(self) -> None:
        if self.active:
            self._register(0)
            self.active = False


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first page, count) for each run of True in `mask`."""
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    starts = np.nonzero(edges == 1)[0]
    ends = np.nonzero(edges == -1)[0]
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]
