"""The loading set: the 2 MiB blocks of guest RAM the guest was writing just before a save.

A lazy restore copies these blocks in before the guest starts and leaves every other page
in the file until the guest touches it (REAP, ASPLOS'21): a guest that works in 64 MiB of
a 512 MiB snapshot starts at full speed on its 64 MiB, and memory stays at what it uses.

Recording is asked for (`pyhyvectl --suspend FILE --loading-set MS`), because it is not
free. Tracking every page through the dirty log costs a write fault per page written, so
the recorder watches a sample: SAMPLES pages of every 2 MiB block are write-protected
(KVM's manual dirty-log protection) for a window before the save's pause, and a block
counts as hot when the guest wrote any of its sampled pages. The faults are few; what costs
is switching the dirty log on and off at all: KVM then maps the guest's memory in 4 KiB
pages and rebuilds its large mappings after, so the guest re-faults its working set. On
our kvm_pvm hosts a checkpoint of a guest writing 512 MiB stalled it for 120-440 ms with a
window against 79 ms without (docs/snapshot-format.md), so saves record no set unless told
to. When the dirty log already has another reader (an incremental snapshot's), nothing is
switched and the recorder reads exactly which pages were written. Reads are not seen (this
host has no cheap per-page accessed bit: no page_idle, no soft-dirty); a block the guest
only reads comes in on its first touch.

An empty set means nothing was recorded (not asked for, the VM was paused, or it wrote
nothing in the window): a lazy restore then prefetches every data page, as before loading
sets.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..machine.dirty import runs_of
from ..pipeline.pages import Runs

if TYPE_CHECKING:
    from ..machine.dirty import DirtyConsumer
    from ..vm import VirtualMachine

SECTION = "loading-set"
BLOCK_PAGES = 512     # 2 MiB: the prefetch's step, and a huge page
SAMPLES = 8           # pages watched per block
WINDOW = 0.1          # seconds of watching before the pause (the command line's default)


class Recorder:
    """Watches a running VM from construction until `finish`; a paused VM records nothing."""

    def __init__(self, vm: VirtualMachine, window: float = WINDOW) -> None:
        self.window, self.t0 = window, time.monotonic()
        self.pages = vm.memory.size // 4096
        self.consumer: DirtyConsumer | None = None
        if vm.state != "running" or window <= 0:
            return
        import numpy as np

        c = vm.dirty.consumer("loading-set", deferred=True)
        self.consumer = c
        if c.deferred:  # nothing protected yet: protect the sample
            mask = np.zeros(self.pages, dtype=bool)
            for k in range(SAMPLES):
                mask[k * (BLOCK_PAGES // SAMPLES)::BLOCK_PAGES] = True
            c.arm_mask(mask)

    def finish(self) -> Runs:
        """Wait out the window, stop watching; the hot blocks as page runs."""
        c = self.consumer
        if c is None:
            return []
        try:
            left = self.window - (time.monotonic() - self.t0)
            if left > 0:
                time.sleep(left)
            written = c.fetch()
        except OSError:  # the log could not be read: no set, never a failed save
            return []
        finally:
            self.cancel()
        return blocks_of(written, self.pages)

    def cancel(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None


def blocks_of(written: object, pages: int) -> Runs:
    """Page runs of the 2 MiB blocks holding any page set in the bool array `written`."""
    import numpy as np

    mask = np.asarray(written, dtype=bool)
    blocks = np.zeros((pages + BLOCK_PAGES - 1) // BLOCK_PAGES, dtype=bool)
    blocks[np.nonzero(mask)[0] // BLOCK_PAGES] = True
    return [(p * BLOCK_PAGES, min(n * BLOCK_PAGES, pages - p * BLOCK_PAGES))
            for p, n in runs_of(blocks)]


def intersect(a: Runs, b: Runs) -> Runs:
    """The pages in both sorted, disjoint run lists, as runs."""
    out: Runs = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if lo < hi:
            out.append((lo, hi - lo))
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


def prefetch_runs(loading: Runs | None, data: Runs) -> Runs:
    """What a lazy restore prefetches: the loading set's data pages, or every data page
    when no set was recorded."""
    return intersect(loading, data) if loading else data


MAX_HOT_RUNS = 4096  # mappings a lazy restore makes for the set (like its zero stretches)


def hot_blocks(loading: Runs | None, data: Runs, pages: int | None = None) -> Runs:
    """The loading set's 2 MiB blocks that hold data, whole (clipped to `pages`), as page
    runs: a lazy restore gives these memory of its own (2 MiB pages) and copies their data
    in before the guest starts. Blocks without data are left out: they are mapped
    anonymous as zero stretches already, and two mappings of one range must not be made.
    At most MAX_HOT_RUNS runs, the largest (each is one mapping; the rest stays lazy)."""
    if not loading:
        return []
    with_data: set[int] = set()
    for p, n in intersect(loading, data):
        with_data.update(range(p // BLOCK_PAGES, (p + n - 1) // BLOCK_PAGES + 1))
    end = pages if pages is not None else max(p + n for p, n in data) if data else 0
    out: Runs = []
    for b in sorted(with_data):
        lo, hi = b * BLOCK_PAGES, min((b + 1) * BLOCK_PAGES, end)
        if lo >= hi:
            continue
        if out and out[-1][0] + out[-1][1] == lo:
            out[-1] = (out[-1][0], out[-1][1] + hi - lo)
        else:
            out.append((lo, hi - lo))
    if len(out) > MAX_HOT_RUNS:
        out = sorted(sorted(out, key=lambda r: -r[1])[:MAX_HOT_RUNS])
    return out
