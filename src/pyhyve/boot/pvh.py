"""PVH boot: an ELF kernel with a XEN_ELFNOTE_PHYS32_ENTRY note, entered in 32-bit
protected mode with EBX pointing at struct hvm_start_info (Xen's arch-x86/hvm/start_info.h).
"""

from __future__ import annotations

import struct

from ..machine.memory import GuestMemory
from .common import (
    CMDLINE_ADDR,
    PVH_INFO_ADDR,
    PVH_MODLIST_ADDR,
    BootError,
    BootInfo,
    e820_map,
    place_initrd,
    write_cmdline,
    write_gdt,
)

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
PT_LOAD, PT_NOTE = 1, 4
MAX_PHDRS = 64


def _phdrs(image: bytes) -> tuple[bool, list[tuple[int, int, int, int, int, int]]]:
    """(is64, [(type, offset, paddr, filesz, memsz, align)]) with every bound checked."""
    if len(image) < 52 or image[:4] != b"\x7fELF":
        raise BootError("not an ELF file")
    cls, data = image[4], image[5]
    if data != 1 or cls not in (1, 2):
        raise BootError("not a little-endian 32/64-bit ELF")
    is64 = cls == 2
    if is64:
        if len(image) < 64:
            raise BootError("truncated ELF header")
        phoff, = struct.unpack_from("<Q", image, 32)
        phentsize, phnum = struct.unpack_from("<HH", image, 54)
        fmt, need = "<IIQQQQQQ", 56
    else:
        phoff, = struct.unpack_from("<I", image, 28)
        phentsize, phnum = struct.unpack_from("<HH", image, 42)
        fmt, need = "<IIIIIIII", 32
    if phnum == 0 or phnum > MAX_PHDRS or phentsize < need:
        raise BootError("ELF has no usable program headers")
    if phoff + phnum * phentsize > len(image):
        raise BootError("truncated ELF program headers")
    out = []
    for i in range(phnum):
        f = struct.unpack_from(fmt, image, phoff + i * phentsize)
        if is64:
            p_type, _flags, off, _va, pa, filesz, memsz, align = f
        else:
            p_type, off, _va, pa, filesz, memsz, _flags, align = f
        if p_type in (PT_LOAD, PT_NOTE) and off + filesz > len(image):
            raise BootError("ELF segment runs past the end of the file")
        out.append((p_type, off, pa, filesz, memsz, align))
    return is64, out


def find_pvh_entry(image: bytes) -> int | None:
    _, phdrs = _phdrs(image)
    for p_type, off, _pa, filesz, _memsz, _align in phdrs:
        if p_type != PT_NOTE:
            continue
        pos, end = off, off + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", image, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            nxt = desc_at + ((descsz + 3) & ~3)
            if nxt > end:
                break
            name = image[name_at:name_at + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
                return int.from_bytes(image[desc_at:desc_at + 4], "little")
            pos = nxt
    return None


def is_pvh_elf(image: bytes) -> bool:
    try:
        return find_pvh_entry(image) is not None
    except BootError:
        return False


def load_pvh(mem: GuestMemory, image: bytes, cmdline: str, initrd: bytes | None,
             rsdp: int = 0) -> BootInfo:
    entry = find_pvh_entry(image)
    if entry is None:
        raise BootError("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    _, phdrs = _phdrs(image)
    kernel_end = 0
    for p_type, off, pa, filesz, memsz, _align in phdrs:
        if p_type != PT_LOAD or memsz == 0:
            continue
        if memsz < filesz:
            raise BootError("ELF segment has memsz < filesz")
        try:
            mem.region_for(pa, memsz)
        except ValueError:
            raise BootError(f"ELF segment at {pa:#x}+{memsz:#x} does not fit in guest RAM") from None
        mem.write(pa, image[off:off + filesz])
        if memsz > filesz:
            mem.fill(pa + filesz, memsz - filesz)
        kernel_end = max(kernel_end, pa + memsz)
    write_gdt(mem, long_mode=False)
    write_cmdline(mem, cmdline)
    memmap = e820_map(mem)
    mm_addr = PVH_INFO_ADDR + 64
    mem.write(mm_addr, b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in memmap))
    nr_modules, modlist = 0, 0
    if initrd:
        addr = place_initrd(mem, initrd, kernel_end, 0xFFFF_FFFF)
        mem.write(PVH_MODLIST_ADDR, struct.pack("<QQQQ", addr, len(initrd), 0, 0))
        nr_modules, modlist = 1, PVH_MODLIST_ADDR
    info = struct.pack("<IIIIQQQQII", HVM_START_MAGIC, 1, 0, nr_modules, modlist,
                       CMDLINE_ADDR, rsdp, mm_addr, len(memmap), 0)
    mem.write(PVH_INFO_ADDR, info)
    return BootInfo(entry=entry, mode="pvh32", regs={"rbx": PVH_INFO_ADDR},
                    kernel_end=kernel_end)
