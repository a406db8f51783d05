"""ACPI tables (ACPI 6.x): RSDP -> XSDT -> FADT (-> FACS, DSDT) and MADT, so an OS finds
every vCPU and the IOAPIC through the MADT, powers off through PM1a (\\_S5), and sees a
fixed-feature power button (the FADT's PWR_BUTTON flag clear) that `pyhyvectl
--powerdown` presses.

Placed in the reserved BIOS area at 0xE0000 (Linux also scans there for the RSDP); the
PVH start info and the bzImage boot_params carry the RSDP's address as well. Interrupts
follow KVM's default routing (ISA IRQ n on GSI n, as in the MP table); the only override
makes the SCI (IRQ 9) level-triggered, active high, as chipsets wire it. PCI0's _PRT
routes each device's INTA# straight to its own GSI (level-triggered, active low: the ACPI
default for a _PRT GSI), the same pins the MP table names.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ..machine.memory import GuestMemory
from .mptable import IOAPIC_ADDR, LAPIC_ADDR

RSDP_ADDR = 0xE0000
OEM_ID, OEM_TABLE = b"PYHYVE", b"PYHYVEVM"
CREATOR = b"PYHV"
PM1A_EVT, PM1A_CNT = 0x600, 0x604          # devices/acpipm.py
SCI_IRQ = 9
I8042_CMD = 0x64                          # reset register: 0xFE pulses the reset line

# FADT flags
WBINVD, PROC_C1, SLP_BUTTON, RESET_REG_SUP = 1 << 0, 1 << 2, 1 << 5, 1 << 10
# IAPC_BOOT_ARCH: an 8042, no VGA (the CMOS RTC is there: devices/rtc.py)
BOOT_8042, BOOT_NO_VGA = 1 << 1, 1 << 2


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def _table(sig: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    head = bytearray(struct.pack("<4sIBB6s8sI4sI", sig, length, revision, 0, OEM_ID,
                                 OEM_TABLE, 1, CREATOR, 1))
    head[9] = _checksum(bytes(head) + body)
    return bytes(head) + body


def _gas(space: int, bits: int, address: int, access: int) -> bytes:
    """Generic Address Structure: space 1 is system I/O; access 1 byte, 2 word."""
    return struct.pack("<BBBBQ", space, bits, 0, access, address)


def _eisa_id(text: str) -> bytes:
    """An EISA ID ("PNP0A03") in AML's compressed 32-bit form, as a DWordConst."""
    a, b, c = (ord(ch) - 0x40 for ch in text[:3])
    vendor = (a << 10 | b << 5 | c).to_bytes(2, "big")
    return b"\x0C" + vendor + bytes.fromhex(text[3:])


def _pkg_length(content: int) -> bytes:
    """AML PkgLength for `content` bytes that follow it (the encoding counts itself)."""
    if content + 1 < 64:
        return bytes([content + 1])
    for extra in (1, 2, 3):
        total = content + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | total & 0x0F]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError("AML package too long")


def _aml_int(v: int) -> bytes:
    if v in (0, 1):
        return bytes([v])                      # ZeroOp, OneOp
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if v < 1 << (8 * size):
            return bytes([prefix]) + v.to_bytes(size, "little")
    raise ValueError(f"AML integer too large: {v}")


def _package(items: list[bytes]) -> bytes:
    body = bytes([len(items)]) + b"".join(items)
    return b"\x12" + _pkg_length(len(body)) + body


def _prt(intx: Sequence[tuple[int, int]]) -> bytes:
    """Name (_PRT, Package () { Package () { 0xSSSSFFFF, 0 (INTA#), Zero, GSI }, ... })."""
    rows = [_package([_aml_int(slot << 16 | 0xFFFF), _aml_int(0), _aml_int(0), _aml_int(gsi)])
            for slot, gsi in intx]
    return b"\x08_PRT" + _package(rows)


def dsdt(intx: Sequence[tuple[int, int]] = ()) -> bytes:
    """AML: Name (\\_S5, Package () { 5, 5, 0, 0 }), the sleep type PM1a_CNT takes to
    power off, and Device (\\_SB.PCI0) { _HID PNP0A03, _UID 0, _PRT }: with ACPI on, Linux
    scans only the PCI root bridges the namespace declares (resources: the defaults,
    everything), and finds a device's INTx through _PRT when it does not use MSI-X."""
    s5 = b"\x08_S5_" + bytes([0x12, 0x08, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00])
    body = b"\x08_HID" + _eisa_id("PNP0A03") + b"\x08_UID\x00" + (_prt(intx) if intx else b"")
    name = b"\\\x2E_SB_PCI0"
    pci0 = b"\x5B\x82" + _pkg_length(len(name) + len(body)) + name + body
    return _table(b"DSDT", 2, s5 + pci0)


def facs() -> bytes:
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, b"", 0, b"")


def fadt(facs_addr: int, dsdt_addr: int) -> bytes:
    body = bytearray(276 - 36)

    def put(off: int, fmt: str, *v: int | bytes) -> None:
        struct.pack_into(fmt, body, off - 36, *v)
    # FIRMWARE_CTRL and DSDT (32-bit, offset 36) stay 0: ACPI 6 wants only the X_ forms
    put(46, "<H", SCI_IRQ)
    put(56, "<I", PM1A_EVT)
    put(64, "<I", PM1A_CNT)
    put(88, "<BB", 4, 2)                       # PM1_EVT_LEN, PM1_CNT_LEN
    put(108, "<B", 0x32)                       # CENTURY: the RTC's CMOS byte
    put(109, "<H", BOOT_8042 | BOOT_NO_VGA)
    put(112, "<I", WBINVD | PROC_C1 | SLP_BUTTON | RESET_REG_SUP)
    put(116, "<12sB", _gas(1, 8, I8042_CMD, 1), 0xFE)
    put(131, "<B", 0)                          # FADT minor version (6.0)
    put(132, "<QQ", facs_addr, dsdt_addr)      # X_FIRMWARE_CTRL, X_DSDT
    put(148, "<12s", _gas(1, 32, PM1A_EVT, 2))
    put(172, "<12s", _gas(1, 16, PM1A_CNT, 2))
    put(268, "<8s", b"PYHYVE\0\0")             # hypervisor vendor identity
    return _table(b"FACP", 6, bytes(body))


def madt(cpus: int) -> bytes:
    ioapic_id = cpus
    entries = [struct.pack("<BBBBI", 0, 8, i, i, 1) for i in range(cpus)]  # enabled
    entries.append(struct.pack("<BBBBII", 1, 12, ioapic_id, 0, IOAPIC_ADDR, 0))
    # SCI: ISA IRQ 9 -> GSI 9, active high (1), level (3 << 2)
    entries.append(struct.pack("<BBBBIH", 2, 10, 0, SCI_IRQ, SCI_IRQ, 0x1 | 0x3 << 2))
    entries.append(struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1))  # LINT1 is NMI, all CPUs
    return _table(b"APIC", 5, struct.pack("<II", LAPIC_ADDR, 1) + b"".join(entries))


def acpi_tables(cpus: int, intx: Sequence[tuple[int, int]] = ()) -> tuple[bytes, int]:
    """The whole block to place at RSDP_ADDR, and the RSDP's address."""
    at = RSDP_ADDR + 64                        # RSDP (36 bytes), then 16-aligned tables
    blobs: list[tuple[int, bytes]] = []

    def place(data: bytes, align: int = 16) -> int:
        nonlocal at
        at = (at + align - 1) & ~(align - 1)
        addr = at
        blobs.append((addr, data))
        at += len(data)
        return addr
    facs_addr = place(facs(), 64)
    dsdt_addr = place(dsdt(intx))
    fadt_addr = place(fadt(facs_addr, dsdt_addr))
    madt_addr = place(madt(cpus))
    xsdt_addr = place(_table(b"XSDT", 1, struct.pack("<QQ", fadt_addr, madt_addr)))
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36,
                                 xsdt_addr, 0, b""))
    rsdp[8] = _checksum(bytes(rsdp[:20]))
    rsdp[32] = _checksum(bytes(rsdp))
    out = bytearray(at - RSDP_ADDR)
    out[0:36] = rsdp
    for addr, data in blobs:
        out[addr - RSDP_ADDR:addr - RSDP_ADDR + len(data)] = data
    return bytes(out), RSDP_ADDR


def write_acpi_tables(mem: GuestMemory, cpus: int,
                      intx: Sequence[tuple[int, int]] = ()) -> int:
    """The tables into guest memory; `intx`: (PCI slot, GSI) of each device's INTA#."""
    block, rsdp = acpi_tables(cpus, intx)
    mem.write(RSDP_ADDR, block)
    return rsdp
