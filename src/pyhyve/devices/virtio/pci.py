"""virtio over PCI, the modern (1.x) transport: one class for every virtio device.

A virtio device is a PCI function on the host bridge (vendor 0x1AF4, device 0x1040 + type,
revision 1) with one 32-bit memory BAR laid out as below, found by the driver through
vendor capabilities (cap id 0x09) and an MSI-X capability:

    BAR0 + 0x0000  common configuration (features, status, queue registers)
    BAR0 + 0x1000  ISR status (reading it clears it and lowers INTx)
    BAR0 + 0x2000  device-specific configuration
    BAR0 + 0x3000  queue notifications, 4 bytes per queue (notify_off_multiplier 4)
    BAR0 + 0x4000  MSI-X table, BAR0 + 0x5000 its pending bits

The VMM assigns the BAR (no firmware here); a guest that moves it is followed. Queue
notifications reach the device's worker thread through ioeventfds where KVM offers them
(else as MMIO exits handed over by the vCPU thread), so requests never run on a vCPU.
Interrupts: MSI-X when the driver enabled it (an irqfd per vector where KVM offers them,
else KVM_SIGNAL_MSI), else INTx (level, on the IRQ in the interrupt line register) with
the ISR. A driver error (a broken ring) sets NEEDS_RESET and raises a configuration
interrupt; the VMM carries on. docs/devices.md says what is used on our hosts.

State (save/load_state): features, status, the queues' registers and ring positions, the
MSI-X table and pending bits, the ISR, and the device's own part. Quiesce waits until no
request is in flight: each popped request is either completed (in guest memory, in the used
ring) or not yet taken, so a snapshot never holds half a request.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence

from ..base import Device, DeviceState
from .backend import ASYNC, WAIT, Backend, VirtioState
from .doorbell import Doorbells, Register
from .layout import (
    BAR_SIZE,
    COMMON,
    COMMON_SIZE,
    DEVICE,
    DEVICE_SIZE,
    DRIVER_OK,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    FEATURES_OK,
    ISR,
    MAX_VECTORS,
    MSIX_PBA,
    MSIX_TABLE,
    NEEDS_RESET,
    NO_VECTOR,
    NOTIFY,
    NOTIFY_MULT,
    config_space,
)
from .msix import Irqfd, Msix
from .queue import Chain, Memory, QueueError, Virtqueue

SPIN_S = 50e-6  # how long the worker looks for work before it sleeps in poll(): a
# thread woken from sleep, on a host whose idle CPUs are themselves a hypervisor's to wake,
# took about 50 us more to answer a doorbell or a completion than one still running
# (measured: interrupt-driven 4 KiB reads at depth 1, 4400 -> 5900 IOPS; QEMU's iothreads
# poll the same way, poll-max-ns). Only after activity: an idle device sleeps at once.
FIRST_CHUNK = 4  # the first completions of a reap go out sooner, so a sleeping guest
# starts waking (slow here: its interrupt path is emulated kernel code) while the rest are
# completed; 4 KiB random reads, interrupt-driven, depth 16/32/64: 31/44/65K IOPS with 16
# from the start, 35/55/65K with 4 first (1, 2 and 8 first: less at depth 32)
REAP_CHUNK = 16  # completions between looks at the available ring (see _reap); of 2, 4, 8,
# 16 and 24, 16 gave the most 4 KiB random reads at depth 32 here


class VirtioPci(Device):
    kind = "virtio-pci"
    state_class = VirtioState

    def __init__(self, backend: Backend, mem: Memory, bar: int, irq: int,
                 irq_line: Callable[[int, int], None],
                 signal_msi: Callable[[int, int], bool],
                 ioeventfd: Register | None = None,
                 irqfds: Callable[[int], Sequence[Irqfd] | None] | None = None) -> None:
        super().__init__()
        self.backend, self.mem, self.irq = backend, mem, irq
        self.irq_line, self.signal_msi = irq_line, signal_msi
        self.queues = [Virtqueue(max_size=n) for n in backend.queue_sizes]
        self.nvec = min(MAX_VECTORS, len(self.queues) + 1)
        self.function, self._pci_cap, cap = config_space(
            backend.device_type, backend.class_code, len(self.queues), self.nvec, bar, irq)
        self.function.on_write = self._config_written
        self.function.on_read = self._config_read
        self.msix = Msix(self.nvec, self.function, cap, signal_msi,
                         irqfds(self.nvec) if irqfds is not None else None)
        self.bar = bar  # what the config space says
        self.decoded: int | None = bar  # where the MMIO bus has us (None: nowhere)
        # (old, new) -> whether the bus took the new place (None: stop decoding); the VM's
        self.on_bar_move: Callable[[int | None, int | None], bool] = lambda old, new: True
        self.isr = 0
        self.status = 0
        self._reset_registers()
        self._work = threading.Condition(self.lock)
        self._kicked: set[int] = set()
        self._inflight = 0  # requests taken from a ring and not yet completed
        # the worker sleeps in poll() on this, the doorbells and the backend's completions
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._resetting = False
        self._paused = True
        self._closing = False
        self.outlived_close = False  # close() gave up waiting for the worker thread
        self._thread: threading.Thread | None = None
        if hasattr(backend, "kick"):  # a backend with input of its own (console) wakes us
            backend.kick = self._backend_kick
        self.doorbells = (Doorbells(len(self.queues), ioeventfd)
                          if ioeventfd is not None else None)

    def _backend_kick(self, index: int) -> None:
        with self.lock:
            self._kick(index)

    def _config_written(self, reg: int, size: int, old: bytes) -> None:
        """A config-space write (on the host bridge's lock; ours is taken here)."""
        with self.lock:
            self._config_changed(reg, size)

    def _sync_bar(self) -> None:
        """Decode BAR0 where the config space says, while memory decoding is on; a place
        another device holds is not taken (retried at the next BAR or command write)."""
        cfg = self.function.config
        self.bar = struct.unpack_from("<I", cfg, 0x10)[0] & ~0xF
        sizing = self.bar == ~(BAR_SIZE - 1) & 0xFFFF_FFF0
        want = self.bar if cfg[0x04] & 0x02 and not sizing and self.bar else None
        if want != self.decoded:
            old, self.decoded = self.decoded, None
            if self.on_bar_move(old, want):
                self.decoded = want
        if self.doorbells is not None and not self._closing:
            self.doorbells.place(self.decoded)

    def _config_read(self, reg: int, size: int) -> None:
        """Before a config read: the PCI-config access window shows BAR0 (virtio 4.1.4.9)."""
        c, cfg = self._pci_cap, self.function.config
        if reg < c + 20 and reg + size > c + 16:
            with self.lock:
                bar, off, length = cfg[c + 4], *struct.unpack_from("<II", cfg, c + 8)
                if bar == 0 and length in (1, 2, 4):
                    cfg[c + 16:c + 20] = self.read(off, length).to_bytes(4, "little")

    def _config_changed(self, reg: int, size: int) -> None:
        cfg = self.function.config
        if (reg < 0x14 and reg + size > 0x10) or (reg < 0x06 and reg + size > 0x04):
            self._sync_bar()
        c = self._pci_cap
        if reg < c + 20 and reg + size > c + 16:  # the PCI config access window
            bar, off, length = cfg[c + 4], *struct.unpack_from("<II", cfg, c + 8)
            if bar == 0 and length in (1, 2, 4):
                data = int.from_bytes(cfg[c + 16:c + 16 + length], "little")
                self._write_bar(off, length, data)
        if reg <= self.msix.cap + 3 < reg + size:
            self.msix.deliver_pending()

    # --- BAR0 ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        try:
            return self._read_bar(offset, size)
        except Exception:  # a device bug must not reach the vCPU loop and stop the VM
            self._broken()
            return 0

    def _read_bar(self, offset: int, size: int) -> int:
        if COMMON <= offset < COMMON + COMMON_SIZE:
            return self._common_read(offset, size)
        if offset == ISR:
            v: int = self.isr
            self.isr = 0
            self.irq_line(self.irq, 0)
            return v
        if DEVICE <= offset < DEVICE + DEVICE_SIZE:
            cfg = self.backend.config()
            o = offset - DEVICE
            return int.from_bytes(cfg[o:o + size].ljust(size, b"\0"), "little")
        if MSIX_TABLE <= offset < MSIX_TABLE + len(self.msix.table):
            return self.msix.read_table(offset - MSIX_TABLE, size)
        if MSIX_PBA <= offset < MSIX_PBA + 8:
            return self.msix.read_pending(offset - MSIX_PBA, size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        try:
            self._write_bar(offset, size, value)
        except Exception:  # as in read()
            self._broken()

    def _write_bar(self, offset: int, size: int, value: int) -> None:
        if COMMON <= offset < COMMON + COMMON_SIZE:
            self._common_write(offset, size, value)
        elif NOTIFY <= offset < NOTIFY + NOTIFY_MULT * len(self.queues):
            self._kick((offset - NOTIFY) // NOTIFY_MULT)
        elif DEVICE <= offset < DEVICE + DEVICE_SIZE:
            self.backend.config_write(offset - DEVICE, value.to_bytes(size, "little"))
        elif MSIX_TABLE <= offset < MSIX_TABLE + len(self.msix.table):
            self.msix.write_table(offset - MSIX_TABLE, size, value)

    # --- common configuration -------------------------------------------------------
    def _reset_registers(self) -> None:
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = self.status = self.config_generation = self.queue_sel = 0
        self.config_vector = NO_VECTOR
        self.isr = 0
        for q in self.queues:
            q.reset()

    def offered(self) -> int:
        return self.backend.features() | F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX

    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _common_read(self, offset: int, size: int) -> int:
        q = self._queue()
        regs = {
            0x00: (4, self.device_features_sel),
            0x04: (4, (self.offered() >> (32 * self.device_features_sel)) & 0xFFFF_FFFF
                   if self.device_features_sel < 2 else 0),
            0x08: (4, self.driver_features_sel),
            0x0C: (4, (self.driver_features >> (32 * self.driver_features_sel)) & 0xFFFF_FFFF
                   if self.driver_features_sel < 2 else 0),
            0x10: (2, self.config_vector), 0x12: (2, len(self.queues)),
            0x14: (1, self.status), 0x15: (1, self.config_generation),
            0x16: (2, self.queue_sel),
            0x18: (2, q.size if q else 0), 0x1A: (2, q.vector if q else NO_VECTOR),
            0x1C: (2, int(q.ready) if q else 0), 0x1E: (2, self.queue_sel if q else 0),
            0x20: (8, q.desc if q else 0), 0x28: (8, q.avail if q else 0),
            0x30: (8, q.used if q else 0),
        }
        return _field_read(regs, offset, size)

    _WIDTHS = {0x00: 4, 0x08: 4, 0x0C: 4, 0x10: 2, 0x14: 1, 0x16: 2, 0x18: 2, 0x1A: 2,
               0x1C: 2, 0x20: 8, 0x24: 4, 0x28: 8, 0x2C: 4, 0x30: 8, 0x34: 4}

    def _common_write(self, offset: int, size: int, value: int) -> None:
        want = self._WIDTHS.get(offset)
        if want is None or (size != want and not (want == 8 and size == 4)):
            return  # a field's own width only (64-bit ones also as two 32-bit halves)
        q = self._queue()
        if offset == 0x00:
            self.device_features_sel = value
        elif offset == 0x08:
            self.driver_features_sel = value
        elif offset == 0x0C and self.driver_features_sel < 2 and not self.status & FEATURES_OK:
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (
                (value & 0xFFFF_FFFF) << shift)
        elif offset == 0x10:
            self.config_vector = value if value < self.nvec else NO_VECTOR
        elif offset == 0x14:
            self._set_status(value & 0xFF)
        elif offset == 0x16:
            self.queue_sel = value
        elif q is not None and not q.ready and offset in (0x18, 0x1A, 0x20, 0x24, 0x28, 0x2C,
                                                          0x30, 0x34):
            if offset == 0x18:
                q.size = value
            elif offset == 0x1A:
                q.vector = value if value < self.nvec else NO_VECTOR
            else:
                attr = {0x20: "desc", 0x28: "avail", 0x30: "used"}[offset & ~7]
                cur = getattr(q, attr)
                shift = 32 * ((offset & 7) // 4)
                if size == 8:
                    setattr(q, attr, value)
                else:
                    setattr(q, attr, (cur & ~(0xFFFF_FFFF << shift)) | (value << shift))
        elif q is not None and offset == 0x1A:
            q.vector = value if value < self.nvec else NO_VECTOR
        elif q is not None and offset == 0x1C and value == 1 and not q.ready:
            try:
                q.check_layout(self.mem)
            except QueueError:
                self._broken()
                return
            q.event_idx = bool(self.driver_features & F_EVENT_IDX)
            q.ready = True

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._device_reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            ok = self.driver_features & ~self.offered() == 0 and self.driver_features & F_VERSION_1
            if not ok:
                value &= ~FEATURES_OK
        self.status = value | (self.status & NEEDS_RESET)  # only a reset clears that one
        if value & DRIVER_OK:
            self._kicked.update(range(len(self.queues)))
            self._nudge()

    def _device_reset(self) -> None:
        self._resetting = True  # the worker takes no new request meanwhile
        try:
            while self._inflight:  # requests in flight finish before the queues go
                self._work.wait()
        finally:
            self._resetting = False
        self._reset_registers()
        self._kicked.clear()
        self.backend.reset()
        self.irq_line(self.irq, 0)

    def _broken(self) -> None:
        """The driver broke the protocol: NEEDS_RESET and a configuration interrupt."""
        self.status |= NEEDS_RESET
        self.config_generation = (self.config_generation + 1) & 0xFF
        self._interrupt(self.config_vector, 2)

    # --- interrupts ------------------------------------------------------------------
    def _interrupt(self, vector: int, isr_bit: int) -> None:
        """MSI-X when the driver enabled it, else INTx with the ISR bit."""
        if self.msix.enabled:
            self.msix.fire(vector, sync=self._paused)  # quiescing: in the APIC at once
            return
        self.isr |= isr_bit
        self.irq_line(self.irq, 1)

    # --- requests, on the worker thread -------------------------------------------------
    def _kick(self, index: int) -> None:
        if index < len(self.queues):
            self._kicked.add(index)
            self._nudge()

    def _nudge(self) -> None:
        """Something changed that the worker (asleep in poll) or a waiter must see."""
        self._work.notify_all()
        if self._wake >= 0:  # closed: a backend thread's late kick has nobody to wake
            os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        """The device's one thread: serves kicked queues, and otherwise sleeps in poll() on
        its wake-up eventfd, the queues' doorbells (ioeventfds: a notification wakes this
        thread straight from KVM, with no hop through another thread) and the backend's
        completions (a disk's native AIO)."""
        poller = select.poll()
        bells = self.doorbells.fds if self.doorbells is not None else []
        done_fd = getattr(self.backend, "completion_fd", None)
        for fd in [self._wake, *bells, *([done_fd] if done_fd is not None else [])]:
            poller.register(fd, select.POLLIN)
        while True:
            with self.lock:
                if self._closing:
                    return
                if not (self._paused or not self._kicked or not self.status & DRIVER_OK
                        or self.status & NEEDS_RESET):
                    index = self._kicked.pop()
                    try:
                        self._serve(index)
                    except Exception:  # never let the worker die: the device needs a reset
                        self._broken()
                    continue
            events = poller.poll(0)
            if not events and SPIN_S:  # busy-wait a little before sleeping (see SPIN_S)
                deadline = time.perf_counter() + SPIN_S
                while not events and time.perf_counter() < deadline:
                    events = poller.poll(0)
            for fd, _ in events or poller.poll():
                if fd == done_fd:
                    try:
                        self._reap()
                    except Exception:  # never let the worker die: the device needs a reset
                        with self.lock:
                            self._broken()
                    continue
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
                if fd != self._wake:
                    assert self.doorbells is not None
                    self.doorbells.rung += 1
                    with self.lock:
                        self._kicked.add(bells.index(fd))

    def _reap(self) -> None:
        """Complete the backend's finished asynchronous requests, FIRST_CHUNK and then
        REAP_CHUNK at a time, and between chunks take what the driver made available
        meanwhile. A disk tends to
        finish a whole batch at once; completing all of it before starting anything new
        left the disk idle while Python worked through it (lockstep rounds of 32 requests,
        about half of each round spent here)."""
        reap = self.backend.reap  # type: ignore[attr-defined]
        chunk = FIRST_CHUNK
        while finished := reap(self.mem, chunk):
            with self.lock:
                self._inflight -= len(finished)
                by_queue: dict[int, list[tuple[int, int]]] = {}
                for index, chain, written in finished:
                    if written < 0:
                        self._broken()
                    else:
                        by_queue.setdefault(index, []).append((chain.head, written))
                for index, done in by_queue.items():
                    self._complete_many(self.queues[index], done)
                self._work.notify_all()
                if not (self._closing or self._paused or not self.status & DRIVER_OK
                        or self.status & NEEDS_RESET):
                    for index, q in enumerate(self.queues):
                        if q.ready:
                            self._serve(index)
            if len(finished) < chunk:  # none left over: later ones signal the fd again
                return
            chunk = REAP_CHUNK

    def _serve(self, index: int) -> None:
        """Take and complete what queue `index` holds; then let the backend start what it
        batched (a disk's AIO), the lock released for it as for each request's own work."""
        try:
            self._serve_queue(index)
        finally:
            commit = getattr(self.backend, "commit", None)
            if commit is not None and not self._closing:
                self.lock.release()
                try:
                    commit()
                finally:
                    self.lock.acquire()

    def _serve_queue(self, index: int) -> None:
        q = self.queues[index]
        while not self._paused and not self._resetting and q.ready \
                and not self.status & NEEDS_RESET:
            try:
                chain = q.pop(self.mem)
            except QueueError:
                self._broken()
                return
            if chain is None:
                break
            self._inflight += 1
            self.lock.release()
            written = -1  # whatever handle() raises, the request is over and the device broken
            try:
                written = self.backend.handle(index, chain, self.mem)
            except Exception:  # a backend's bug must not wedge the device
                written = -1
            finally:
                self.lock.acquire()
                if written != ASYNC:  # else _reap completes it
                    self._inflight -= 1
                if self._paused or self._resetting:  # someone waits for what is in flight
                    self._work.notify_all()
            if written == ASYNC:
                continue
            if written == WAIT:  # nothing for it yet: back into the ring until a kick
                q.last_avail = (q.last_avail - 1) & 0xFFFF
                return
            if not self._complete(q, chain, written):
                return

    def _complete(self, q: Virtqueue, chain: Chain, written: int) -> bool:
        """Put a handled request into the used ring (under the lock); False: the device
        broke."""
        if written < 0:
            self._broken()
            return False
        return self._complete_many(q, [(chain.head, written)])

    def _complete_many(self, q: Virtqueue, done: list[tuple[int, int]]) -> bool:
        """(head, bytes written) of handled requests into the used ring, then at most one
        interrupt for them all."""
        try:
            q.push_many(self.mem, done)
            if q.should_signal(self.mem):
                self._interrupt(q.vector, 1)
        except Exception:
            self._broken()
            return False
        return True

    # --- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        begin = getattr(self.backend, "start", None)
        if begin is not None:
            begin()
        with self.lock:
            self._sync_bar()  # a restored config space may have the BAR elsewhere
            self._paused = False
            if self.status & DRIVER_OK:  # requests made before a save: look again
                self._kicked.update(range(len(self.queues)))
                if self.isr:
                    self.irq_line(self.irq, 1)
        self._thread = threading.Thread(target=self._run, name=f"virtio-{self.backend.device_type}",
                                        daemon=True)
        self._thread.start()

    def quiesce(self) -> None:
        """No request in flight when this returns; a disk's writes are on stable storage
        (the destination of a migration may open the same image next)."""
        with self.lock:
            self._paused = True
            while self._inflight:
                self._work.wait()
        flush = getattr(self.backend, "flush", None)
        if flush is not None:
            flush()

    def wake(self) -> None:
        with self.lock:
            self._paused = False
            if self.status & DRIVER_OK:
                self._kicked.update(range(len(self.queues)))
            self._nudge()

    def close(self) -> None:
        with self.lock:  # no BAR move can place the doorbells again after this
            self._closing = True
            self._paused = True
            self._nudge()
        if self.doorbells is not None:
            self.doorbells.place(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)
            if self._thread.is_alive():  # still inside host I/O: closing its fds under it
                self.outlived_close = True  # could send its writes to another file; leave
                return  # them (and its irqfds: the VM sees this) to exit
        if self.doorbells is not None:
            self.doorbells.release()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        for q in self.queues:
            q.forget()  # the ring views: guest RAM can be unmapped now
        with self.lock:  # kicks take the lock: none is writing to it after this
            wake, self._wake = self._wake, -1
        os.close(wake)

    # --- state ----------------------------------------------------------------------------
    def announce(self) -> None:
        """The guest just arrived by live migration (net: tell the network)."""
        tell = getattr(self.backend, "announce", None)
        if tell is not None:
            tell()

    def save_refusal(self) -> str:
        refusal = getattr(self.backend, "save_refusal", None)
        return str(refusal()) if refusal is not None else ""

    def save(self) -> VirtioState:
        own = getattr(self.backend, "state", None)
        return self.transport_state(own() if own is not None else b"")

    def load_state(self, state: DeviceState) -> None:
        if not isinstance(state, VirtioState):
            raise ValueError(f"{self.kind}: wrong state type")
        own = getattr(self.backend, "load", None)
        if own is not None:
            own(state.device)
        elif state.device:
            raise ValueError(f"{self.kind}: saved device state this device does not have")
        self.load_transport(state)

    def transport_state(self, device: bytes) -> VirtioState:
        return VirtioState(
            self.device_features_sel, self.driver_features_sel, self.driver_features,
            self.status, self.config_generation, self.config_vector, self.queue_sel,
            tuple((q.size, int(q.ready), q.desc, q.avail, q.used, q.vector, q.last_avail,
                   q.next_used, q.signalled_used) for q in self.queues),
            bytes(self.msix.table), self.msix.pending, self.isr, device)

    def load_transport(self, st: VirtioState) -> None:
        if len(st.queues) != len(self.queues) or len(st.msix_table) != len(self.msix.table):
            raise ValueError(f"{self.kind}: saved state has {len(st.queues)} queues and "
                             f"{len(st.msix_table) // 16} MSI-X vectors, this device "
                             f"{len(self.queues)} and {self.nvec}")
        self.device_features_sel, self.driver_features_sel = st.device_features_sel, \
            st.driver_features_sel
        self.driver_features, self.status = st.driver_features, st.status & 0xFF
        self.config_generation, self.config_vector = st.config_generation & 0xFF, \
            st.config_vector & 0xFFFF
        self.queue_sel = st.queue_sel & 0xFFFF
        for q, row in zip(self.queues, st.queues, strict=True):
            if len(row) != 9:
                raise ValueError(f"{self.kind}: bad queue state")
            size, ready, q.desc, q.avail, q.used, vector, last, nxt, sig = row
            q.size, q.ready, q.vector = size, bool(ready), vector & 0xFFFF
            q.last_avail, q.next_used, q.signalled_used = last & 0xFFFF, nxt & 0xFFFF, \
                sig & 0xFFFF
            q.event_idx = bool(self.driver_features & F_EVENT_IDX)
            if q.ready:
                try:
                    q.check_layout(self.mem)
                except QueueError as e:
                    raise ValueError(f"{self.kind}: saved queue is not valid here: {e}") from None
        self.msix.load(st.msix_table, st.msix_pending)
        self.isr = st.isr & 3
        self.bar = struct.unpack_from("<I", self.function.config, 0x10)[0] & ~0xF
        # (where it is decoded is settled in start(), once the PCI config space is back)


def _field_read(regs: dict[int, tuple[int, int]], offset: int, size: int) -> int:
    """Read `size` bytes at `offset` out of registers {offset: (width, value)}."""
    out = 0
    for i in range(size):
        o = offset + i
        for start, (width, value) in regs.items():
            if start <= o < start + width:
                out |= ((value >> (8 * (o - start))) & 0xFF) << (8 * i)
                break
    return out
