"""ACPI fixed-hardware power management: the PM1a event and control blocks, the SCI, and
the power button behind `pyhyvectl --powerdown`.

Ports (FADT PM1a_EVT_BLK / PM1a_CNT_BLK, boot/acpi.py), at description.ACPI_PM_BASE:
    +0  PM1a_STS (16 bits, write 1 to clear): PWRBTN_STS (bit 8)
    +2  PM1a_EN  (16 bits): PWRBTN_EN (bit 8)
    +4  PM1a_CNT (16 bits): SCI_EN (bit 0, always set: no SMI firmware, ACPI mode from the
        start), SLP_TYP (bits 10-12), SLP_EN (bit 13, write-only)
The SCI is a level-triggered interrupt line: high while a status bit is set whose enable
bit is set. Writing SLP_EN with SLP_TYP = 5 (the DSDT's \\_S5) powers the VM off, as a
PC's chipset does; other sleep states are not offered (no \\_S1-\\_S4 in the DSDT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .base import Device, DeviceState

PM1_STS, PM1_EN, PM1_CNT = 0, 2, 4
TMR, GBL, PWRBTN, SLPBTN, RTC = 1 << 0, 1 << 5, 1 << 8, 1 << 9, 1 << 10
# the fixed events whose enable bits an OS sets and reads back (ACPICA checks); only the
# power button ever raises its status here
EVENT_BITS = TMR | GBL | PWRBTN | SLPBTN | RTC
SCI_EN = 1 << 0
SLP_TYP_SHIFT, SLP_TYP_MASK, SLP_EN = 10, 0x7 << 10, 1 << 13
SLP_TYP_S5 = 5
LENGTH = 6


@dataclass(frozen=True)
class AcpiPmState(DeviceState):
    NAME: ClassVar[str] = "AcpiPmState"
    status: int = 0
    enable: int = 0
    control: int = SCI_EN


class AcpiPm(Device):
    kind = "acpi-pm"
    state_class = AcpiPmState

    def __init__(self, sci: Callable[[int], None], power_off: Callable[[], None]) -> None:
        super().__init__()
        self._sci = sci
        self._power_off = power_off
        self.status, self.enable, self.control = 0, 0, SCI_EN

    def _update_sci(self) -> None:
        self._sci(1 if self.status & self.enable else 0)

    def press_power_button(self) -> None:
        """The ACPI power button: the guest's OS decides what to do (Linux: an input event
        that its init turns into a clean power-off)."""
        with self.lock:
            self.status |= PWRBTN
            self._update_sci()

    def read(self, offset: int, size: int) -> int:
        regs = self.status.to_bytes(2, "little") + self.enable.to_bytes(2, "little") + \
            self.control.to_bytes(2, "little")
        if offset + size > LENGTH:
            return (1 << (8 * size)) - 1
        return int.from_bytes(regs[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        # the bus holds self.lock around read() and write()
        for i in range(size):               # byte by byte: any access width works
            self._write_byte(offset + i, value >> (8 * i) & 0xFF)
        off = False
        if self.control & SLP_EN:
            self.control &= ~SLP_EN
            off = (self.control & SLP_TYP_MASK) >> SLP_TYP_SHIFT == SLP_TYP_S5
        self._update_sci()
        if off:
            self._power_off()

    def _write_byte(self, at: int, byte: int) -> None:
        if at in (PM1_STS, PM1_STS + 1):
            self.status &= ~((byte << (8 * (at - PM1_STS))) & EVENT_BITS)
        elif at in (PM1_EN, PM1_EN + 1):
            shift = 8 * (at - PM1_EN)
            self.enable = (self.enable & ~(0xFF << shift) | byte << shift) & EVENT_BITS
        elif at in (PM1_CNT, PM1_CNT + 1):
            shift = 8 * (at - PM1_CNT)
            self.control = (self.control & ~(0xFF << shift) | byte << shift) & \
                (SLP_TYP_MASK | SLP_EN) | SCI_EN

    def save(self) -> AcpiPmState:
        return AcpiPmState(self.status, self.enable, self.control)

    def load_state(self, state: DeviceState) -> None:
        if not isinstance(state, AcpiPmState) or any(
                not isinstance(v, int) or not 0 <= v < 1 << 16
                for v in (state.status, state.enable, state.control)):
            raise ValueError("acpi-pm: bad state")
        self.status = state.status & EVENT_BITS
        self.enable = state.enable & EVENT_BITS
        self.control = state.control & SLP_TYP_MASK | SCI_EN
        self._update_sci()

    def status_info(self) -> dict[str, str]:
        return {"acpi_power_button": "pressed" if self.status & PWRBTN else "idle"}
