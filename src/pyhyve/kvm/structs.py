"""ctypes mirrors of the KVM UAPI structures (linux/kvm.h, asm/kvm.h for x86_64).

Sizes are checked in tests against the kernel headers' values, because a wrong layout
silently corrupts state rather than failing.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64, s64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64, C.c_int64


class KvmRegs(C.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(C.Structure):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
        ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
        ("unusable", u8), ("padding", u8),
    ]


class KvmDtable(C.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(C.Structure):
    _fields_ = [
        *[(n, KvmSegment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", KvmDtable), ("idt", KvmDtable),
        *[(n, u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", u64 * 4),
    ]


class KvmFpu(C.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
        ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32), ("pad2", u32),
    ]


class KvmMsrEntry(C.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def kvm_msrs(n: int) -> C.Structure:
    """struct kvm_msrs with room for n entries."""

    class KvmMsrs(C.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * n)]

    s = KvmMsrs()
    s.nmsrs = n
    return s


def kvm_msr_list(n: int) -> C.Structure:
    class KvmMsrList(C.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    s = KvmMsrList()
    s.nmsrs = n
    return s


class KvmCpuidEntry2(C.Structure):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]


def kvm_cpuid2(n: int) -> C.Structure:
    class KvmCpuid2(C.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * n)]

    s = KvmCpuid2()
    s.nent = n
    return s


class KvmLapicState(C.Structure):
    _fields_ = [("regs", C.c_char * 1024)]


class _ExcEvent(C.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _IntEvent(C.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _NmiEvent(C.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _SmiEvent(C.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class KvmVcpuEvents(C.Structure):
    _fields_ = [
        ("exception", _ExcEvent), ("interrupt", _IntEvent), ("nmi", _NmiEvent),
        ("sipi_vector", u32), ("flags", u32), ("smi", _SmiEvent), ("triple_fault", u8),
        ("reserved", u8 * 26), ("exception_has_payload", u8), ("exception_payload", u64),
    ]


class KvmMpState(C.Structure):
    _fields_ = [("mp_state", u32)]


class KvmDebugregs(C.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class KvmXsave(C.Structure):
    _fields_ = [("region", u32 * 1024)]


class KvmXcr(C.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(C.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * 16), ("padding", u64 * 16)]


class KvmIrqchip(C.Structure):
    """chip_id 0 = PIC master, 1 = PIC slave, 2 = IOAPIC; the payload is kept opaque."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", C.c_char * 512)]


class KvmPitChannelState(C.Structure):
    _fields_ = [
        ("count", u32), ("latched_count", u16), ("count_latched", u8), ("status_latched", u8),
        ("status", u8), ("read_state", u8), ("write_state", u8), ("write_latch", u8),
        ("rw_mode", u8), ("mode", u8), ("bcd", u8), ("gate", u8), ("count_load_time", s64),
    ]


class KvmPitState2(C.Structure):
    _fields_ = [("channels", KvmPitChannelState * 3), ("flags", u32), ("reserved", u32 * 9)]


class KvmPitConfig(C.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmClockData(C.Structure):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class KvmUserspaceMemoryRegion(C.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class KvmDirtyLog(C.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(C.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmIrqLevel(C.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmMsi(C.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32),
                ("devid", u32), ("pad", u8 * 12)]


class KvmIrqRoutingEntry(C.Structure):
    """One route; `u` is the union: irqchip (chip, pin) or msi (address lo/hi, data)."""
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", u32 * 8)]


class KvmIrqRouting(C.Structure):
    """The header of KVM_SET_GSI_ROUTING's argument; the entries follow it."""
    _fields_ = [("nr", u32), ("flags", u32)]


class KvmIrqfd(C.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


class KvmIoeventfd(C.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", C.c_int32),
                ("flags", u32), ("pad", u8 * 36)]


class KvmTranslation(C.Structure):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8),
                ("writeable", u8), ("usermode", u8), ("pad", u8 * 5)]


class KvmEnableCap(C.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# --- struct kvm_run (the mmap'ed vCPU communication page) -------------------------------

class _RunIo(C.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class _RunMmio(C.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _RunInternal(C.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _RunSystemEvent(C.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _RunFailEntry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _RunUnion(C.Union):
    _fields_ = [("io", _RunIo), ("mmio", _RunMmio), ("internal", _RunInternal),
                ("system_event", _RunSystemEvent), ("fail_entry", _RunFailEntry),
                ("hw_exit_reason", u64), ("padding", C.c_char * 256)]


class KvmRun(C.Structure):
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
        ("flags", u16), ("cr8", u64), ("apic_base", u64), ("u", _RunUnion),
    ]


# Sizes from the kernel headers; tests assert them so a layout slip cannot go unnoticed.
EXPECTED_SIZES = {
    KvmRegs: 144, KvmSegment: 24, KvmDtable: 16, KvmSregs: 312, KvmFpu: 416,
    KvmMsrEntry: 16, KvmCpuidEntry2: 40, KvmLapicState: 1024, KvmVcpuEvents: 64,
    KvmMpState: 4, KvmDebugregs: 128, KvmXsave: 4096, KvmXcrs: 392, KvmIrqchip: 520,
    KvmPitState2: 112, KvmPitConfig: 64, KvmClockData: 48, KvmUserspaceMemoryRegion: 32,
    KvmDirtyLog: 16, KvmClearDirtyLog: 24, KvmIrqLevel: 8, KvmTranslation: 24, KvmMsi: 32, KvmIoeventfd: 64,
    KvmEnableCap: 104,
}
