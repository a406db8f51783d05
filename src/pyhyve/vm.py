"""The VM object: KVM VM + guest memory + devices + vCPU threads, and its life cycle.

Two ways in: `VirtualMachine.create(config)` boots a kernel; `VirtualMachine.build(config)`
gives an unbooted machine whose state a snapshot or a migration stream then fills in.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from .boot.acpi import write_acpi_tables
from .boot.common import BootError, load_kernel
from .boot.cpu import setup_boot_cpu
from .boot.mptable import write_mp_table
from .description import CONSOLE_ID
from .devices.acpipm import AcpiPm
from .devices.base import Bus, BusError, Device, DeviceState, IrqLines
from .devices.console import Console
from .devices.factory import Wiring, make_device, pci_intx
from .devices.genid import VmGenId
from .devices.pci import PciHostBridge
from .kvm import KvmError, Vcpu
from .kvm import ioctls as I
from .kvm.structs import KvmCpuidEntry2
from .machine.cpuid import build_cpuid, for_vcpu
from .machine.dirty import DirtyTracker
from .machine.irqroute import MsiRoutes
from .machine.memory import GuestMemory
from .machine.state import (
    apply_clock,
    apply_vcpu,
    apply_vm,
    capture_vcpu,
    capture_vm,
    elapsed_since,
    readable_msrs,
    wire_lapic,
)
from .machine.vcpu import VcpuControl, VcpuThread, install_kick_handler
from .vmtypes import (
    EXIT_DESTROYED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    MIN_MEMORY,
    MachineState,
    RunState,
    VmConfig,
    VmError,
    host_memory_bytes,
    open_kvm,
)

TSS_ADDR = 0xFFFB_D000
# a saved host time this far ahead of ours is corrupt, not a clock difference between hosts
MAX_CLOCK_SKEW_NS = 86400 * 10**9
IDENTITY_MAP_ADDR = 0xFFFB_C000
MAX_VCPUS = 64


class VirtualMachine:
    """A running (or runnable) guest."""

    def __init__(self, config: VmConfig, console: Console | None = None,
                 memory: GuestMemory | None = None,
                 cpuid: list[KvmCpuidEntry2] | None = None) -> None:
        if config.memory < MIN_MEMORY or config.memory % 4096:
            raise VmError(f"memory must be at least {MIN_MEMORY >> 20}M and page-aligned")
        if not 1 <= config.cpus <= MAX_VCPUS:
            raise VmError(f"cpus must be between 1 and {MAX_VCPUS}")
        host = host_memory_bytes()
        if host and config.memory > host:
            raise VmError(f"memory {config.memory >> 20}M is more than this host has "
                          f"({host >> 20}M)")
        self.config = config
        self.kvm = open_kvm()
        self._state_lock = threading.Lock()
        self.state = RunState.CREATED
        self.stop_reason = ""
        self.exit_code = 0
        self.reset_requested = False
        self._stopped = threading.Event()
        self._closing = False
        self._pause_lock = threading.RLock()
        self._holds = 0
        self._user_paused = False
        try:
            self._build(console, memory, cpuid)
        except BaseException:
            self.close()
            raise

    # --- construction -------------------------------------------------------------------
    def _build(self, console: Console | None, memory: GuestMemory | None,
               cpuid: list[KvmCpuidEntry2] | None) -> None:
        install_kick_handler()
        kvm = self.kvm
        for cap, name in ((I.KVM_CAP_IRQCHIP, "IRQCHIP"), (I.KVM_CAP_PIT2, "PIT2"),
                          (I.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"),
                          (I.KVM_CAP_USER_MEMORY, "USER_MEMORY")):
            if not kvm.check_extension(cap):
                raise VmError(f"KVM lacks KVM_CAP_{name}, which pyhyve needs")
        self.vm = kvm.create_vm()
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.memory = memory or GuestMemory(self.config.memory, name=f"pyhyve-{self.config.name}",
                                            hugetlb=self.config.hugepages)
        for slot, r in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, r.gpa, r.size, r.host_addr)
        self.dirty = DirtyTracker(self.vm, self.memory)  # the one owner of the dirty log
        self.postcopy_left: Callable[[], int] | None = None  # pages still to come (post-copy)
        # post-copy: gives the userfaultfd back, so a vCPU waiting on a page that will never
        # come (the VM is closing) wakes up instead of holding the close forever
        self.postcopy_abort: Callable[[], None] | None = None
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.devices: dict[str, Device] = {}
        self.description = self.config.machine()
        self.console: Console = Console()
        lines = IrqLines(lambda irq, level: self.vm.irq_line(irq, level))
        self.msi_routes: MsiRoutes | None = None
        if (self.kvm.check_extension(I.KVM_CAP_IRQFD)
                and self.kvm.check_extension(I.KVM_CAP_IRQ_ROUTING)):
            self.msi_routes = MsiRoutes(self.vm)
        wiring = Wiring(irq_line=lines.source(),
                        reset=self._guest_reset, console=console, memory=self.memory,
                        power_off=lambda: self.control.stop("guest powered off", 0, False),
                        signal_msi=self.vm.signal_msi,
                        ioeventfd=(self.vm.ioeventfd
                                   if self.kvm.check_extension(I.KVM_CAP_IOEVENTFD) else None),
                        irqfds=self.msi_routes.vectors if self.msi_routes else None,
                        pci_host=self._pci_host,
                        quit=lambda: self.stop("quit from the console (Ctrl-A x)", EXIT_DESTROYED))
        for d in self.description.devices:  # the machine is what its description says
            dev, con = make_device(d, replace(wiring, irq_line=lines.source()))
            if con is not None and d.id == CONSOLE_ID:
                self.console = con
            if d.bus == "pci":
                self._add_pci(d.id, d.base, dev)
                continue
            bus = self.pio if d.bus == "pio" else self.mmio
            self.add_device(d.id, bus, d.base, d.length, dev)
        self.cpuid = cpuid if cpuid is not None else build_cpuid(kvm.supported_cpuid(),
                                                                 self.config.cpuid_hidden)
        self.control = VcpuControl(self.memory.read, self._on_stop)
        self.vcpus: list[Vcpu] = []
        self.threads: list[VcpuThread] = []
        for i in range(self.config.cpus):
            v = self.vm.create_vcpu(i)
            self.vcpus.append(v)
            v.set_cpuid2(for_vcpu(self.cpuid, i, self.config.cpus))
            wire_lapic(v)
            self.threads.append(VcpuThread(v, self.control, self.pio, self.mmio))
        # read once, before any vCPU runs: KVM_GET_TSC_KHZ on a vCPU fd waits for that
        # vCPU's next exit when it is inside KVM_RUN (seconds for a busy guest)
        self.tsc_khz = self.vcpus[0].get_tsc_khz()
        self.has_xsave = bool(kvm.check_extension(I.KVM_CAP_XSAVE))
        self.msr_indices = readable_msrs(self.vcpus[0], kvm.msr_index_list())

    def set_tsc_khz(self, khz: int) -> None:
        """Run the guest's TSC at `khz` (a restored or received guest keeps its own)."""
        for v in self.vcpus:
            v.set_tsc_khz(khz)
        self.tsc_khz = khz

    def add_device(self, name: str, bus: Bus, base: int, length: int, dev: Device) -> None:
        """Put a device on a bus (PIO or MMIO) and connect it to the VM: its own writes to
        guest memory reach dirty tracking through `dev.wrote`."""
        bus.register(base, length, dev)
        self.devices[name] = dev
        dev.wrote = self.memory.mark_written

    def _pci_host(self) -> PciHostBridge | None:
        return next((d for d in self.devices.values() if isinstance(d, PciHostBridge)), None)

    def _add_pci(self, name: str, slot: int, dev: Device) -> None:
        """A PCI function in `slot` of the host bridge, its BAR0 on the MMIO bus (moved
        where the guest moves it)."""
        from .devices.virtio.layout import BAR_SIZE
        from .devices.virtio.pci import VirtioPci

        host = self._pci_host()
        if host is None or not isinstance(dev, VirtioPci):
            raise VmError(f"device {name}: a PCI device needs the PCI host bridge")
        host.add(slot, dev.function)
        self.add_device(name, self.mmio, dev.bar, BAR_SIZE, dev)

        def moved(old: int | None, new: int | None) -> bool:
            if old is not None:
                self.mmio.unregister(old)
            if new is None:
                return True
            try:
                self.mmio.register(new, BAR_SIZE, dev)
            except BusError:  # onto another device: it does not decode until moved again
                return False
            return True
        dev.on_bar_move = moved

    def add_pio_device(self, name: str, base: int, length: int, dev: Device) -> None:
        self.add_device(name, self.pio, base, length, dev)

    @classmethod
    def create(cls, config: VmConfig, console: Console | None = None) -> VirtualMachine:
        """Build a VM and load its kernel, ready to `start()`."""
        if not config.kernel:
            raise VmError("no kernel given (--kernel FILE)")
        vm = cls(config, console)
        try:
            rsdp = 0
            intx = pci_intx(vm.description)
            if any(d.kind == "acpi-pm" for d in vm.description.devices):
                rsdp = write_acpi_tables(vm.memory, config.cpus, intx)
            write_mp_table(vm.memory, config.cpus, intx)
            info = load_kernel(vm.memory, config.kernel, config.cmdline, config.initrd, rsdp)
            setup_boot_cpu(vm.vcpus[0], info.mode, info.entry, info.regs)
        except BootError as e:
            vm.close()
            raise VmError(str(e)) from None
        except BaseException:
            vm.close()
            raise
        return vm

    # --- state ---------------------------------------------------------------------------
    def capture(self) -> MachineState:
        """All KVM and device state; the VM must be paused (or not yet started)."""
        if self.state not in ("paused", "created"):
            raise VmError(f"VM is {self.state}; pause it before capturing its state")
        devices = {}
        for name, dev in self.devices.items():
            with dev.lock:
                st = dev.save()
            if st is not None:
                devices[name] = st
        return MachineState(capture_vm(self.vm),
                            tuple(capture_vcpu(v, self.msr_indices, self.has_xsave)
                                  for v in self.vcpus), devices)

    def device_classes(self) -> dict[str, tuple[str, type[DeviceState]]]:
        """name -> (kind, state class) for the devices that keep state."""
        return {n: (d.kind, d.state_class) for n, d in self.devices.items()
                if d.state_class is not None}

    def apply(self, st: MachineState) -> None:
        """Load a captured state into this freshly built, not yet started VM."""
        if self.state != "created":
            raise VmError("state can only be loaded into a VM that has not run")
        if len(st.vcpus) != len(self.vcpus):
            raise VmError(f"state has {len(st.vcpus)} vCPUs, VM has {len(self.vcpus)}")
        apply_vm(self.vm, st.vm)
        gap = elapsed_since(st.vm.realtime)
        if st.vm.realtime > time.time_ns() + MAX_CLOCK_SKEW_NS or \
                st.vm.clock + gap >= 1 << 63:
            raise VmError("the saved guest clock is not credible (its host time is "
                          f"{st.vm.realtime}, its kvmclock {st.vm.clock} ns)")
        for v, vs in zip(self.vcpus, st.vcpus, strict=True):
            apply_vcpu(v, vs, gap * self.tsc_khz // 1_000_000)
        # kvmclock right after the TSCs, both advanced by the same gap: a guest's
        # clocksource watchdog compares the two
        apply_clock(self.vm, st.vm.clock + gap, self.vcpus)
        for name, dst in st.devices.items():
            dev = self.devices.get(name)
            if dev is None:
                raise VmError(f"state has device '{name}', which this VM does not have")
            dev.load_state(dst)

    # --- life cycle ------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Start the vCPU threads; with `paused` (a guest migrated while paused stays
        paused) or while a hold is taken, they park before running any guest code."""
        ctl = self.control
        with self._pause_lock:
            park = paused or self._holds > 0
            for d in self.devices.values():  # backends begin now: any restored state is in
                d.start()
            if park:
                self._quiesce_devices()
            with ctl.cond:
                ctl.alive = len(self.threads)
                ctl.pause_requested = park
            for t in self.threads:
                t.start()
            if paused:
                self._user_paused = True
            if not park:
                self._set_state(RunState.RUNNING)
                return
            with ctl.cond:
                ctl.cond.wait_for(lambda: ctl.parked >= ctl.alive or ctl.stopping, 10.0)
                self._set_state(RunState.PAUSED)

    @property
    def user_paused(self) -> bool:
        """Paused by the user (not only held by a save, a migration or the lease guard)."""
        return self.state == "paused" and self._user_paused

    # Pausing is counted. The user's pause (pyhyvectl --pause) is a flag that stays until
    # resume(); each internal pause (a save, the last step of a migration, moving guest
    # memory off a snapshot file) is a hold. The vCPUs run only when no hold is taken and
    # the user has not paused: so one scope ending can never let the guest run while
    # another still needs it stopped.
    def pause(self, timeout: float = 10.0) -> None:
        """The user's pause: stop every vCPU at an instruction boundary (returns once all
        are parked) until resume(). Pausing a paused VM succeeds (as QEMU's `stop`)."""
        with self._pause_lock:
            if self.state == "running":
                self._park(timeout)
            elif self.state != "paused":
                raise VmError(f"VM is {self.state}, not running")
            self._user_paused = True

    def resume(self) -> None:
        """End the user's pause; the guest runs again unless an internal hold remains."""
        with self._pause_lock:
            if self.state != "paused":
                raise VmError(f"VM is {self.state}, not paused")
            self._user_paused = False
            if self._holds == 0:
                self._unpark()

    def hold(self, timeout: float = 10.0) -> None:
        """Take an internal pause; the vCPUs stay parked until every hold is released."""
        with self._pause_lock:
            if self.state == "running":
                self._park(timeout)
            elif self.state not in ("paused", "created"):
                raise VmError(f"VM is {self.state}")
            self._holds += 1

    def release(self) -> None:
        with self._pause_lock:
            self._holds -= 1
            if self._holds == 0 and not self._user_paused and self.state == "paused":
                self._unpark()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A scope in which no vCPU runs guest code (a hold)."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    def _park(self, timeout: float) -> None:
        ctl = self.control
        with ctl.cond:
            ctl.pause_requested = True
            ctl.cond.notify_all()  # wakes vCPUs sitting out a throttle slice
        for t in self.threads:
            t.kick()
        deadline = time.monotonic() + timeout
        with ctl.cond:
            while ctl.parked < ctl.alive and not ctl.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    ctl.pause_requested = False
                    ctl.cond.notify_all()
                    raise VmError("timed out waiting for vCPUs to pause")
                ctl.cond.wait(left)
            if ctl.stopping:
                raise VmError(f"VM stopped while pausing: {self.stop_reason}")
            self._set_state(RunState.PAUSED)
        self._quiesce_devices()

    def _quiesce_devices(self) -> None:
        """After the vCPUs: no device works on while the VM is paused."""
        for d in self.devices.values():
            d.quiesce()

    def _unpark(self) -> None:
        for d in self.devices.values():  # before the vCPUs: a device is ready when they run
            d.wake()
        ctl = self.control
        with ctl.cond:
            ctl.pause_requested = False
            self._set_state(RunState.RUNNING)
            ctl.cond.notify_all()

    @property
    def throttle(self) -> float:
        return self.control.throttle

    def set_throttle(self, fraction: float) -> None:
        """Slow the guest down (0 = full speed, 0.99 = 1% of the time), for auto-converge."""
        self.control.set_throttle(fraction, self._kick_running)

    def _kick_running(self) -> bool:
        """The throttle's tick: kick running vCPUs out of the guest; False once stopped."""
        if self.state == "running":
            for t in self.threads:
                t.kick()
        return not self.stopped

    def stop(self, reason: str = "destroyed", code: int = 0) -> None:
        self.control.stop(reason, code)
        for t in self.threads:
            t.kick()

    def _set_state(self, new: RunState) -> None:
        with self._state_lock:
            if self.state is not RunState.STOPPED:  # stopped is final
                self.state = new

    def _on_stop(self, reason: str, code: int, reset: bool) -> None:
        self.stop_reason, self.exit_code, self.reset_requested = reason, code, reset
        with self._state_lock:
            self.state = RunState.STOPPED
        self._stopped.set()
        for t in self.threads:
            t.kick()

    def _guest_reset(self) -> None:
        self.control.stop("guest requested a reset", 0, True)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def join_threads(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t.thread.is_alive():
                t.kick()
                t.thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop the guest if needed and free everything (fds, memory, sockets)."""
        if self._closing:
            return
        self._closing = True
        abort = getattr(self, "postcopy_abort", None)
        if abort is not None:
            abort()
        if hasattr(self, "control"):
            self.stop(self.stop_reason or "closed", self.exit_code)
            self.join_threads()
        for v in getattr(self, "vcpus", []):
            if not any(t.vcpu is v and t.thread.is_alive() for t in self.threads):
                v.close()
        for d in getattr(self, "devices", {}).values():
            d.close()
        routes: MsiRoutes | None = getattr(self, "msi_routes", None)
        if routes is not None:  # a device thread still alive may yet fire its irqfds
            routes.close(keep_fds=any(getattr(d, "outlived_close", False)
                                      for d in getattr(self, "devices", {}).values()))
        if hasattr(self, "vm"):
            self.vm.close()
        if hasattr(self, "memory"):
            self.memory.close()
        self.kvm.close()

    def status(self) -> dict[str, Any]:
        return {"name": self.config.name, "state": self.state, "pid": os.getpid(),
                "memory": self.config.memory, "cpus": self.config.cpus,
                "exits": sum(t.exits for t in self.threads),
                "stop_reason": self.stop_reason, **self.memory.backing(),
                **{k: v for d in self.devices.values() if isinstance(d, VmGenId)
                   for k, v in d.status().items()},
                **self.snapshot_dependency()}

    def press_power_button(self) -> None:
        """The ACPI power button (pyhyvectl --powerdown)."""
        pm = next((d for d in self.devices.values() if isinstance(d, AcpiPm)), None)
        if pm is None:
            raise VmError("this VM has no ACPI power button (it comes from a snapshot of a "
                          "machine built without one)")
        pm.press_power_button()

    def inject_nmi(self) -> bool:
        """An NMI to every vCPU (QEMU's inject-nmi): Linux reports it, or panics (and
        kdumps) with kernel.unknown_nmi_panic=1. True: delivered now; False: queued in
        KVM (a paused VM's vCPUs are parked outside KVM_RUN) for when they run, and
        carried by a snapshot taken meanwhile. No pause: a hung guest's devices may not
        quiesce."""
        with self._pause_lock:
            if self.state == "paused":
                for v in self.vcpus:
                    v.nmi()
                return False
            if self.state != "running":
                raise VmError(f"VM is {self.state}")
            for t in self.threads:
                t.request_nmi()
            return True

    def announce(self) -> None:
        """Arrived by migration: devices that must tell the outside world do (a NIC's
        MAC, so peers need not wait for the guest to speak)."""
        for dev in self.devices.values():
            tell = getattr(dev, "announce", None)
            if tell is not None:
                tell()

    def save_refusal(self) -> str:
        """Why this VM cannot be saved or migrated ("" if it can)."""
        left = self.postcopy_left() if self.postcopy_left else 0
        if left:  # a save would read pages that are still on the source
            return f"its memory is still arriving by post-copy ({left} pages to go)"
        for name, dev in self.devices.items():
            why = dev.save_refusal()
            if why:
                return f"device {name}: {why}"
        return ""

    def renew_generation(self) -> None:
        """The guest's memory is a copy now (a restore, a clone): a new generation ID."""
        for dev in self.devices.values():
            if isinstance(dev, VmGenId):
                dev.renew()

    def snapshot_dependency(self) -> dict[str, object]:
        """Whether the guest still reads pages from its snapshot's memory file."""
        guard = self.memory.guard
        return guard.dependency() if guard is not None else {"depends_on_snapshot": False}


__all__ = ["EXIT_DESTROYED", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "KvmError", "MachineState",
           "RunState", "VirtualMachine", "VmConfig", "VmError", "host_memory_bytes", "open_kvm"]
