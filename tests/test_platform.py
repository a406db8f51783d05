"""What Linux finds of the machine: MP and ACPI tables, the ACPI PM block with its power
button and SCI, the CMOS RTC, and the clock a continuing guest is given. No KVM needed."""

from __future__ import annotations

import datetime as dt
import struct

import pytest

from pyhyve.boot.acpi import RSDP_ADDR, acpi_tables
from pyhyve.boot.mptable import MP_ADDR, mp_table
from pyhyve.devices.acpipm import PWRBTN, AcpiPm, AcpiPmState
from pyhyve.devices.rtc import CmosRtc, RtcState
from pyhyve.machine.state import elapsed_since
from pyhyve.pipeline import codec


def test_mp_table_checksums_and_cpus() -> None:
    for cpus in (1, 2, 8):
        t = mp_table(cpus)
        assert t[:4] == b"_MP_" and sum(t[:16]) & 0xFF == 0
        addr = struct.unpack_from("<I", t, 4)[0]
        body = t[addr - MP_ADDR:]
        length, = struct.unpack_from("<H", body, 4)
        assert body[:4] == b"PCMP" and sum(body[:length]) & 0xFF == 0
        count, = struct.unpack_from("<H", body, 34)
        at, cpu_ids, bsp = 44, [], []
        for _ in range(count):
            kind = body[at]
            if kind == 0:
                cpu_ids.append(body[at + 1])
                bsp.append(bool(body[at + 3] & 2))
            at += 20 if kind == 0 else 8
        assert at == length
        assert cpu_ids == list(range(cpus)) and bsp == [True] + [False] * (cpus - 1)
    with pytest.raises(ValueError):
        mp_table(0)


def _mp_entries(t: bytes) -> tuple[dict[int, bytes], list[tuple[int, ...]]]:
    """The MP table's buses (id -> type) and I/O interrupt entries (type, flags, bus,
    source IRQ, IOAPIC, pin)."""
    body = t[struct.unpack_from("<I", t, 4)[0] - MP_ADDR:]
    count, = struct.unpack_from("<H", body, 34)
    at, buses, ints = 44, {}, []
    for _ in range(count):
        kind = body[at]
        if kind == 1:
            buses[body[at + 1]] = body[at + 2:at + 8]
        elif kind == 3:
            ints.append(struct.unpack_from("<BHBBBB", body, at + 1))
        at += 20 if kind == 0 else 8
    return buses, ints


def test_mp_table_routes_each_pci_intx_level_triggered() -> None:
    """Linux matches an entry's bus to the PCI bus number: PCI is bus 0. Each device's
    INTA# reaches its own pin, level-triggered and active low, and no ISA entry claims
    that pin as edge-triggered too."""
    intx = [(1, 10), (2, 11), (3, 5), (4, 17)]
    buses, ints = _mp_entries(mp_table(2, intx=intx))
    assert buses == {0: b"PCI   ", 1: b"ISA   "}
    pci = [(bus_irq >> 2, bus_irq & 3, pin, flags) for _, flags, bus, bus_irq, _, pin in ints
           if bus == 0]
    assert pci == [(slot, 0, irq, 0xF) for slot, irq in intx]
    isa = sorted(pin for _, flags, bus, irq, _, pin in ints if bus == 1 and flags == 0)
    assert isa == [i for i in range(16) if i not in (10, 11, 5)]
    _, plain = _mp_entries(mp_table(1))
    assert sorted(pin for *_, pin in plain) == list(range(16))


def _aml_package(aml: bytes, at: int) -> tuple[list[object], int]:
    """Decode the AML Package at `at` (the subset the DSDT uses): its items and its end."""
    assert aml[at] == 0x12
    lead = aml[at + 1]
    extra = lead >> 6
    length = lead & (0x3F if not extra else 0x0F)
    for i in range(extra):
        length |= aml[at + 2 + i] << (4 + 8 * i)
    end, p = at + 1 + length, at + 2 + extra
    count, p = aml[p], p + 1
    items: list[object] = []
    sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    for _ in range(count):
        op = aml[p]
        if op in (0, 1):
            items.append(op)
            p += 1
        elif op in sizes:
            items.append(int.from_bytes(aml[p + 1:p + 1 + sizes[op]], "little"))
            p += 1 + sizes[op]
        else:
            sub, p = _aml_package(aml, p)
            items.append(sub)
    assert p == end, (p, end)
    return items, end


def _tables(cpus: int, intx: list[tuple[int, int]] | None = None) -> dict[bytes, bytes]:
    block, rsdp = acpi_tables(cpus, intx or [])
    assert rsdp == RSDP_ADDR and block[:8] == b"RSD PTR "
    assert sum(block[:20]) & 0xFF == 0 and sum(block[:36]) & 0xFF == 0
    xsdt = struct.unpack_from("<Q", block, 24)[0] - RSDP_ADDR

    def table(off: int) -> bytes:
        length, = struct.unpack_from("<I", block, off + 4)
        t = block[off:off + length]
        assert sum(t) & 0xFF == 0, t[:4]
        return t
    x = table(xsdt)
    out = {b"XSDT": x}
    for (ptr,) in struct.iter_unpack("<Q", x[36:]):
        t = table(ptr - RSDP_ADDR)
        out[t[:4]] = t
    fadt = out[b"FACP"]
    dsdt_addr, = struct.unpack_from("<Q", fadt, 140)
    out[b"DSDT"] = table(dsdt_addr - RSDP_ADDR)
    return out


def test_acpi_tables_describe_the_machine() -> None:
    t = _tables(2)
    assert set(t) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    fadt = t[b"FACP"]
    sci, = struct.unpack_from("<H", fadt, 46)
    pm1a_evt, pm1a_cnt = struct.unpack_from("<I", fadt, 56)[0], struct.unpack_from("<I", fadt, 64)[0]
    flags, = struct.unpack_from("<I", fadt, 112)
    assert (sci, pm1a_evt, pm1a_cnt) == (9, 0x600, 0x604)
    assert not flags & (1 << 4)          # a fixed-feature power button is there
    assert len(fadt) == 276 and fadt[8] == 6
    madt = t[b"APIC"]
    at, lapics, ioapics, overrides = 44, [], [], []
    while at < len(madt):
        kind, length = madt[at], madt[at + 1]
        if kind == 0:
            lapics.append(madt[at + 3])
        elif kind == 1:
            ioapics.append(struct.unpack_from("<I", madt, at + 4)[0])
        elif kind == 2:
            overrides.append(struct.unpack_from("<BIH", madt, at + 3))
        at += length
    assert lapics == [0, 1] and ioapics == [0xFEC00000]
    assert overrides == [(9, 9, 0xD)]    # the SCI: level, active high
    assert b"_S5_" in t[b"DSDT"]


@pytest.mark.parametrize("devices", [1, 5, 16])
def test_dsdt_routes_each_pci_intx_through_prt(devices: int) -> None:
    """PCI0's _PRT: one row per device, (slot << 16 | 0xFFFF, INTA#, no link, GSI), and
    the device's length covers it (a long _PRT needs a multi-byte PkgLength)."""
    intx = [(slot, 10 + slot % 14) for slot in range(1, devices + 1)]
    dsdt = _tables(2, intx)[b"DSDT"]
    rows, end = _aml_package(dsdt, dsdt.index(b"\x08_PRT") + 5)
    assert rows == [[slot << 16 | 0xFFFF, 0, 0, gsi] for slot, gsi in intx]
    dev = dsdt.index(b"\x5B\x82")
    lead = dsdt[dev + 2]
    extra = lead >> 6
    length = lead & (0x3F if not extra else 0x0F)
    for i in range(extra):
        length |= dsdt[dev + 3 + i] << (4 + 8 * i)
    assert dev + 2 + length == len(dsdt) == end
    assert b"_PRT" not in _tables(2)[b"DSDT"]


def test_power_button_raises_the_sci_until_acknowledged() -> None:
    levels, offs = [], []
    pm = AcpiPm(levels.append, lambda: offs.append(1))
    pm.press_power_button()
    assert levels[-1] == 0               # not enabled: no interrupt, the status is kept
    assert pm.read(0, 2) & PWRBTN
    pm.write(2, 2, PWRBTN)               # the OS enables the button
    assert levels[-1] == 1
    pm.write(0, 2, PWRBTN)               # and acknowledges it (write 1 to clear)
    assert levels[-1] == 0 and not pm.read(0, 2) & PWRBTN
    assert pm.read(4, 2) & 1             # SCI_EN: ACPI mode from the start
    pm.write(4, 2, (1 << 10) | (1 << 13))   # SLP_TYP 1 with SLP_EN: not offered
    assert offs == []
    pm.write(4, 2, (5 << 10) | (1 << 13))   # S5
    assert offs == [1]
    assert not pm.read(4, 2) & (1 << 13)    # SLP_EN reads 0


def test_acpi_pm_state_round_trips_and_refuses_junk() -> None:
    pm = AcpiPm(lambda level: None, lambda: None)
    pm.write(2, 2, PWRBTN)
    pm.press_power_button()
    st = pm.save()
    levels: list[int] = []
    pm2 = AcpiPm(levels.append, lambda: None)
    pm2.load_state(codec.decode(AcpiPmState, codec.encode(st)))
    assert pm2.save() == st and levels == [1]    # the SCI is up again after a restore
    with pytest.raises(ValueError):
        pm2.load_state(AcpiPmState(status=1 << 20))


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _rtc_read(rtc: CmosRtc, reg: int) -> int:
    rtc.write(0, 1, reg)
    return rtc.read(1, 1)


def test_rtc_reads_host_utc_and_keeps_what_the_guest_sets() -> None:
    now = dt.datetime(2026, 11, 29, 23, 59, 58, tzinfo=dt.UTC).timestamp()
    rtc = CmosRtc(now=now)
    got = [_rtc_read(rtc, r) for r in (0, 2, 4, 7, 8, 9, 0x32)]
    assert got == [_bcd(58), _bcd(59), _bcd(23), _bcd(29), _bcd(11), _bcd(26), _bcd(20)]
    assert _rtc_read(rtc, 0x0D) & 0x80 and not _rtc_read(rtc, 0x0A) & 0x80
    rtc.write(0, 1, 0x0B)
    rtc.write(1, 1, 0x06)                 # binary, 24 h
    assert _rtc_read(rtc, 4) == 23
    rtc.write(0, 1, 4)
    rtc.write(1, 1, 10)                   # the guest sets 10 o'clock
    assert rtc.offset == -13 * 3600
    st = rtc.save()
    later = CmosRtc(now=now + 3600)       # restored an hour later: the clock kept counting
    later.load_state(codec.decode(RtcState, codec.encode(st)))
    assert _rtc_read(later, 4) == 11
    with pytest.raises(ValueError):
        later.load_state(RtcState(ram=b"short"))


def test_rtc_takes_a_date_set_field_by_field_as_one() -> None:
    now = dt.datetime(2026, 3, 31, 12, 0, 0, tzinfo=dt.UTC).timestamp()
    rtc = CmosRtc(now=now)

    def put(reg: int, value: int) -> None:
        rtc.write(0, 1, reg)
        rtc.write(1, 1, value)
    put(0x0B, 0x02 | 0x80)               # SET: the clock holds while the OS writes
    put(9, _bcd(27))                     # as Linux's mc146818_set_time: year first,
    put(8, _bcd(2))                      # then month (February 31 does not exist yet)
    put(7, _bcd(15))
    assert rtc.offset == 0
    put(0x0B, 0x02)                      # SET off: 2027-02-15 12:00:00 at once
    want = dt.datetime(2027, 2, 15, 12, 0, 0, tzinfo=dt.UTC).timestamp() - now
    assert rtc.offset == want
    assert [_rtc_read(rtc, r) for r in (9, 8, 7)] == [_bcd(27), _bcd(2), _bcd(15)]


def test_a_continuing_guest_is_advanced_by_the_real_time_away() -> None:
    assert elapsed_since(1_000, now=5_000) == 4_000
    assert elapsed_since(0, now=5_000) == 0           # a version-1 record: no time known
    assert elapsed_since(9_000, now=5_000) == 0       # the host clock went back: never back
