"""The PC's CMOS real-time clock (MC146818) at ports 0x70 (index) / 0x71 (data): the
wall-clock time an OS reads at boot (Linux's rtc-cmos with RTC_HCTOSYS), and 128 bytes of
CMOS RAM.

The clock is the host's UTC plus an offset the guest sets by writing the time registers,
so a guest restored or migrated later reads the right time, as a PC's battery-backed
clock kept counting. Register B says 24-hour, BCD or binary as the guest chooses; UIP
never shows (the registers are always consistent). No alarm, periodic or update
interrupts: register C reads 0, and nothing drives IRQ 8.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import ClassVar

from .base import Device, DeviceState

SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR = 0, 2, 4, 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
B_24H, B_BINARY, B_SET = 0x02, 0x04, 0x80
D_VRT = 0x80                                  # valid RAM and time
TIME_REGS = (SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR, CENTURY)
MAX_OFFSET = 200 * 366 * 86400                # a guest may set any time in 1900-2199


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


@dataclass(frozen=True)
class RtcState(DeviceState):
    NAME: ClassVar[str] = "CmosRtcState"
    index: int = 0
    offset: int = 0                           # guest time - host UTC, seconds
    ram: bytes = b""                          # the 128 CMOS bytes (time registers aside)


class CmosRtc(Device):
    kind = "cmos-rtc"
    state_class = RtcState

    def __init__(self, now: float | None = None) -> None:
        super().__init__()
        self.index = 0
        self.offset = 0
        self.ram = bytearray(128)
        self.ram[REG_A] = 0x26                # 32.768 kHz time base, 1024 Hz rate
        self.ram[REG_B] = B_24H
        self.ram[REG_D] = D_VRT
        self._pending: dict[int, int] = {}   # time fields written while SET is on
        self._now = now                       # tests: a fixed host time

    def _host(self) -> float:
        return self._now if self._now is not None else time.time()

    def _time(self) -> dt.datetime:
        t = int(self._host()) + self.offset
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=t)

    def _encode(self, v: int) -> int:
        return v if self.ram[REG_B] & B_BINARY else _bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.ram[REG_B] & B_BINARY else _unbcd(v)

    def _read_reg(self, reg: int) -> int:
        if reg in TIME_REGS:
            return self._time_field(reg, self._time())
        if reg == REG_C:
            return 0
        return self.ram[reg]

    def _time_field(self, reg: int, t: dt.datetime) -> int:
        if reg == HOUR and not self.ram[REG_B] & B_24H:    # 12-hour mode: bit 7 is PM
            return self._encode(t.hour % 12 or 12) | (0x80 if t.hour >= 12 else 0)
        value = {SEC: t.second, MIN: t.minute, HOUR: t.hour, WDAY: t.isoweekday() % 7 + 1,
                 MDAY: t.day, MONTH: t.month, YEAR: t.year % 100,
                 CENTURY: t.year // 100}[reg]
        return self._encode(value)

    def _write_time(self, reg: int, value: int) -> None:
        """A guest setting the clock: while register B's SET bit is on (how OSes set it)
        the fields are only collected; clearing SET (or a write without it) turns them
        into an offset from host time, all at once, so a date is never checked half
        written (February 15 written over March 31, field by field)."""
        self._pending[reg] = value
        if not self.ram[REG_B] & B_SET:
            self._commit()

    def _commit(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        t = self._time()
        fields = {"second": t.second, "minute": t.minute, "hour": t.hour, "day": t.day,
                  "month": t.month, "year": t.year}
        for reg, value in sorted(pending.items(), key=lambda kv: kv[0] == YEAR):
            self._set_field(fields, reg, value)
        try:
            new = dt.datetime(tzinfo=dt.UTC, **fields)
        except ValueError:                   # an impossible date: keep the old time
            return
        offset = int(new.timestamp()) - int(self._host())
        if abs(offset) <= MAX_OFFSET:
            self.offset = offset

    def _set_field(self, fields: dict[str, int], reg: int, value: int) -> None:
        v = self._decode(value & 0x7F if reg == HOUR else value)
        name = {SEC: "second", MIN: "minute", HOUR: "hour", MDAY: "day", MONTH: "month",
                YEAR: "year", CENTURY: "year"}.get(reg)
        if name is None:
            return
        if reg == YEAR:
            v = fields["year"] // 100 * 100 + v
        elif reg == CENTURY:
            v = v * 100 + fields["year"] % 100
        elif reg == HOUR and not self.ram[REG_B] & B_24H:
            v = v % 12 + (12 if value & 0x80 else 0)
        fields[name] = v

    # the bus holds self.lock around read() and write()
    def read(self, offset: int, size: int) -> int:
        return self._read_reg(self.index) if offset == 1 else 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F         # bit 7 is the NMI mask, not ours
        elif offset == 1:
            reg, value = self.index, value & 0xFF
            if reg in TIME_REGS and reg != WDAY:
                self._write_time(reg, value)
            elif reg == REG_A:
                self.ram[REG_A] = value & 0x7F         # UIP is read-only
            elif reg == REG_B:
                self.ram[REG_B] = value
                if not value & B_SET:
                    self._commit()
            elif reg == WDAY or reg > REG_D:
                self.ram[reg] = value

    def save(self) -> RtcState:
        return RtcState(self.index, self.offset, bytes(self.ram))

    def load_state(self, state: DeviceState) -> None:
        if not isinstance(state, RtcState) or len(state.ram) != 128 \
                or not 0 <= state.index < 128 or abs(state.offset) > MAX_OFFSET:
            raise ValueError("cmos-rtc: bad state")
        self.index, self.offset, self.ram = state.index, state.offset, bytearray(state.ram)
        self.ram[REG_A] &= 0x7F                # UIP is never set here
        self.ram[REG_B] &= ~B_SET              # a half-set time was not kept
        self.ram[REG_D] = D_VRT
