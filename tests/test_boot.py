"""Loaders: PVH start_info and the Linux boot_params, checked field by field against the
boot protocols (Xen's hvm/start_info.h, Documentation/arch/x86/boot.rst)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhyve.boot import common as BC
from pyhyve.boot import linux as L
from pyhyve.boot import pvh as P
from pyhyve.boot.common import BootError
from pyhyve.machine.memory import GuestMemory

MB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory(256 * MB)
    yield m
    m.close()


# --- PVH -------------------------------------------------------------------------------

def test_pvh_start_info(kit, mem):
    image = Path(kit["hashchain"]).read_bytes()
    info = P.load_pvh(mem, image, "cpus=2 hello", b"INITRD" * 100)
    assert info.mode == "pvh32" and info.entry == 0x100000
    assert info.regs == {"rbx": BC.PVH_INFO_ADDR}
    magic, version, flags, nmods, modlist, cmd, rsdp, mmap_, nmmap, _ = struct.unpack(
        "<IIIIQQQQII", mem.read(BC.PVH_INFO_ADDR, 56))
    assert (magic, version, flags, rsdp) == (0x336EC578, 1, 0, 0)
    assert mem.read(cmd, 13) == b"cpus=2 hello\0"
    entries = [struct.unpack("<QQII", mem.read(mmap_ + 24 * i, 24))[:3] for i in range(nmmap)]
    assert entries == [(0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2),
                       (0x100000, 256 * MB - 0x100000, 1)]
    assert nmods == 1
    paddr, size, _, _ = struct.unpack("<QQQQ", mem.read(modlist, 32))
    assert size == 600 and mem.read(paddr, 6) == b"INITRD" and paddr % 4096 == 0
    assert paddr >= info.kernel_end
    # the loaded image: the entry code and the AP trampoline are where the ELF says
    assert mem.read(0x100000, 1) == image[0x2000:0x2001]


def test_pvh_note_lookup(kit):
    assert P.find_pvh_entry(Path(kit["ab"]).read_bytes()) == 0x100000


def test_pvh_rejects_elf_without_note(kit, tmp_path):
    src = tmp_path / "plain.c"
    src.write_text("void _start(void){for(;;);}\n")
    out = tmp_path / "plain.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-o", str(out), str(src)], check=True)
    assert not P.is_pvh_elf(out.read_bytes())
    with pytest.raises(BootError, match="no PVH entry note"):
        P.load_pvh(GuestMemory(16 * MB), out.read_bytes(), "", None)


def test_pvh_segment_outside_ram(kit):
    """The kit's code loads at 1 MiB (link.ld): in 1 MiB of RAM that segment cannot fit."""
    image = Path(kit["ab"]).read_bytes()
    small = GuestMemory(MB)
    try:
        with pytest.raises(BootError, match=r"ELF segment at 0x100000\+.* does not fit in guest RAM"):
            P.load_pvh(small, image, "", None)
    finally:
        small.close()


def test_pvh_initrd_larger_than_ram(kit):
    image = Path(kit["ab"]).read_bytes()
    mem = GuestMemory(32 * MB)
    try:
        with pytest.raises(BootError, match="initrd"):
            P.load_pvh(mem, image, "", b"x" * (32 * MB))
    finally:
        mem.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_pvh_mutated_images_fail_cleanly(kit, data):
    image = bytearray(Path(kit["ab"]).read_bytes()[:0x3000])
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(image) - 1))
        image[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(image)))
    m = GuestMemory(16 * MB)
    try:
        P.load_pvh(m, bytes(image[:cut]), "x", None)
    except BootError:
        pass
    finally:
        m.close()


# --- Linux bzImage ---------------------------------------------------------------------

ENTRY_ASM = r"""
    .code64
    .globl _start
_start:
    mov 0x202(%rsi), %eax          /* boot_params must carry the HdrS header */
    cmp $0x53726448, %eax
    jne bad
    mov %cs, %ax                   /* __BOOT_CS */
    cmp $0x10, %ax
    jne bad
    mov %ds, %ax                   /* __BOOT_DS */
    cmp $0x18, %ax
    jne bad
    mov 0x228(%rsi), %ebx          /* cmd_line_ptr: print the command line */
    mov $0x3f8, %dx
1:  mov (%rbx), %al
    test %al, %al
    jz done
    out %al, %dx
    inc %rbx
    jmp 1b
done:
    mov $'!', %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
bad:
    mov $0x3f8, %dx
    mov $'X', %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
"""


def fake_bzimage(tmp_path, code: bytes = b"\x90", version: int = 0x020F, xload: int = 3,
                 setup_sects: int = 3) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = b"\xeb\x6a"  # jmp over the header: header ends at 0x26C
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
    setup[0x234] = 1  # relocatable
    struct.pack_into("<H", setup, 0x236, xload)
    struct.pack_into("<I", setup, 0x238, 2047)
    struct.pack_into("<Q", setup, 0x258, 0x1000000)
    struct.pack_into("<I", setup, 0x260, 0x400000)
    kernel = bytearray(0x200) + code
    return bytes(setup + kernel)


def _assemble(tmp_path) -> bytes:
    (tmp_path / "e.S").write_text(ENTRY_ASM)
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "e.o"), str(tmp_path / "e.S")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "e.o"),
                    str(tmp_path / "e.bin")], check=True)
    return (tmp_path / "e.bin").read_bytes()


def test_boot_params_field_by_field(tmp_path, mem):
    image = fake_bzimage(tmp_path, b"\xf4")
    initrd = os.urandom(5000)
    info = L.load_bzimage(mem, image, "console=ttyS0 root=/dev/vda", initrd)
    assert info.mode == "linux64" and info.entry == 0x1000000 + 0x200
    assert info.regs == {"rsi": BC.ZERO_PAGE_ADDR}
    bp = mem.read(BC.ZERO_PAGE_ADDR, 4096)

    def u(fmt, off):
        return struct.unpack_from(fmt, bp, off)[0]

    # the image's setup header is copied verbatim, then the loader's fields are filled in
    assert bp[0x1F1] == 3 and bp[0x202:0x206] == b"HdrS" and u("<H", 0x206) == 0x020F
    assert u("<H", 0x1FE) == 0xAA55 and u("<H", 0x236) == 3 and u("<Q", 0x258) == 0x1000000
    assert bp[0x210] == 0xFF                       # type_of_loader: undefined
    assert bp[0x211] & 0x81 == 0x81                # LOADED_HIGH | CAN_USE_HEAP
    assert u("<H", 0x224) == 0xFE00 - 0x200        # heap_end_ptr
    assert u("<H", 0x1FA) == 0xFFFF                # vid_mode: normal
    assert u("<I", 0x214) == 0x1000000             # code32_start = load address
    assert u("<I", 0x228) == BC.CMDLINE_ADDR and u("<I", 0x0C8) == 0
    assert mem.read(BC.CMDLINE_ADDR, 28) == b"console=ttyS0 root=/dev/vda\0"
    assert u("<I", 0x23C) == 0                     # hardware_subarch: PC
    rd_addr, rd_size = u("<I", 0x218), u("<I", 0x21C)
    assert rd_size == 5000 and rd_addr % 4096 == 0 and mem.read(rd_addr, 5000) == initrd
    assert rd_addr >= 0x1000000 + 0x400000 and rd_addr + rd_size <= mem.size
    assert u("<I", 0x0C0) == 0 and u("<I", 0x0C4) == 0
    n = bp[0x1E8]
    e820 = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]
    assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 255 * MB, 1)]
    # the protected-mode kernel sits at its preferred address
    assert mem.read(0x1000000 + 0x200, 1) == b"\xf4"
    # long-mode identity map and the 64-bit boot GDT
    assert struct.unpack("<Q", mem.read(L.PML4_ADDR, 8))[0] & ~0xFFF == L.PDPT_ADDR
    assert struct.unpack("<Q", mem.read(L.PD_ADDR + 8 * 8, 8))[0] == (8 << 21) | 0x83
    gdt = struct.unpack("<5Q", mem.read(BC.BOOT_GDT_ADDR, 40))
    assert gdt[2] == BC.GDT_CODE64 and gdt[3] == BC.GDT_DATA


@pytest.mark.kvm
def test_bzimage_entry_runs_in_long_mode(tmp_path, make_vm):
    """A bzImage whose 64-bit entry checks boot_params, CS/DS and prints the cmdline."""
    path = tmp_path / "bzImage"
    path.write_bytes(fake_bzimage(tmp_path, _assemble(tmp_path)))
    vm, con = make_vm(str(path), cmdline="hello-linux", memory=128 * MB)
    assert vm.wait(30), "guest did not finish"
    assert con.text == "hello-linux!"
    assert vm.stop_reason == "guest requested a reset"


@pytest.mark.parametrize("kw,msg", [
    ({"version": 0x0206}, "too old"),
    ({"xload": 0}, "64-bit entry"),
])
def test_bzimage_refusals(tmp_path, mem, kw, msg):
    with pytest.raises(BootError, match=msg):
        L.load_bzimage(mem, fake_bzimage(tmp_path, **kw), "", None)


def test_bzimage_too_big_for_ram(tmp_path):
    small = GuestMemory(16 * MB)
    try:
        with pytest.raises(BootError, match="needs 20 MiB"):
            L.load_bzimage(small, fake_bzimage(tmp_path), "", None)
    finally:
        small.close()


def test_cmdline_too_long(tmp_path, mem):
    with pytest.raises(BootError, match="longer than the kernel accepts"):
        L.load_bzimage(mem, fake_bzimage(tmp_path), "x" * 3000, None)
