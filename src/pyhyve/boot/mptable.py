"""Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI (Linux with
`acpi=off`, or built without it) finds its vCPUs, the IOAPIC and the ISA interrupt wiring.

The floating pointer ("_MP_") and the configuration table ("PCMP") sit in the reserved
BIOS area, where Linux scans for them (0xF0000-0xFFFFF). Interrupt wiring follows KVM's
default GSI routing, which pyhyve keeps: ISA IRQ n reaches IOAPIC pin n (no IRQ0 -> pin 2
override, unlike a PC's BIOS), and the local APICs' LINT0/LINT1 are ExtINT/NMI.

PCI bus 0 is MP bus 0 (Linux matches an entry's bus ID to the PCI bus number), the ISA
bus is MP bus 1. Each PCI device's INTA# has an entry to its own IOAPIC pin, level-
triggered and active low as PCI wires it; an ISA IRQ that a PCI device uses has no ISA
entry, so the pin is not claimed as edge-triggered as well.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ..machine.memory import GuestMemory

MP_ADDR = 0xF0000               # floating pointer; the table follows it
LAPIC_ADDR = 0xFEE0_0000
IOAPIC_ADDR = 0xFEC0_0000
IOAPIC_PINS = 24
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
BUS_PCI, BUS_ISA = 0, 1
PCI_LEVEL_LOW = 0x3 | 0x3 << 2  # MP interrupt flags: active low, level-triggered
CPU_ENABLED, CPU_BSP = 1, 2
INT_INT, INT_NMI, INT_EXTINT = 0, 1, 3
MAX_CPUS = 254                  # xAPIC IDs; 0xFF is "all" and the IOAPIC takes one


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def mp_table(cpus: int, cpu_signature: int = 0x600, cpu_features: int = 0x201,
             intx: Sequence[tuple[int, int]] = ()) -> bytes:
    """Floating pointer + configuration table, as one block to place at MP_ADDR. `intx`:
    (PCI slot on bus 0, IOAPIC pin) of each device's INTA#."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"an MP table describes 1 to {MAX_CPUS} CPUs, not {cpus}")
    ioapic_id = cpus                 # the first APIC ID after the CPUs'
    entries = []
    for i in range(cpus):
        flags = CPU_ENABLED | (CPU_BSP if i == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", 0, i, APIC_VERSION, flags,
                                   cpu_signature, cpu_features))
    entries.append(struct.pack("<BB6s", 1, BUS_PCI, b"PCI   "))
    entries.append(struct.pack("<BB6s", 1, BUS_ISA, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    pci_pins = {pin for _, pin in intx}
    for irq in range(16):           # flags 0: the bus's polarity and trigger (ISA: high, edge)
        if irq not in pci_pins:
            entries.append(struct.pack("<BBHBBBB", 3, INT_INT, 0, BUS_ISA, irq, ioapic_id, irq))
    for slot, pin in intx:          # source IRQ: device << 2 | INTx (0 = INTA#)
        entries.append(struct.pack("<BBHBBBB", 3, INT_INT, PCI_LEVEL_LOW, BUS_PCI, slot << 2,
                                   ioapic_id, pin))
    entries.append(struct.pack("<BBHBBBB", 4, INT_EXTINT, 0, BUS_ISA, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", 4, INT_NMI, 0, BUS_ISA, 0, 0xFF, 1))
    body = b"".join(entries)
    table_addr = MP_ADDR + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), 4, 0,
                                   b"PYHYVE  ", b"PYHYVE-VM   ", 0, 0, len(entries),
                                   LAPIC_ADDR, 0, 0, 0))
    header[7] = _checksum(bytes(header) + body)
    fp = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", table_addr, 1, 4, 0, 0))
    fp[10] = _checksum(bytes(fp))
    return bytes(fp) + bytes(header) + body


def write_mp_table(mem: GuestMemory, cpus: int, intx: Sequence[tuple[int, int]] = ()) -> None:
    mem.write(MP_ADDR, mp_table(cpus, intx=intx))
