"""What the loaders share: the low-memory layout, the E820 map and the boot GDT."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .. import untrusted
from ..errors import BootFailed
from ..machine.memory import MMIO_HOLE_END, MMIO_HOLE_START, GuestMemory

BOOT_GDT_ADDR = 0x500
BOOT_IDT_ADDR = 0x520
PVH_INFO_ADDR = 0x6000          # hvm_start_info, then its memory map
PVH_MODLIST_ADDR = 0x6800
ZERO_PAGE_ADDR = 0x7000         # Linux boot_params
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000
E820_RAM, E820_RESERVED = 1, 2

# Boot GDTs. PVH: 0x08 code32, 0x10 data, 0x18 TSS. The Linux 64-bit protocol wants
# __BOOT_CS = 0x10 and __BOOT_DS = 0x18; a TSS follows at 0x20 (KVM wants a usable TR).
GDT_CODE32, GDT_CODE64 = 0x00CF9B000000FFFF, 0x00AF9B000000FFFF
GDT_DATA, GDT_TSS = 0x00CF93000000FFFF, 0x008F8B000000FFFF
PVH_GDT = (0, GDT_CODE32, GDT_DATA, GDT_TSS)
LINUX_GDT = (0, 0, GDT_CODE64, GDT_DATA, GDT_TSS)
SELECTORS = {"pvh32": (0x08, 0x10, 0x18), "linux64": (0x10, 0x18, 0x20)}  # cs, ds, tr


class BootError(BootFailed, ValueError):
    """The kernel image cannot be booted (not found, wrong format, does not fit)."""


@dataclass
class BootInfo:
    """What the vCPU needs to start: entry point, mode and register values."""

    entry: int
    mode: str                          # "pvh32" or "linux64"
    regs: dict[str, int] = field(default_factory=dict)
    kernel_end: int = 0


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries covering guest RAM, with the legacy hole reserved."""
    low_end = min(mem.size, MMIO_HOLE_START)
    entries = [(0, EBDA_START, E820_RAM),
               (EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
               (HIGH_MEMORY, low_end - HIGH_MEMORY, E820_RAM)]
    if mem.size > MMIO_HOLE_START:
        entries.append((MMIO_HOLE_END, mem.size - MMIO_HOLE_START, E820_RAM))
    return entries


def write_gdt(mem: GuestMemory, long_mode: bool) -> None:
    entries = LINUX_GDT if long_mode else PVH_GDT
    mem.write(BOOT_GDT_ADDR, struct.pack(f"<{len(entries)}Q", *entries))
    mem.write(BOOT_IDT_ADDR, bytes(8))


def write_cmdline(mem: GuestMemory, cmdline: str) -> int:
    raw = cmdline.encode() + b"\0"
    if len(raw) > CMDLINE_MAX:
        raise BootError(f"command line too long ({len(raw)} bytes, at most {CMDLINE_MAX})")
    mem.write(CMDLINE_ADDR, raw)
    return len(raw)


def place_initrd(mem: GuestMemory, data: bytes, kernel_end: int, limit: int) -> int:
    """Put the initrd as high as possible below `limit` and low RAM's end; return its address."""
    top = min(mem.size, MMIO_HOLE_START, limit + 1)
    addr = (top - len(data)) & ~0xFFF
    if addr < kernel_end or addr < HIGH_MEMORY:
        raise BootError(f"initrd ({len(data)} bytes) does not fit in guest memory")
    mem.write(addr, data)
    return addr


def read_image(path: str, what: str, limit: int) -> bytes:
    """A kernel or initrd: a regular file no larger than guest RAM can hold (a FIFO or a
    device such as /dev/zero is refused at once instead of hanging or eating memory)."""
    try:
        return untrusted.read_file(path, limit, what)
    except untrusted.BadFile as e:
        raise BootError(str(e)) from None


def load_kernel(mem: GuestMemory, path: str, cmdline: str, initrd_path: str | None,
                rsdp: int = 0) -> BootInfo:
    """Load a PVH ELF or a bzImage, whichever `path` is; `rsdp` is the ACPI root table's
    address (0: none) for the kernel's boot information."""
    from .linux import is_bzimage, load_bzimage
    from .pvh import is_pvh_elf, load_pvh

    image = read_image(path, "kernel", mem.size)
    initrd = read_image(initrd_path, "initrd", mem.size) if initrd_path else None
    if is_pvh_elf(image):
        return load_pvh(mem, image, cmdline, initrd, rsdp)
    if is_bzimage(image):
        return load_bzimage(mem, image, cmdline, initrd, rsdp)
    if image[:4] == b"\x7fELF":
        raise BootError(f"{path}: ELF kernel without a PVH entry note")
    raise BootError(f"{path}: not a bootable kernel (neither a PVH ELF nor a bzImage)")
