"""Incremental snapshots, the reading side: a layer's parents, checked, and stacked.

A layer's FILE.meta names its parent by path (relative to the layer's directory) and by
the parent's metadata checksum. Opening a layer opens every snapshot under it, each checked
like any snapshot (structure, every checksum) plus: the parent is the one the layer was
written over (its checksum), has the same memory size, sits one level lower, and no
snapshot appears twice. A missing or changed parent is refused, naming it. The parent's
path is the only host path a snapshot names; it is opened read-only, as a snapshot, and
nothing in it is used unless every check passes (docs/security.md).

Restoring stacks the chain: the full snapshot at the bottom is mapped (or copied) as usual,
then the layers' pages are copied over it, each page once, from the newest layer that has
it (layers hold only what changed, so they are small); the newest layer's state is the
VM's. Parents keep only their run tables once checked (their state sections are not
needed), and the whole chain may hold at most MAX_CHAIN_RUNS runs, so a hostile chain
cannot pin more than one snapshot's worth of memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..machine.dirty import runs_of
from ..machine.memory import PAGE, GuestMemory
from .format import MAX_CHAIN, SnapshotError
from .incremental import depth_of, parent_base
from .memfile import load_eager

if TYPE_CHECKING:
    from .restore import Snapshot

Opener = Callable[[str], "Snapshot"]
MAX_CHAIN_RUNS = 1 << 22  # as many as one state file's largest run table holds


def open_parents(snap: Snapshot, opener: Opener) -> None:
    """Open and check every snapshot `snap` stacks on; `opener` opens one (no parents)."""
    seen = {os.path.realpath(snap.base)}
    cur = snap
    try:
        while cur.meta.get("parent"):
            rec = cur.meta["parent"]
            base = parent_base(cur.base, rec)
            if os.path.realpath(base) in seen or len(seen) > MAX_CHAIN:
                raise SnapshotError(f"{cur.base}: its chain of parents loops back to {base}")
            seen.add(os.path.realpath(base))
            try:
                parent = opener(base)
            except SnapshotError as e:
                raise SnapshotError(f"parent {base} of {cur.base}: {e}") from None
            cur.parent = parent
            if parent.meta["meta_checksum"] != rec["meta_checksum"]:
                raise SnapshotError(f"parent {base} of {cur.base} has changed since the layer "
                                    "was written (its checksum differs)")
            if parent.meta["memory"]["size"] != cur.meta["memory"]["size"]:
                raise SnapshotError(f"parent {base} of {cur.base} has a different memory size")
            if depth_of(parent.meta) != rec["depth"] - 1:
                raise SnapshotError(f"parent {base} of {cur.base} is not at the depth the "
                                    "layer records")
            parent.blobs = {}  # only the newest layer's state is used
            total = sum(len(s.runs) for s in layers(snap))
            if total > MAX_CHAIN_RUNS:
                raise SnapshotError(f"{snap.base}: its chain holds more than {MAX_CHAIN_RUNS} "
                                    "memory runs (merge it)")
            cur = parent
    except BaseException:
        snap.close()
        raise


def layers(snap: Snapshot) -> list[Snapshot]:
    """The chain, the full snapshot first and `snap` last."""
    out = [snap]
    while out[-1].parent is not None:
        out.append(out[-1].parent)
    return out[::-1]


def root(snap: Snapshot) -> Snapshot:
    return layers(snap)[0]


def stack(memory: GuestMemory, snap: Snapshot) -> None:
    """Copy the layers above the full snapshot into `memory`: each page once, from the
    newest layer that holds it."""
    above = layers(snap)[1:]
    if not above:  # a full snapshot: nothing to stack, and numpy costs 80 ms to import
        return
    import numpy as np

    size = snap.meta["memory"]["size"]
    covered = np.zeros(size // PAGE, dtype=bool)
    for layer in reversed(above):
        mine = np.zeros_like(covered)
        for page, count in layer.runs:
            mine[page:page + count] = True
        todo = runs_of(mine & ~covered)
        covered |= mine
        load_eager(memory, layer.mem_fd, todo)
