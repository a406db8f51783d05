"""The device model: every device is one class on the PIO or MMIO bus.

A device answers reads and writes in its range and can capture its state as a plain,
versioned, frozen dataclass (`save()`), from which `restore()` builds an equal device.
Encoding that value into bytes lives in pyhyve.snapshot, apart from the devices.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import PyhyveError


@dataclass(frozen=True)
class DeviceState:
    """Base of every device's saved state. Subclasses set NAME (the record's stable name:
    renaming the class must not break old snapshots) and VERSION, and add fields. A field
    added later needs a default (older records load with it) or an upgrade function in
    UPGRADES {old version: fields dict -> fields dict of the next version}; every such
    change bumps VERSION (snapshot/codec.py)."""

    NAME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    UPGRADES: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}


class Device:
    """A device on a bus. `kind` names it in snapshots; `lock` serialises its state.

    The life cycle every device meets (the VM drives it):
      built -> load_state(saved) (restore or receive only) -> start() -> running
      running -> quiesce() when the VM pauses (after the vCPUs park) -> wake() when it
      resumes (before the vCPUs run) -> ... -> close()
    Backend threads and host I/O begin in start(), never before a restored state is in.
    quiesce() returns only at a point where no request is half-done: what the device has
    in flight is either completed (and in guest memory) or recorded in its state, so the
    state a save captures and the memory it writes agree. A device that writes guest
    memory itself does it through `memory.write` or calls `wrote(gpa, length)`, so dirty
    tracking (migration, incremental snapshots) sees it.
    """

    kind: ClassVar[str] = "device"
    state_class: ClassVar[type[DeviceState] | None] = None  # what save() returns

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wrote: Callable[[int, int], None] = lambda gpa, length: None  # set by the VM

    def start(self) -> None:
        """Begin backend work (threads, host I/O); the state is final by now."""

    def quiesce(self) -> None:
        """Stop backend work at a clean point (the VM is pausing: vCPUs are parked)."""

    def wake(self) -> None:
        """Resume backend work (the VM is resuming: vCPUs run right after)."""

    def read(self, offset: int, size: int) -> int:
        """Read `size` bytes at `offset` from the device's base address."""
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        """Write `size` bytes at `offset` from the device's base address."""

    def save(self) -> DeviceState | None:
        """Return the device's state, or None when it has no state worth keeping."""
        return None

    def load_state(self, state: DeviceState) -> None:
        """Put a saved state back into this (freshly built) device."""
        if state is not None:
            raise ValueError(f"{self.kind} has no state to restore")

    def save_refusal(self) -> str:
        """Why this device's state cannot go into a snapshot or a migration ("" if it
        can): a backend whose content lives only with this VM."""
        return ""

    def close(self) -> None:
        """Release host resources (threads, sockets)."""


class IrqLines:
    """Interrupt lines shared by devices: a line is high while any device holds it high.
    KVM_IRQ_LINE from one source keeps one level per line, so without this a device
    lowering its INTx would drop another's pending interrupt on the same pin, and that
    device would wait for an interrupt that never comes. Only changes of a line's level
    reach KVM (a virtio device raises its line at every completion)."""

    def __init__(self, set_line: Callable[[int, int], None]) -> None:
        self._set = set_line
        self._high: dict[int, set[int]] = {}
        self._level: dict[int, int] = {}  # what KVM was last told, per line
        self._lock = threading.Lock()
        self._sources = 0

    def source(self) -> Callable[[int, int], None]:
        """A device's own (irq, level) setter."""
        with self._lock:
            me = self._sources
            self._sources += 1

        def line(irq: int, level: int) -> None:
            with self._lock:
                holders = self._high.setdefault(irq, set())
                if level:
                    holders.add(me)
                else:
                    holders.discard(me)
                now = 1 if holders else 0
                if self._level.get(irq) != now:  # a wire: telling KVM its level again
                    self._set(irq, now)           # changes nothing, and costs a system call
                    self._level[irq] = now
        return line


class BusError(PyhyveError, ValueError):
    pass


class Bus:
    """Address ranges to devices, for one address space (port I/O or MMIO).

    vCPU threads look devices up while another thread may add, remove or move ranges (a
    PCI BAR reprogrammed): the table is an immutable pair replaced in one assignment, so a
    lookup sees the old table or the new one, never half of each."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._table: tuple[tuple[int, ...], tuple[tuple[int, int, Device], ...]] = ((), ())
        self._lock = threading.Lock()  # writers only

    def _check(self, entries: list[tuple[int, int, Device]], base: int, length: int) -> int:
        starts = [e[0] for e in entries]
        i = bisect.bisect_right(starts, base)
        if i > 0:
            s, ln, d = entries[i - 1]
            if s + ln > base:
                raise BusError(f"{self.name} range {base:#x} overlaps {d.kind} at {s:#x}")
        if i < len(entries) and base + length > entries[i][0]:
            raise BusError(f"{self.name} range {base:#x} overlaps {entries[i][2].kind}")
        return i

    def _publish(self, entries: list[tuple[int, int, Device]]) -> None:
        self._table = (tuple(e[0] for e in entries), tuple(entries))

    def register(self, base: int, length: int, device: Device) -> None:
        with self._lock:
            entries = list(self._table[1])
            entries.insert(self._check(entries, base, length), (base, length, device))
            self._publish(entries)

    def find(self, addr: int) -> tuple[int, Device] | None:
        starts, entries = self._table  # one snapshot of the table for the whole lookup
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            s, ln, d = entries[i]
            if addr < s + ln:
                return s, d
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            return (1 << (8 * size)) - 1  # unclaimed: floating bus reads all ones
        base, dev = hit
        with dev.lock:
            return dev.read(addr - base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            return  # unclaimed ports (0x80 and friends) are answered quietly
        base, dev = hit
        with dev.lock:
            dev.write(addr - base, size, value)

    def unregister(self, base: int) -> Device:
        """Remove the range starting at `base` (a PCI BAR moving, a device unplugged)."""
        with self._lock:
            entries = list(self._table[1])
            for i, (s, _, d) in enumerate(entries):
                if s == base:
                    del entries[i]
                    self._publish(entries)
                    return d
        raise BusError(f"{self.name}: nothing registered at {base:#x}")

    def move(self, base: int, new_base: int) -> None:
        """Move a device's range (a BAR reprogrammed by the guest) in one step; refused,
        and nothing changed, on overlap."""
        with self._lock:
            entries = list(self._table[1])
            hit = [e for e in entries if e[0] == base]
            if not hit:
                raise BusError(f"{self.name}: nothing registered at {base:#x}")
            _, length, dev = hit[0]
            entries.remove(hit[0])
            entries.insert(self._check(entries, new_base, length), (new_base, length, dev))
            self._publish(entries)

    def devices(self) -> list[tuple[int, int, Device]]:
        return list(self._table[1])


def state_fields(state: DeviceState) -> dict[str, Any]:
    return {k: getattr(state, k) for k in state.__dataclass_fields__}
