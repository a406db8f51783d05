"""Initial vCPU registers for each boot mode (PVH 32-bit, Linux 64-bit)."""

from __future__ import annotations

from ..kvm import Vcpu
from ..kvm.structs import KvmSegment
from .common import BOOT_GDT_ADDR, BOOT_IDT_ADDR, LINUX_GDT, PVH_GDT, SELECTORS
from .linux import PML4_ADDR

CR0_PE, CR0_ET, CR0_PG = 0x1, 0x10, 0x8000_0000
CR4_PAE = 0x20
EFER_LME, EFER_LMA = 0x100, 0x400


def _segment(selector: int, code: bool, long_mode: bool = False) -> KvmSegment:
    s = KvmSegment()
    s.base, s.limit, s.selector = 0, 0xFFFFFFFF, selector
    s.type = 0xB if code else 0x3
    s.present, s.dpl, s.s, s.g = 1, 0, 1, 1
    s.l = 1 if long_mode and code else 0
    s.db = 0 if s.l else 1
    return s


def _tss(selector: int) -> KvmSegment:
    s = KvmSegment()
    s.base, s.limit, s.selector, s.type, s.present = 0, 0xFFFFF, selector, 0xB, 1
    return s


def setup_boot_cpu(vcpu: Vcpu, mode: str, entry: int, regs: dict[str, int]) -> None:
    long_mode = mode == "linux64"
    cs, ds, tr = SELECTORS[mode]
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(cs, True, long_mode)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(ds, False))
    sregs.tr = _tss(tr)
    gdt = LINUX_GDT if long_mode else PVH_GDT
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT_ADDR, len(gdt) * 8 - 1
    sregs.idt.base, sregs.idt.limit = BOOT_IDT_ADDR, 0
    if long_mode:
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
        sregs.cr3 = PML4_ADDR
        sregs.cr4 = CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
    else:
        sregs.cr0 = CR0_PE | CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
    vcpu.set_sregs(sregs)
    r = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"):
        setattr(r, name, 0)
    for name, value in regs.items():
        setattr(r, name, value)
    r.rip, r.rflags = entry, 0x2
    vcpu.set_regs(r)
