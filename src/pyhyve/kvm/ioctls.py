"""KVM ioctl request numbers, computed the way <asm-generic/ioctl.h> does."""

from __future__ import annotations

import ctypes as C

from . import structs as S

_NRBITS, _TYPEBITS, _SIZEBITS = 8, 8, 14
_NRSHIFT = 0
_TYPESHIFT = _NRSHIFT + _NRBITS
_SIZESHIFT = _TYPESHIFT + _TYPEBITS
_DIRSHIFT = _SIZESHIFT + _SIZEBITS
_NONE, _WRITE, _READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _DIRSHIFT) | (KVMIO << _TYPESHIFT) | (nr << _NRSHIFT) | (size << _SIZESHIFT)


def _io(nr: int) -> int:
    return _ioc(_NONE, nr, 0)


def _ior(nr: int, t: type) -> int:
    return _ioc(_READ, nr, C.sizeof(t))


def _iow(nr: int, t: type) -> int:
    return _ioc(_WRITE, nr, C.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_READ | _WRITE, nr, C.sizeof(t))


_u32x2 = C.c_uint32 * 2  # header of kvm_msrs / kvm_cpuid2 (flexible arrays excluded)

# system ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, C.c_uint32)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _u32x2)
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, S.KvmDirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, S.KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, S.KvmIrqLevel)
KVM_SIGNAL_MSI = _iow(0xA5, S.KvmMsi)
KVM_IOEVENTFD = _iow(0x79, S.KvmIoeventfd)
KVM_SET_GSI_ROUTING = _iow(0x6A, S.KvmIrqRouting)
KVM_IRQFD = _iow(0x76, S.KvmIrqfd)
KVM_IRQFD_FLAG_DEASSIGN = 1
KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI = 1, 2
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_GET_IRQCHIP = _iowr(0x62, S.KvmIrqchip)
KVM_SET_IRQCHIP = _ior(0x63, S.KvmIrqchip)
KVM_CREATE_PIT2 = _iow(0x77, S.KvmPitConfig)
KVM_SET_CLOCK = _iow(0x7B, S.KvmClockData)
KVM_GET_CLOCK = _ior(0x7C, S.KvmClockData)
KVM_GET_PIT2 = _ior(0x9F, S.KvmPitState2)
KVM_SET_PIT2 = _iow(0xA0, S.KvmPitState2)
KVM_ENABLE_CAP = _iow(0xA3, S.KvmEnableCap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, S.KvmClearDirtyLog)
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, S.KvmRegs)
KVM_SET_REGS = _iow(0x82, S.KvmRegs)
KVM_GET_SREGS = _ior(0x83, S.KvmSregs)
KVM_SET_SREGS = _iow(0x84, S.KvmSregs)
KVM_TRANSLATE = _iowr(0x85, S.KvmTranslation)
KVM_GET_MSRS = _iowr(0x88, _u32x2)
KVM_SET_MSRS = _iow(0x89, _u32x2)
KVM_GET_FPU = _ior(0x8C, S.KvmFpu)
KVM_SET_FPU = _iow(0x8D, S.KvmFpu)
KVM_GET_LAPIC = _ior(0x8E, S.KvmLapicState)
KVM_SET_LAPIC = _iow(0x8F, S.KvmLapicState)
KVM_SET_CPUID2 = _iow(0x90, _u32x2)
KVM_GET_CPUID2 = _iowr(0x91, _u32x2)
KVM_GET_MP_STATE = _ior(0x98, S.KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, S.KvmMpState)
KVM_GET_VCPU_EVENTS = _ior(0x9F, S.KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, S.KvmVcpuEvents)
KVM_GET_DEBUGREGS = _ior(0xA1, S.KvmDebugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, S.KvmDebugregs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, S.KvmXsave)
KVM_SET_XSAVE = _iow(0xA5, S.KvmXsave)
KVM_GET_XCRS = _ior(0xA6, S.KvmXcrs)
KVM_SET_XCRS = _iow(0xA7, S.KvmXcrs)
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_NMI = _io(0x9A)

NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_") and isinstance(v, int)}

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1  # GET_DIRTY_LOG no longer clears: CLEAR does
KVM_DIRTY_LOG_INITIALLY_SET = 2  # logging starts with every bit set, nothing protected

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
EXIT_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_PIT_SPEAKER_DUMMY = 1
KVM_VCPUEVENT_VALID_NMI_PENDING = 1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 2
KVM_VCPUEVENT_VALID_SHADOW = 4
KVM_VCPUEVENT_VALID_SMM = 8
KVM_CLOCK_TSC_STABLE = 2
