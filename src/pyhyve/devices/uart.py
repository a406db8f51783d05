"""16550A UART, complete enough for Linux's 8250 driver (autoconfig, FIFO, loopback, IRQs).

Transmission is instantaneous: THR is always empty again by the time the guest looks, so
the guest never waits on us. Received bytes wait in a bounded buffer and are presented
through RBR/LSR.DR one at a time, interrupting when IER asks for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .base import Device, DeviceState
from .console import Console

# register offsets
RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_DR, LSR_OE, LSR_BI, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x10, 0x20, 0x40
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NONE, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_FIFO = 0x01, 0x00, 0x02, 0x04, 0x06, 0xC0
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
RX_LIMIT = 64 * 1024  # bytes buffered from the host side before input is dropped


@dataclass(frozen=True)
class UartState(DeviceState):
    NAME: ClassVar[str] = "UartState"
    dll: int = 0x0C  # 9600 baud
    dlm: int = 0
    ier: int = 0
    lcr: int = 0x03
    mcr: int = MCR_OUT2
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = MSR_CTS | MSR_DSR | MSR_DCD
    scr: int = 0
    fcr: int = 0
    thr_ipending: bool = False
    rx: bytes = b""


class Uart(Device):
    kind = "uart16550"
    state_class = UartState
    PORT_COM1, IRQ_COM1 = 0x3F8, 4

    def __init__(self, console: Console, irq: Callable[[int], None]) -> None:
        super().__init__()
        self.console, self.irq = console, irq
        self._set(UartState())
        self._irq_level = 0

    def start(self) -> None:
        """Input may reach the guest from now on: a restored state is already in. (No
        quiesce: bytes typed while the VM is paused go into the bounded, saved RX FIFO, so
        a suspend or migration keeps them; a save captures the FIFO under the lock.)"""
        self.console.start_input(self.receive)

    def _set(self, s: UartState) -> None:
        self.dll, self.dlm, self.ier, self.lcr = s.dll, s.dlm, s.ier, s.lcr
        self.mcr, self.lsr, self.msr, self.scr, self.fcr = s.mcr, s.lsr, s.msr, s.scr, s.fcr
        self.thr_ipending = s.thr_ipending
        self.rx: deque[int] = deque(s.rx[:RX_LIMIT])
        self.lsr = (self.lsr & ~LSR_DR) | (LSR_DR if self.rx else 0)

    def save(self) -> UartState:
        return UartState(self.dll, self.dlm, self.ier, self.lcr, self.mcr, self.lsr,
                         self.msr, self.scr, self.fcr, self.thr_ipending, bytes(self.rx))

    def load_state(self, state: DeviceState) -> None:
        if not isinstance(state, UartState):
            raise ValueError("uart: wrong state type")
        with self.lock:
            self._set(state)
            self._update_irq()

    # --- host side -------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes typed at the console; called from the console's thread."""
        with self.lock:
            room = RX_LIMIT - len(self.rx)
            if len(data) > room:
                self.lsr |= LSR_OE
                data = data[:room]
            self.rx.extend(data)
            if self.rx:
                self.lsr |= LSR_DR
            self._update_irq()

    # --- interrupt logic ----------------------------------------------------------------
    def _iir(self) -> int:
        if self.ier & IER_RLSI and self.lsr & (LSR_OE | LSR_BI):
            iid = IIR_RLSI
        elif self.ier & IER_RDI and self.lsr & LSR_DR:
            iid = IIR_RDI
        elif self.ier & IER_THRI and self.thr_ipending:
            iid = IIR_THRI
        elif self.ier & IER_MSI and self.msr & 0x0F:
            iid = IIR_MSI
        else:
            iid = IIR_NONE
        return iid | (IIR_FIFO if self.fcr & 1 else 0)

    def _update_irq(self) -> None:
        # OUT2 gates the interrupt line on PC serial ports; Linux relies on it.
        level = 1 if (self._iir() & 0x0F) != IIR_NONE and self.mcr & MCR_OUT2 else 0
        if level != self._irq_level:
            self._irq_level = level
            self.irq(level)

    def _loop_msr(self) -> int:
        m = self.mcr
        return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))

    # --- guest side -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == RBR_THR:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            if not self.rx:
                self.lsr &= ~LSR_DR
            self._update_irq()
            return value
        if offset == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self.thr_ipending = False
                self._update_irq()
            return iir
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = self.lsr
            if self.lsr & (LSR_OE | LSR_BI):
                self.lsr &= ~(LSR_OE | LSR_BI)
                self._update_irq()
            return value
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                return self._loop_msr()
            value = self.msr
            self.msr &= 0xF0  # delta bits clear on read
            self._update_irq()
            return value
        return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == RBR_THR:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                if len(self.rx) < RX_LIMIT:
                    self.rx.append(value)
                    self.lsr |= LSR_DR
            else:
                self.console.write(bytes((value,)))
            self.thr_ipending = True  # THR drained at once
            self.lsr |= LSR_THRE | LSR_TEMT
            self._update_irq()
        elif offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            enabling_thri = value & IER_THRI and not self.ier & IER_THRI
            self.ier = value & 0x0F
            if enabling_thri and self.lsr & LSR_THRE:
                self.thr_ipending = True
            self._update_irq()
        elif offset == IIR_FCR:
            if value & 0x02:  # clear RX FIFO
                self.rx.clear()
                self.lsr &= ~LSR_DR
            self.fcr = value & 0xC9
            self._update_irq()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
            self._update_irq()
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only

    def close(self) -> None:
        self.console.close()
