"""One thread per vCPU: the KVM_RUN loop, exit dispatch, and the pause handshake.

Pausing is race-free: the controller sets `kvm_run.immediate_exit` and signals the thread.
Before parking, the thread runs KVM_RUN once more with immediate_exit set; KVM completes
any port or MMIO access still in flight (complete_userspace_io) and returns at once, so
a paused vCPU is always between instructions and its state can be read and saved.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import errno
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..kvm import Vcpu
from ..kvm import ioctls as I
from ..kvm.api import run_ioctl
from ..kvm.structs import KvmRun

if TYPE_CHECKING:
    from ..devices.base import Bus

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """A no-op handler, so the kick signal interrupts KVM_RUN instead of killing us.
    Python installs handlers only from the main thread: whoever builds VMs on other
    threads (a migration destination) calls this first, from the main thread."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("pyhyve's vCPU kick handler must be installed from the main "
                               "thread first (install_kick_handler)")
        signal.signal(KICK_SIGNAL, lambda *_: None)


class VcpuThread:
    """Runs one vCPU. `control` is shared by all vCPUs of a VM (pause/stop requests)."""

    def __init__(self, vcpu: Vcpu, control: VcpuControl, pio: Bus, mmio: Bus) -> None:
        self.vcpu, self.control, self.pio, self.mmio = vcpu, control, pio, mmio
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.index}", daemon=True)
        self.exits = 0
        self.nmi_requested = False

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        self.vcpu.run.immediate_exit = 1
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(ident, KICK_SIGNAL)

    def request_nmi(self) -> None:
        """Queue an NMI from this thread, between two KVM_RUNs (KVM takes a vCPU's ioctls
        only outside KVM_RUN, and a halted guest may stay inside it for long)."""
        self.nmi_requested = True
        self.kick()

    def _take_nmi(self) -> None:
        if self.nmi_requested:
            self.nmi_requested = False
            self.vcpu.nmi()

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug or a KVM failure: stop the VM, say why
            self.control.stop(f"vcpu{self.vcpu.index}: {type(e).__name__}: {e}", 1)
        finally:
            self.control.thread_exited()

    def _loop(self) -> None:
        vcpu, ctl = self.vcpu, self.control
        run, fd = vcpu.run, vcpu.fd
        while True:
            if ctl.pause_requested or ctl.stopping:
                run.immediate_exit = 1
                run_ioctl(fd)  # completes in-flight I/O, returns -EINTR
                run.immediate_exit = 0
                self._take_nmi()  # into KVM before parking: a capture meanwhile has it
                if not ctl.park():
                    return
                continue
            if run.immediate_exit:  # kicked: throttling, an NMI, a pause that was withdrawn
                run.immediate_exit = 0
                self._take_nmi()
                if ctl.throttle > 0:
                    ctl.throttle_sleep()
                continue
            ret = run_ioctl(fd)
            if ret < 0:
                if ret in (-errno.EINTR, -errno.EAGAIN):
                    continue
                self._run_failed(ret)
                return
            self.exits += 1
            reason = run.exit_reason
            if reason == I.KVM_EXIT_IO:  # the hot exits, handled inline
                self._io(run)
            elif reason == I.KVM_EXIT_MMIO:
                self._mmio(run)
            elif reason != I.KVM_EXIT_INTR:
                self._other_exit(run, reason)

    def _run_failed(self, ret: int) -> None:
        if ret == -errno.EFAULT:  # e.g. a mapped file shrank under the guest
            self.control.stop(f"vcpu{self.vcpu.index}: guest memory became unreadable (EFAULT); "
                              "the guest was stopped rather than run on missing memory", 1)
            return
        raise OSError(-ret, f"KVM_RUN failed: {errno.errorcode.get(-ret, -ret)}")

    def _other_exit(self, run: KvmRun, reason: int) -> None:
        """Exits that end or report something: each stops the VM with its reason."""
        ctl, n = self.control, self.vcpu.index
        if reason == I.KVM_EXIT_HLT:
            ctl.stop(f"vcpu{n} halted with no interrupt controller", 0)
        elif reason == I.KVM_EXIT_SHUTDOWN:
            rip = self.vcpu.get_regs().rip
            insn = self.instruction_bytes(rip).hex(" ") or "unreadable"
            ctl.stop(f"guest shut down (triple fault) on vcpu{n} at rip={rip:#x}, "
                     f"instruction bytes: {insn}", 1)
        elif reason == I.KVM_EXIT_SYSTEM_EVENT:
            kind = run.u.system_event.type
            if kind == I.KVM_SYSTEM_EVENT_RESET:
                ctl.stop("guest requested a reset", 0, reset=True)
            elif kind == I.KVM_SYSTEM_EVENT_SHUTDOWN:
                ctl.stop("guest powered off", 0)
            else:
                ctl.stop(f"guest system event {kind} on vcpu{n}", 1)
        elif reason == I.KVM_EXIT_INTERNAL_ERROR:
            self._internal_error(run)
        elif reason == I.KVM_EXIT_FAIL_ENTRY:
            ctl.stop(f"vcpu{n}: VM entry failed, hardware reason "
                     f"{run.u.fail_entry.hardware_entry_failure_reason:#x}", 1)
        else:
            name = I.EXIT_NAMES.get(reason, str(reason))
            ctl.stop(f"vcpu{n}: unhandled exit {name} at rip={self.vcpu.get_regs().rip:#x}", 1)

    def _io(self, run: KvmRun) -> None:
        io = run.u.io
        size, port, count = io.size, io.port, io.count
        base = self.vcpu.run_addr + io.data_offset
        if io.direction == I.KVM_EXIT_IO_OUT:
            data = C.string_at(base, size * count)
            if count == 1:
                self.pio.write(port, size, int.from_bytes(data, "little"))
                return
            for i in range(count):
                self.pio.write(port, size, int.from_bytes(data[i * size:(i + 1) * size], "little"))
        else:
            out = b"".join(self.pio.read(port, size).to_bytes(size, "little")
                           for _ in range(count))
            C.memmove(base, out, len(out))

    def _mmio(self, run: KvmRun) -> None:
        m = run.u.mmio
        n = m.len
        if m.is_write:
            self.mmio.write(m.phys_addr, n, int.from_bytes(bytes(m.data[:n]), "little"))
        else:
            v = self.mmio.read(m.phys_addr, n)
            m.data[:n] = list(v.to_bytes(n, "little"))

    def _internal_error(self, run: KvmRun) -> None:
        ie = run.u.internal
        regs = self.vcpu.get_regs()
        insn = self.instruction_bytes(regs.rip)
        if ie.suberror == I.KVM_INTERNAL_ERROR_EMULATION and insn[:1] == b"\xcc":
            # The software back end cannot emulate int3 at CPL0 (platform.md): deliver the
            # #BP the instruction would have raised, as a trap after the 0xCC.
            regs.rip += 1
            self.vcpu.set_regs(regs)
            ev = self.vcpu.get_vcpu_events()
            ev.exception.injected, ev.exception.nr = 1, 3
            ev.exception.has_error_code, ev.exception.pending = 0, 0
            ev.flags = 0
            self.vcpu.set_vcpu_events(ev)
            return
        what = "emulation failure" if ie.suberror == 1 else f"internal error {ie.suberror}"
        self.control.stop(f"vcpu{self.vcpu.index}: KVM_EXIT_INTERNAL_ERROR ({what}) at "
                          f"rip={regs.rip:#x}, instruction bytes: {insn.hex(' ') or 'unreadable'}", 1)

    def instruction_bytes(self, rip: int, n: int = 15) -> bytes:
        try:
            sregs = self.vcpu.get_sregs()
            t = self.vcpu.translate(sregs.cs.base + rip)
            if not t.valid:
                return b""
            return self.control.read_guest(t.physical_address, n)
        except (OSError, ValueError):
            return b""


class VcpuControl:
    """Pause/resume/stop shared by a VM's vCPU threads."""

    def __init__(self, read_guest: Callable[[int, int], bytes],
                 on_stop: Callable[[str, int, bool], None]) -> None:
        self.read_guest = read_guest
        self._on_stop = on_stop
        self.cond = threading.Condition()
        self.pause_requested = False
        self.stopping = False
        self.parked = 0
        self.alive = 0
        self.throttle = 0.0  # fraction of time vCPUs sit out (auto-converge)
        self._ticker: threading.Thread | None = None

    THROTTLE_SLICE = 0.010  # seconds of running between throttle sleeps

    def set_throttle(self, fraction: float, tick: Callable[[], bool]) -> None:
        """Set the share of time vCPUs sit out; while it is above 0 a ticker calls `tick`
        (which kicks running vCPUs) every slice, until `tick` returns False."""
        with self.cond:
            self.throttle = max(0.0, min(0.99, fraction))
            self.cond.notify_all()
            if self.throttle == 0 or self._ticker is not None:
                return
            self._ticker = ticker = threading.Thread(target=self._tick, args=(tick,),
                                                     name="throttle", daemon=True)
        ticker.start()

    def _tick(self, tick: Callable[[], bool]) -> None:
        while not self.stopping:
            time.sleep(self.THROTTLE_SLICE)
            if self.throttle > 0 and not tick():
                return

    def throttle_sleep(self) -> None:
        """Sit out throttle/(1-throttle) slices; a pause or stop ends the sleep early."""
        p = min(self.throttle, 0.99)
        with self.cond:
            if not (self.pause_requested or self.stopping):
                self.cond.wait(self.THROTTLE_SLICE * p / (1 - p))

    def park(self) -> bool:
        """Called by a vCPU thread; returns False when the thread should exit."""
        with self.cond:
            self.parked += 1
            self.cond.notify_all()
            while self.pause_requested and not self.stopping:
                self.cond.wait()
            self.parked -= 1
            return not self.stopping

    def stop(self, reason: str, code: int, reset: bool = False) -> None:
        with self.cond:
            first = not self.stopping
            self.stopping = True
            self.cond.notify_all()
        if first:
            self._on_stop(reason, code, reset)

    def thread_exited(self) -> None:
        with self.cond:
            self.alive -= 1
            self.cond.notify_all()
