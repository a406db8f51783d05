"""The 16550A model, driven the way Linux's 8250 driver drives it."""

from pyhyve.devices import uart as U
from pyhyve.devices.console import Console


class Sink(Console):
    def __init__(self):
        super().__init__()
        self.out = bytearray()

    def write(self, data):
        self.out += data


def make():
    levels = []
    con = Sink()
    return U.Uart(con, levels.append), con, levels


def test_transmit_and_lsr():
    u, con, _ = make()
    assert u.read(U.LSR, 1) & (U.LSR_THRE | U.LSR_TEMT) == U.LSR_THRE | U.LSR_TEMT
    for b in b"hi\n":
        u.write(U.RBR_THR, 1, b)
    assert bytes(con.out) == b"hi\n"


def test_divisor_latch():
    u, con, _ = make()
    u.write(U.LCR, 1, 0x83)  # DLAB
    u.write(U.RBR_THR, 1, 0x01)
    u.write(U.IER, 1, 0x00)
    assert (u.read(U.RBR_THR, 1), u.read(U.IER, 1)) == (1, 0)
    u.write(U.LCR, 1, 0x03)
    assert con.out == b""  # divisor writes are not data
    assert u.read(U.LCR, 1) == 3


def test_scratch_and_fifo_detection():
    u, _, _ = make()
    u.write(U.SCR, 1, 0xA5)
    assert u.read(U.SCR, 1) == 0xA5
    u.write(U.IIR_FCR, 1, 0x01)  # enable FIFO: a 16550A answers with IIR bits 7:6 set
    assert u.read(U.IIR_FCR, 1) & 0xC0 == 0xC0
    u.write(U.IIR_FCR, 1, 0x00)
    assert u.read(U.IIR_FCR, 1) & 0xC0 == 0


def test_loopback_as_linux_autoconfig_checks_it():
    u, con, _ = make()
    u.write(U.MCR, 1, U.MCR_LOOP | 0x0A)  # loop + OUT2 + RTS
    assert u.read(U.MSR, 1) & 0xF0 == 0x90  # DCD + CTS
    u.write(U.RBR_THR, 1, 0x5A)
    assert u.read(U.LSR, 1) & U.LSR_DR
    assert u.read(U.RBR_THR, 1) == 0x5A
    assert con.out == b""


def test_receive_raises_and_clears_irq():
    u, _, levels = make()
    u.write(U.MCR, 1, U.MCR_OUT2)
    u.write(U.IER, 1, U.IER_RDI)
    assert levels == []
    u.receive(b"ab")
    assert levels == [1]
    assert u.read(U.IIR_FCR, 1) & 0x0F == U.IIR_RDI
    assert u.read(U.RBR_THR, 1) == ord("a")
    assert u.read(U.RBR_THR, 1) == ord("b")
    assert levels == [1, 0]
    assert not u.read(U.LSR, 1) & U.LSR_DR


def test_thre_interrupt_cleared_by_iir_read():
    u, _, levels = make()
    u.write(U.MCR, 1, U.MCR_OUT2)
    u.write(U.IER, 1, U.IER_THRI)  # enabling THRI with THR empty interrupts at once
    assert levels == [1]
    assert u.read(U.IIR_FCR, 1) & 0x0F == U.IIR_THRI
    assert levels == [1, 0]
    assert u.read(U.IIR_FCR, 1) & 0x0F == U.IIR_NONE
    u.write(U.RBR_THR, 1, ord("x"))
    assert levels == [1, 0, 1]


def test_out2_gates_the_line():
    u, _, levels = make()
    u.write(U.MCR, 1, 0)
    u.write(U.IER, 1, U.IER_RDI)
    u.receive(b"x")
    assert levels == []
    u.write(U.MCR, 1, U.MCR_OUT2)
    assert levels == [1]


def test_overrun_is_bounded_and_reported():
    u, _, _ = make()
    u.receive(b"x" * (U.RX_LIMIT + 10))
    assert len(u.rx) == U.RX_LIMIT
    assert u.read(U.LSR, 1) & U.LSR_OE
    assert not u.read(U.LSR, 1) & U.LSR_OE  # cleared on read


def test_save_and_load_state():
    u, _, _ = make()
    u.write(U.LCR, 1, 0x1B)
    u.write(U.SCR, 1, 7)
    u.write(U.MCR, 1, U.MCR_OUT2)
    u.write(U.IER, 1, U.IER_RDI)
    u.receive(b"pending")
    st = u.save()
    v, _, levels = make()
    v.load_state(st)
    assert v.save() == st
    assert levels == [1]
    assert bytes(v.read(U.RBR_THR, 1) for _ in range(7)) == b"pending"
