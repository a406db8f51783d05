"""The device contract: backends start after state is loaded, quiesce after the vCPUs
park and wake before they run, and a device's own writes to guest memory reach dirty
tracking and agree with its saved state."""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest

from pyhyve.devices.base import Bus, BusError, Device, DeviceState
from pyhyve.snapshot.files import current_files
from pyhyve.snapshot.save import save

MB = 1 << 20


class Recorder(Device):
    kind = "recorder"

    def __init__(self, vm) -> None:
        super().__init__()
        self.vm, self.events = vm, []

    def _parked(self) -> bool:
        c = self.vm.control
        return c.parked == c.alive

    def start(self) -> None:
        self.events.append("start")

    def quiesce(self) -> None:
        self.events.append(("quiesce", self._parked()))

    def wake(self) -> None:
        self.events.append(("wake", self._parked()))


@pytest.mark.kvm
def test_quiesce_after_vcpus_park_and_wake_before_they_run(make_vm, tmp_path):
    vm, con = make_vm("hashchain", "", memory=32 * MB, start=False)
    rec = Recorder(vm)
    vm.add_pio_device("rec", 0x500, 4, rec)
    vm.start()
    con.wait_for("H0 2 ")
    vm.pause()
    vm.resume()
    save(vm, str(tmp_path / "c"), "checkpoint")  # a save's hold does the same, once
    assert rec.events == ["start", ("quiesce", True), ("wake", True),
                          ("quiesce", True), ("wake", True)]


@pytest.mark.kvm
def test_a_vm_started_paused_starts_its_devices_quiesced(make_vm):
    vm, _ = make_vm("hashchain", "", memory=32 * MB, start=False)
    rec = Recorder(vm)
    vm.add_pio_device("rec", 0x500, 4, rec)
    vm.start(paused=True)
    vm.resume()
    assert rec.events[0] == "start" and rec.events[1][0] == "quiesce"  # before any vCPU ran
    assert rec.events[2:] == [("wake", True)]


@dataclass(frozen=True)
class TickerState(DeviceState):
    NAME: ClassVar[str] = "ticker"
    count: int = 0


class Ticker(Device):
    """A backend thread that keeps writing a counter into guest memory (as a disk or a
    network device writes completions): its saved count must match the page saved."""

    kind = "ticker"
    state_class = TickerState
    GPA = 24 * MB

    def __init__(self, memory) -> None:
        super().__init__()
        self.memory, self.count = memory, 0
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.running.set()
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            if not self.running.wait(0.05):
                continue
            with self.lock:
                if self.running.is_set():
                    self.count += 1
                    self.memory.write(self.GPA, struct.pack("<Q", self.count))
            time.sleep(0.0002)

    def quiesce(self) -> None:
        with self.lock:  # no write is half-done once we hold the lock
            self.running.clear()

    def wake(self) -> None:
        self.running.set()

    def save(self) -> TickerState:
        return TickerState(self.count)

    def close(self) -> None:
        self.stopped.set()


@pytest.mark.kvm
def test_device_writes_during_checkpoints_match_its_state_and_are_tracked(make_vm, tmp_path):
    vm, con = make_vm("hashchain", "", memory=32 * MB, start=False)
    tick = Ticker(vm.memory)
    vm.add_pio_device("tick0", 0x510, 4, tick)
    vm.start()
    con.wait_for("H0 2 ")
    consumer = vm.dirty.consumer("incremental")
    consumer.fetch()
    for i in range(5):
        time.sleep(0.05)
        base = str(tmp_path / f"c{i}")
        save(vm, base, "checkpoint")  # the device goes on writing the whole time around it
        with open(base + ".meta") as f:
            meta = json.load(f)
        with open(current_files(base).state, "rb") as f:
            kern = f.read()
        sec = next(s for s in meta["state"]["sections"] if s["name"] == "dev:tick0")
        saved = json.loads(kern[sec["offset"]:sec["offset"] + sec["length"]])["fields"]["count"]
        with open(current_files(base).memory, "rb") as f:
            f.seek(Ticker.GPA)
            in_memory = struct.unpack("<Q", f.read(8))[0]
        assert saved == in_memory > 0  # the file is one moment: state and memory agree
    assert tick.count > saved  # and it kept writing after
    assert consumer.fetch()[Ticker.GPA // 4096]  # its writes reach dirty tracking
    consumer.stop()


def test_bus_ranges_can_be_removed_and_moved():
    bus, a, b = Bus("mmio"), Device(), Device()
    bus.register(0x1000, 0x100, a)
    bus.register(0x2000, 0x100, b)
    with pytest.raises(BusError, match="overlaps"):
        bus.move(0x1000, 0x2080)  # onto b: refused, a stays where it was
    assert bus.find(0x1010) == (0x1000, a)
    bus.move(0x1000, 0x3000)
    assert bus.find(0x1010) is None and bus.find(0x3010) == (0x3000, a)
    assert bus.unregister(0x2000) is b and bus.find(0x2000) is None
    with pytest.raises(BusError, match="nothing registered"):
        bus.unregister(0x2000)


def _resume_at(vm, go: threading.Barrier) -> None:
    from pyhyve.vm import VmError

    go.wait()
    with contextlib.suppress(VmError):  # once the stop came first, resume is refused: fine
        vm.resume()


@pytest.mark.kvm
def test_a_resume_racing_a_stop_never_leaves_a_stopped_vm_running(make_vm):
    """Stopped is final: whatever order a resume and a stop land in, the VM ends stopped
    (a few hundred races)."""
    class SlowWake(Device):  # widens the window between resume's check and its write
        def wake(self) -> None:
            time.sleep(0.002)

    for i in range(200):
        vm, _ = make_vm("hashchain", "", memory=16 * MB, start=False)
        vm.add_pio_device("slow", 0x520, 1, SlowWake())
        vm.start()
        vm.pause()
        go = threading.Barrier(2)
        t = threading.Thread(target=_resume_at, args=(vm, go))
        t.start()
        go.wait()
        time.sleep((i % 4) * 0.001)  # land before, inside and after resume's 2 ms window
        vm.stop("raced")
        t.join(10)
        assert vm.wait(10) and vm.state == "stopped", (i, vm.state)
        vm.close()


def test_bus_lookups_never_see_half_a_move():
    bus, a, b = Bus("mmio"), Device(), Device()
    bus.register(0x1000, 0x100, a)
    bus.register(0x4000, 0x100, b)
    bad: list[object] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for addr in (0x1010, 0x2010, 0x4010):
                try:
                    hit = bus.find(addr)
                except Exception as e:  # an IndexError here is the bug this test is about
                    bad.append(e)
                    continue
                if hit is not None and (hit[1] is b) != (addr == 0x4010):
                    bad.append((addr, hit))
    t = threading.Thread(target=reader)
    t.start()
    for _ in range(5000):
        bus.move(0x1000, 0x2000)
        bus.move(0x2000, 0x1000)
    stop.set()
    t.join()
    assert not bad, bad[:3]


@pytest.mark.kvm
def test_device_writes_during_a_live_migration_arrive(make_vm, monkeypatch):
    """A device writing guest memory from its own thread all through a live migration:
    on the destination its state and the memory it wrote agree, and nothing is lost."""
    from migrate_helpers import Destination, migrate
    from pyhyve.vm import VirtualMachine

    real_init = VirtualMachine.__init__

    def with_ticker(self, config, *a, **kw):  # the same device on both sides
        real_init(self, config, *a, **kw)
        self.add_device("tick0", self.pio, 0x510, 4, Ticker(self.memory))
    monkeypatch.setattr(VirtualMachine, "__init__", with_ticker)
    monkeypatch.setattr(Ticker, "load_state", lambda self, st: setattr(self, "count", st.count),
                        raising=False)
    for _ in range(3):
        vm, con = make_vm("hashchain", "", memory=64 * MB)
        con.wait_for("H0 2 ")
        time.sleep(0.05)
        dest = Destination()
        stats = migrate(vm, dest, live=True, compress="none")
        assert stats.state == "completed", stats.error
        dv = dest.vm
        try:
            dv.pause()
            tick = dv.devices["tick0"]
            in_memory = struct.unpack("<Q", dv.memory.read(Ticker.GPA, 8))[0]
            assert tick.count >= in_memory > 0
            assert tick.count - in_memory <= 1  # at most the write in hand at the pause
        finally:
            dv.close()
