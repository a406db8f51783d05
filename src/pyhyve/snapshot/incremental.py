"""Incremental snapshots, the saving side: which pages the next layer holds, and which
snapshot it stacks on.

A VM tracks its writes for incremental snapshots only when asked (dirty logging costs the
guest a fault per first write after each collection): from its first `--incremental`
checkpoint (which is then a full one), from `--track-dirty` at run or restore, or from a
restore of a layer (the chain continues). The tracking is one dirty-log consumer
(machine/dirty.py) of its own, so a migration reading the log at the same time takes
nothing from it. Only incremental saves move the chain: a plain checkpoint in between is a
snapshot of its own and changes nothing here.

Each incremental save, under the VM's hold, fetches the pages written since the layer
before and writes exactly those; a save that fails gives them back, so the next one still
holds them. A parent that has gone or changed since (another save to its path) makes the
save a full one, said in its report; a save to the path of a snapshot the chain stacks on
is refused (it would destroy a layer the new one needs).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..machine.dirty import runs_of
from ..pipeline.pages import Runs
from .files import meta_path
from .format import MAX_CHAIN, SnapshotError, read_meta

if TYPE_CHECKING:
    import numpy as np

    from ..machine.dirty import DirtyConsumer
    from ..vm import VirtualMachine


@dataclass(frozen=True)
class ParentRef:
    base: str            # the snapshot's FILE, absolute
    meta_checksum: str   # its FILE.meta's checksum when this VM left it
    depth: int           # its layers above a full snapshot (0: it is one)


def depth_of(meta: dict[str, Any]) -> int:
    parent = meta.get("parent")
    return int(parent["depth"]) if parent else 0


def parent_base(child_base: str, record: dict[str, Any]) -> str:
    """The parent's FILE: recorded relative to the child's directory, so a chain moved
    as a whole still resolves (a recorded absolute path is taken as it is)."""
    return os.path.normpath(os.path.join(os.path.dirname(child_base), record["path"]))


class Tracking:
    def __init__(self, consumer: DirtyConsumer, parent: ParentRef | None) -> None:
        self.consumer, self.parent = consumer, parent


_tracking: weakref.WeakKeyDictionary[VirtualMachine, Tracking] = weakref.WeakKeyDictionary()


def track(vm: VirtualMachine, parent: ParentRef | None) -> Tracking:
    """Start tracking for incremental snapshots; before the guest runs or under a hold,
    so no write is missed. `parent`: the snapshot the next layer stacks on (None: the
    next incremental save is a full one)."""
    t = _tracking.get(vm)
    if t is None:
        t = _tracking[vm] = Tracking(vm.dirty.consumer("incremental"), parent)
    else:
        t.parent = parent
    return t


def pending_pages(vm: VirtualMachine) -> int | None:
    """How many pages the next incremental save of `vm` would write as of now (None: it
    will be a full one); for sizing its staging buffer before the guest is held."""
    t = _tracking.get(vm)
    if t is None or t.parent is None:
        return None
    mask = t.consumer.fetch()
    t.consumer.give_back(mask)
    return int(mask.sum())


def status(vm: VirtualMachine) -> dict[str, object]:
    t = _tracking.get(vm)
    if t is None:
        return {"dirty_tracking": False}
    return {"dirty_tracking": True, "incremental_parent":
            t.parent.base if t.parent else "none (the next incremental snapshot is full)"}


@dataclass
class Layer:
    """What one save writes: `runs` (every page of the layer, zero ones included, or the
    non-zero pages of a full snapshot), and the parent it names."""

    runs: Runs
    parent: ParentRef | None
    tracking: Tracking
    given: np.ndarray | None   # the dirty bits fetched for it (returned on failure)
    fresh: bool                # the tracking began with this save
    note: str = ""             # why a full snapshot was written instead of a layer

    def record(self, base: str) -> dict[str, Any] | None:
        """FILE.meta's `parent`."""
        if self.parent is None:
            return None
        return {"path": os.path.relpath(self.parent.base, os.path.dirname(base)),
                "meta_checksum": self.parent.meta_checksum, "depth": self.parent.depth + 1}

    def failed(self) -> None:
        if self.fresh:
            self.tracking.consumer.stop()
            _forget(self.tracking)
        elif self.given is not None:
            self.tracking.consumer.give_back(self.given)

    def committed(self, base: str, meta: dict[str, Any]) -> None:
        self.tracking.parent = ParentRef(base, meta["meta_checksum"], depth_of(meta))


def _forget(t: Tracking) -> None:
    for vm, other in list(_tracking.items()):
        if other is t:
            del _tracking[vm]


def ancestors(parent: ParentRef) -> list[str]:
    """FILE of the parent and of every snapshot it stacks on (read leniently: a broken
    chain just ends the list)."""
    out, base = [parent.base], parent.base
    for _ in range(MAX_CHAIN):
        try:
            rec = read_meta(meta_path(base)).get("parent")
        except SnapshotError:
            break
        if not rec:
            break
        base = parent_base(base, rec)
        out.append(base)
    return out


def parents(base: str, meta: dict[str, Any]) -> tuple[list[str], list[str]]:
    """For `snapshot info`: a line per parent (nearest first), and what is wrong."""
    lines: list[str] = []
    seen = {os.path.realpath(base)}
    while meta.get("parent") and len(lines) < MAX_CHAIN:
        rec = meta["parent"]
        base = parent_base(base, rec)
        if os.path.realpath(base) in seen:
            return lines, [f"the chain of parents loops back to {base}"]
        seen.add(os.path.realpath(base))
        try:
            meta = read_meta(meta_path(base))
        except SnapshotError as e:
            lines.append(f"{base}  MISSING OR UNREADABLE")
            return lines, [f"parent {base}: {e}"]
        if meta["meta_checksum"] != rec["meta_checksum"]:
            lines.append(f"{base}  CHANGED")
            return lines, [f"parent {base} has changed since the layer over it was written"]
        what = f"layer {depth_of(meta)}" if meta.get("parent") else "full"
        lines.append(f"{base}  ({what}, {meta['kind']}, {meta['created']}, "
                     f"{meta['memory']['data_pages']} pages)")
    return lines, []


def begin(vm: VirtualMachine, base: str, full_runs: Callable[[], Runs]) -> Layer:
    """The layer an incremental save of `vm` to `base` writes; under the VM's hold."""
    t = _tracking.get(vm)
    fresh = t is None
    if t is None:
        t = track(vm, None)
    parent = t.parent
    if parent is not None and os.path.realpath(base) in map(os.path.realpath, ancestors(parent)):
        if fresh:
            t.consumer.stop()
            _forget(t)
        raise SnapshotError(f"cannot save an incremental snapshot to {base}: the VM's chain "
                            "stacks on it (give each layer a new path)")
    given = None if fresh else t.consumer.fetch()
    layer = Layer([], parent, t, given, fresh)
    if parent is not None:
        layer.note = _unusable(parent)
        if layer.note:
            layer.parent = None
    if layer.parent is None:
        layer.runs = full_runs()
    else:
        assert given is not None
        layer.runs = runs_of(given)
    return layer


def _unusable(parent: ParentRef) -> str:
    """Why `parent` cannot carry a new layer ("" if it can)."""
    if parent.depth + 1 > MAX_CHAIN:
        return f"the chain has {MAX_CHAIN} layers (merge it)"
    try:
        meta = read_meta(meta_path(parent.base))
    except SnapshotError:
        return f"the parent {parent.base} is gone or unreadable"
    if meta["meta_checksum"] != parent.meta_checksum:
        return f"the parent {parent.base} was replaced since"
    return ""
