"""Linux bzImage through the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

The protected-mode kernel is loaded at its preferred address, boot_params (the "zero
page") is filled from the image's setup header plus our E820 map, command line and
initrd, and the vCPU enters at load address + 0x200 in long mode on identity-mapped pages.
"""

from __future__ import annotations

import struct

from ..machine.memory import MMIO_HOLE_START, GuestMemory
from .common import (
    CMDLINE_ADDR,
    ZERO_PAGE_ADDR,
    BootError,
    BootInfo,
    e820_map,
    place_initrd,
    write_cmdline,
    write_gdt,
)

HDRS_MAGIC = b"HdrS"
MIN_VERSION = 0x020C          # 2.12: xloadflags and the 64-bit entry
XLF_KERNEL_64 = 1
LOADED_HIGH, CAN_USE_HEAP = 0x01, 0x80
E820_MAX = 128
LOADER_UNDEFINED = 0xFF
PML4_ADDR, PDPT_ADDR, PD_ADDR = 0x9000, 0xA000, 0xB000

# offsets in boot_params (struct boot_params, arch/x86/include/uapi/asm/bootparam.h)
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_HDR = 0x1F1
BP_E820_TABLE = 0x2D0
# offsets of setup_header fields, counted from the start of boot_params / the image
H_SETUP_SECTS = 0x1F1
H_VID_MODE = 0x1FA
H_JUMP = 0x200
H_HEADER = 0x202
H_VERSION = 0x206
H_TYPE_OF_LOADER = 0x210
H_LOADFLAGS = 0x211
H_CODE32_START = 0x214
H_RAMDISK_IMAGE = 0x218
H_RAMDISK_SIZE = 0x21C
H_HEAP_END_PTR = 0x224
H_CMD_LINE_PTR = 0x228
H_INITRD_ADDR_MAX = 0x22C
H_KERNEL_ALIGNMENT = 0x230
H_RELOCATABLE = 0x234
H_XLOADFLAGS = 0x236
H_CMDLINE_SIZE = 0x238
H_HARDWARE_SUBARCH = 0x23C
H_PREF_ADDRESS = 0x258
H_INIT_SIZE = 0x260


def is_bzimage(image: bytes) -> bool:
    return len(image) >= 0x264 and image[H_HEADER:H_HEADER + 4] == HDRS_MAGIC


def _u(image: bytes | bytearray, fmt: str, off: int) -> int:
    return int(struct.unpack_from(fmt, image, off)[0])


def build_boot_params(image: bytes, mem_size: int, e820: list[tuple[int, int, int]],
                      cmdline_len: int, load_addr: int,
                      initrd: tuple[int, int] | None) -> bytearray:
    """The zero page for this kernel; split out so tests can check it field by field."""
    bp = bytearray(4096)
    hdr_end = 0x202 + image[0x201]  # the jump at 0x200 says how long the header is
    bp[BP_HDR:hdr_end] = image[BP_HDR:hdr_end]
    bp[H_TYPE_OF_LOADER] = LOADER_UNDEFINED
    bp[H_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", bp, H_VID_MODE, 0xFFFF)
    struct.pack_into("<H", bp, H_HEAP_END_PTR, 0xFE00 - 0x200)
    struct.pack_into("<I", bp, H_CODE32_START, load_addr)
    struct.pack_into("<I", bp, H_CMD_LINE_PTR, CMDLINE_ADDR & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, CMDLINE_ADDR >> 32)
    struct.pack_into("<I", bp, H_HARDWARE_SUBARCH, 0)
    if initrd:
        addr, size = initrd
        struct.pack_into("<II", bp, H_RAMDISK_IMAGE, addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
        struct.pack_into("<I", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", bp, BP_EXT_RAMDISK_SIZE, size >> 32)
    if len(e820) > E820_MAX:
        raise BootError("too many E820 entries")
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (a, s, t) in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, a, s, t)
    return bp


def _identity_map(mem: GuestMemory) -> None:
    """4 GiB identity map in 2 MiB pages; the 64-bit protocol needs the kernel mapped."""
    mem.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | 3) + bytes(4088))
    mem.write(PDPT_ADDR, struct.pack("<4Q", *[(PD_ADDR + i * 4096) | 3 for i in range(4)])
              + bytes(4096 - 32))
    mem.write(PD_ADDR, struct.pack("<2048Q", *[(i << 21) | 0x83 for i in range(2048)]))


def load_bzimage(mem: GuestMemory, image: bytes, cmdline: str,
                 initrd: bytes | None, rsdp: int = 0) -> BootInfo:
    if not is_bzimage(image):
        raise BootError("not a bzImage (no HdrS setup header)")
    version = _u(image, "<H", H_VERSION)
    if version < MIN_VERSION:
        raise BootError(f"boot protocol {version >> 8}.{version & 0xFF} is too old (need 2.12)")
    if not _u(image, "<H", H_XLOADFLAGS) & XLF_KERNEL_64:
        raise BootError("kernel has no 64-bit entry point (XLF_KERNEL_64 not set)")
    setup_sects = image[H_SETUP_SECTS] or 4
    pm_off = (setup_sects + 1) * 512
    if pm_off >= len(image):
        raise BootError("bzImage is truncated")
    kernel = image[pm_off:]
    load_addr = _u(image, "<Q", H_PREF_ADDRESS) or 0x100000
    init_size = max(_u(image, "<I", H_INIT_SIZE), len(kernel))
    if load_addr + init_size > min(mem.size, MMIO_HOLE_START):
        raise BootError(f"kernel needs {(load_addr + init_size) >> 20} MiB of RAM; "
                        f"guest has {mem.size >> 20} MiB")
    mem.write(load_addr, kernel)
    cmdline_max = _u(image, "<I", H_CMDLINE_SIZE) or 255
    if len(cmdline.encode()) > cmdline_max:
        raise BootError(f"command line longer than the kernel accepts ({cmdline_max})")
    n = write_cmdline(mem, cmdline)
    initrd_loc = None
    if initrd:
        limit = _u(image, "<I", H_INITRD_ADDR_MAX) or 0x37FFFFFF
        initrd_loc = (place_initrd(mem, initrd, load_addr + init_size, limit), len(initrd))
    bp = build_boot_params(image, mem.size, e820_map(mem), n, load_addr, initrd_loc)
    struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp)
    mem.write(ZERO_PAGE_ADDR, bytes(bp))
    _identity_map(mem)
    write_gdt(mem, long_mode=True)
    return BootInfo(entry=load_addr + 0x200, mode="linux64", regs={"rsi": ZERO_PAGE_ADDR},
                    kernel_end=load_addr + init_size)
