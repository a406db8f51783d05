"""Thin, typed wrappers over the /dev/kvm, VM and vCPU file descriptors.

Every failing ioctl raises KvmError naming the ioctl and the errno, so a user sees
"KVM_SET_SREGS failed: Invalid argument" instead of a bare -1.
"""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import os
from collections.abc import Callable
from typing import TypeVar

from ..errors import PyhyveError
from . import ioctls as I
from . import structs as S

_libc = C.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [C.c_int, C.c_ulong, C.c_void_p]
_ioctl.restype = C.c_int



def backend_is_pvm() -> bool:
    """KVM here runs on the PVM software back end (kvm_pvm: our CI machines), not on
    VMX/SVM hardware; docs/platform.md lists what that changes."""
    return os.path.isdir("/sys/module/kvm_pvm")

class KvmError(PyhyveError, OSError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, request: int, err: int) -> None:
        self.request_name = I.NAMES.get(request, hex(request))
        super().__init__(err, f"{self.request_name} failed: {os.strerror(err)}")


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """ioctl with an int, a ctypes object (passed by reference) or nothing."""
    ptr: C.c_void_p | int | None
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = C.c_void_p(arg)
    else:
        ptr = C.addressof(arg)  # type: ignore[arg-type]
    ret: int = _ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmError(request, C.get_errno())
    return ret


def run_ioctl(fd: int) -> int:
    """KVM_RUN; returns 0 or -errno (EINTR/EAGAIN are normal, not exceptional)."""
    ret = _ioctl(fd, I.KVM_RUN, None)
    return -C.get_errno() if ret < 0 else ret


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        version = ioctl(self.fd, I.KVM_GET_API_VERSION)
        if version != 12:
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"unsupported KVM API version {version}")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, I.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, I.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[S.KvmCpuidEntry2]:
        n = 128
        while True:
            cpuid = S.kvm_cpuid2(n)
            try:
                ioctl(self.fd, I.KVM_GET_SUPPORTED_CPUID, cpuid)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [S.KvmCpuidEntry2.from_buffer_copy(cpuid.entries[i])
                    for i in range(cpuid.nent)]

    def msr_index_list(self) -> list[int]:
        probe = S.kvm_msr_list(0)
        try:
            ioctl(self.fd, I.KVM_GET_MSR_INDEX_LIST, probe)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        lst = S.kvm_msr_list(probe.nmsrs)
        ioctl(self.fd, I.KVM_GET_MSR_INDEX_LIST, lst)
        return list(lst.indices[: lst.nmsrs])

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, I.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm, self.fd = kvm, fd

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, I.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        r = S.KvmUserspaceMemoryRegion(slot, flags, guest_phys_addr, size, userspace_addr)
        ioctl(self.fd, I.KVM_SET_USER_MEMORY_REGION, r)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, I.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, I.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, I.KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        ioctl(self.fd, I.KVM_CREATE_PIT2, S.KvmPitConfig(flags=I.KVM_PIT_SPEAKER_DUMMY))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, I.KVM_IRQ_LINE, S.KvmIrqLevel(irq, level))

    def signal_msi(self, address: int, data: int) -> bool:
        """Inject an MSI (a virtio device's MSI-X vector); False if the guest's APIC
        refused it (masked or no destination)."""
        msi = S.KvmMsi(address & 0xFFFF_FFFF, address >> 32, data & 0xFFFF_FFFF, 0, 0)
        try:  # the address and data are the guest's: a bad one is its problem, not ours
            return ioctl(self.fd, I.KVM_SIGNAL_MSI, msi) > 0
        except KvmError:
            return False

    def ioeventfd(self, addr: int, length: int, fd: int, assign: bool = True) -> bool:
        """Let KVM turn a guest's MMIO write of `length` bytes at `addr` into a signal on
        eventfd `fd`, with no exit to us (or undo it). False if KVM refused."""
        flags = 0 if assign else I.KVM_IOEVENTFD_FLAG_DEASSIGN
        try:
            ioctl(self.fd, I.KVM_IOEVENTFD, S.KvmIoeventfd(0, addr, length, fd, flags))
        except KvmError:
            return False
        return True

    def set_gsi_routing(self, routes: list[tuple[int, int, tuple[int, ...]]]) -> None:
        """Replace KVM's whole GSI routing table: (gsi, KVM_IRQ_ROUTING_*, the union's
        words: (chip, pin) or (address_lo, address_hi, data))."""
        head = C.sizeof(S.KvmIrqRouting)
        table = (C.c_uint8 * (head + len(routes) * C.sizeof(S.KvmIrqRoutingEntry)))()
        S.KvmIrqRouting.from_buffer(table).nr = len(routes)
        entries = (S.KvmIrqRoutingEntry * len(routes)).from_buffer(table, head)
        for e, (gsi, kind, words) in zip(entries, routes, strict=True):
            e.gsi, e.type = gsi, kind
            for i, w in enumerate(words):
                e.u[i] = w
        ioctl(self.fd, I.KVM_SET_GSI_ROUTING, table)

    def irqfd(self, fd: int, gsi: int, assign: bool = True) -> None:
        """A write to eventfd `fd` raises GSI `gsi` inside KVM (or undo that)."""
        flags = 0 if assign else I.KVM_IRQFD_FLAG_DEASSIGN
        ioctl(self.fd, I.KVM_IRQFD, S.KvmIrqfd(fd, gsi, flags, 0))

    def get_irqchip(self, chip_id: int) -> S.KvmIrqchip:
        chip = S.KvmIrqchip(chip_id=chip_id)
        ioctl(self.fd, I.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: S.KvmIrqchip) -> None:
        ioctl(self.fd, I.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> S.KvmPitState2:
        st = S.KvmPitState2()
        ioctl(self.fd, I.KVM_GET_PIT2, st)
        return st

    def set_pit2(self, st: S.KvmPitState2) -> None:
        ioctl(self.fd, I.KVM_SET_PIT2, st)

    def get_clock(self) -> S.KvmClockData:
        st = S.KvmClockData()
        ioctl(self.fd, I.KVM_GET_CLOCK, st)
        return st

    def set_clock(self, st: S.KvmClockData) -> None:
        ioctl(self.fd, I.KVM_SET_CLOCK, st)

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        ioctl(self.fd, I.KVM_GET_DIRTY_LOG, S.KvmDirtyLog(slot, 0, bitmap_addr))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap_addr: int) -> None:
        """Clear (and write-protect again) the pages set in the bitmap, which starts at
        `first_page` (a multiple of 64); manual dirty-log protection only."""
        ioctl(self.fd, I.KVM_CLEAR_DIRTY_LOG,
              S.KvmClearDirtyLog(slot, num_pages, first_page, bitmap_addr))

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = S.KvmEnableCap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, I.KVM_ENABLE_CAP, ec)

    def create_vcpu(self, index: int) -> Vcpu:
        return Vcpu(self, index, ioctl(self.fd, I.KVM_CREATE_VCPU, index))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


StructT = TypeVar("StructT", bound=C.Structure)


def _getter(request: int, cls: type[StructT]) -> Callable[[Vcpu], StructT]:
    def get(self: Vcpu) -> StructT:
        st = cls()
        ioctl(self.fd, request, st)
        return st
    return get


def _setter(request: int) -> Callable[[Vcpu, C.Structure], None]:
    def set_(self: Vcpu, st: C.Structure) -> None:
        ioctl(self.fd, request, st)
    return set_


class Vcpu:
    """A vCPU file descriptor and its mmap'ed kvm_run page."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm, self.index, self.fd = vm, index, fd
        size = vm.kvm.vcpu_mmap_size()
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_addr = C.addressof(C.c_char.from_buffer(self._mm))
        self.run = S.KvmRun.from_address(self.run_addr)

    get_regs = _getter(I.KVM_GET_REGS, S.KvmRegs)
    set_regs = _setter(I.KVM_SET_REGS)
    get_sregs = _getter(I.KVM_GET_SREGS, S.KvmSregs)
    set_sregs = _setter(I.KVM_SET_SREGS)
    get_fpu = _getter(I.KVM_GET_FPU, S.KvmFpu)
    set_fpu = _setter(I.KVM_SET_FPU)
    get_xsave = _getter(I.KVM_GET_XSAVE, S.KvmXsave)
    set_xsave = _setter(I.KVM_SET_XSAVE)
    get_xcrs = _getter(I.KVM_GET_XCRS, S.KvmXcrs)
    set_xcrs = _setter(I.KVM_SET_XCRS)
    get_lapic = _getter(I.KVM_GET_LAPIC, S.KvmLapicState)
    set_lapic = _setter(I.KVM_SET_LAPIC)
    get_vcpu_events = _getter(I.KVM_GET_VCPU_EVENTS, S.KvmVcpuEvents)
    set_vcpu_events = _setter(I.KVM_SET_VCPU_EVENTS)
    get_mp_state = _getter(I.KVM_GET_MP_STATE, S.KvmMpState)
    set_mp_state = _setter(I.KVM_SET_MP_STATE)
    get_debugregs = _getter(I.KVM_GET_DEBUGREGS, S.KvmDebugregs)
    set_debugregs = _setter(I.KVM_SET_DEBUGREGS)

    def set_cpuid2(self, entries: list[S.KvmCpuidEntry2]) -> None:
        cpuid = S.kvm_cpuid2(len(entries))
        for i, e in enumerate(entries):
            cpuid.entries[i] = e
        ioctl(self.fd, I.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int = 256) -> list[S.KvmCpuidEntry2]:
        """The CPUID table KVM holds for this vCPU (what KVM_SET_CPUID2 gave it)."""
        cpuid = S.kvm_cpuid2(max_entries)
        ioctl(self.fd, I.KVM_GET_CPUID2, cpuid)
        return [cpuid.entries[i] for i in range(cpuid.nent)]

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = S.kvm_msrs(len(indices))
        for i, idx in enumerate(indices):
            msrs.entries[i].index = idx
        n = ioctl(self.fd, I.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        msrs = S.kvm_msrs(len(values))
        for i, (idx, val) in enumerate(values.items()):
            msrs.entries[i].index, msrs.entries[i].data = idx, val
        return ioctl(self.fd, I.KVM_SET_MSRS, msrs)

    def translate(self, linear: int) -> S.KvmTranslation:
        t = S.KvmTranslation(linear_address=linear)
        ioctl(self.fd, I.KVM_TRANSLATE, t)
        return t

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, I.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, I.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        ioctl(self.fd, I.KVM_KVMCLOCK_CTRL)

    def nmi(self) -> None:
        """Queue an NMI (delivered when the vCPU next runs; a capture records it)."""
        ioctl(self.fd, I.KVM_NMI)

    def run_once(self) -> int:
        return run_ioctl(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run
            self._mm.close()
            os.close(self.fd)
            self.fd = -1
