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
    """The parent's FILE: recorded relative to the child's real directory (format.py
    refuses an absolute path), so a chain moved as a whole still resolves."""
    here = os.path.realpath(os.path.dirname(child_base))
    return os.path.normpath(os.path.join(here, record["path"]))


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
        here = os.path.realpath(os.path.dirname(base))  # symlinks resolved on both ends
        return {"path": os.path.relpath(os.path.realpath(self.parent.base), here),
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


@dataclass(frozen=True)
class Plan:
    """What an incremental save found before the guest was held (file reads only)."""

    note: str = ""            # why the next save must be full ("" : a layer can go on)


def plan(vm: VirtualMachine, base: str) -> Plan:
    """Check the VM's chain on disk, before the hold: every snapshot it stacks on must be
    the one its child recorded (a layer over a broken chain could never be restored), and
    `base` must not be one of them (saving there would break the chain)."""
    t = _tracking.get(vm)
    if t is None or t.parent is None:
        return Plan()
    chain, note = chain_on_disk(t.parent)
    target = os.path.realpath(base)
    if any(os.path.realpath(b) == target for b in chain):
        raise SnapshotError(f"cannot save an incremental snapshot to {base}: the VM's chain "
                            "stacks on it (give each layer a new path)")
    return Plan(note)


def chain_on_disk(parent: ParentRef) -> tuple[list[str], str]:
    """FILE of the parent and of every snapshot under it, and what is wrong with the
    chain ("" if every link holds)."""
    out: list[str] = []
    base, want, depth = parent.base, parent.meta_checksum, parent.depth
    if depth + 1 > MAX_CHAIN:
        return [base], f"the chain has {MAX_CHAIN} layers (merge it)"
    while True:
        out.append(base)
        try:
            meta = read_meta(meta_path(base))
        except SnapshotError:
            return out, f"{base}, under the new layer, is gone or unreadable"
        if meta["meta_checksum"] != want or depth_of(meta) != depth:
            return out, f"{base}, under the new layer, was replaced since"
        rec = meta.get("parent")
        if not rec:
            return out, ""
        base, want, depth = parent_base(base, rec), rec["meta_checksum"], depth - 1


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
        if depth_of(meta) != rec["depth"] - 1:
            lines.append(f"{base}  AT THE WRONG DEPTH")
            return lines, [f"parent {base} is not at the depth the layer over it records"]
        what = f"layer {depth_of(meta)}" if meta.get("parent") else "full"
        lines.append(f"{base}  ({what}, {meta['kind']}, {meta['created']}, "
                     f"{meta['memory']['data_pages']} pages)")
    return lines, []


def begin(vm: VirtualMachine, full_runs: Callable[[], Runs], ahead: Plan) -> Layer:
    """The layer an incremental save of `vm` writes; under the VM's hold (no file is read
    here: `ahead` holds what was checked before)."""
    t = _tracking.get(vm)
    fresh = t is None
    if t is None:
        t = track(vm, None)
    given = None if fresh else t.consumer.fetch()
    layer = Layer([], t.parent, t, given, fresh, ahead.note)
    try:
        if layer.note:
            layer.parent = None
        if layer.parent is None:
            layer.runs = full_runs()
        else:
            assert given is not None
            layer.runs = runs_of(given)
    except BaseException:
        layer.failed()
        raise
    return layer
