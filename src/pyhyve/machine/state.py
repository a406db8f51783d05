"""Capture and re-apply everything KVM holds for a VM: per-vCPU and VM-wide state.

The structures are kept as the kernel's own bytes (their layout is KVM's stable ABI), so
nothing is lost in translation; snapshot files and migration streams carry these values.
"""

from __future__ import annotations

import ctypes as C
import errno
import time
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from ..kvm import KvmError, Vcpu, Vm
from ..kvm import structs as S

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2


@dataclass(frozen=True)
class VcpuState:
    NAME: ClassVar[str] = "VcpuState"  # stable record name: never derived from the class
    VERSION: ClassVar[int] = 1
    regs: bytes
    sregs: bytes
    xsave: bytes          # KVM_GET_XSAVE area (or b"" when only FPU state exists)
    fpu: bytes            # KVM_GET_FPU, used when xsave is empty
    xcrs: bytes
    lapic: bytes
    events: bytes
    mp_state: int
    debugregs: bytes
    msrs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class VmKvmState:
    NAME: ClassVar[str] = "VmKvmState"
    VERSION: ClassVar[int] = 2
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: int            # kvmclock, ns
    # the host's CLOCK_REALTIME (ns) when `clock` was read; 0 in version-1 records
    realtime: int = field(default=0, metadata={"since": 2})


def _raw(obj: C.Structure) -> bytes:
    return bytes(memoryview(obj).cast("B"))


StructT = TypeVar("StructT", bound=C.Structure)


def _into(cls: type[StructT], raw: bytes) -> StructT:
    if len(raw) != C.sizeof(cls):
        raise ValueError(f"{cls.__name__}: {len(raw)} bytes, expected {C.sizeof(cls)}")
    return cls.from_buffer_copy(raw)


def readable_msrs(vcpu: Vcpu, candidates: list[int]) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST this vCPU can actually read (KVM stops at the
    first it cannot; those are left out one by one)."""
    todo, ok = list(candidates), []
    while todo:
        got = vcpu.get_msrs(todo)
        n = len(got)
        ok.extend(todo[:n])
        todo = todo[n + 1:]
    return ok


def capture_vcpu(vcpu: Vcpu, msr_indices: list[int], has_xsave: bool) -> VcpuState:
    msrs = vcpu.get_msrs(msr_indices)
    return VcpuState(
        regs=_raw(vcpu.get_regs()), sregs=_raw(vcpu.get_sregs()),
        xsave=_raw(vcpu.get_xsave()) if has_xsave else b"",
        fpu=b"" if has_xsave else _raw(vcpu.get_fpu()),
        xcrs=_raw(vcpu.get_xcrs()) if has_xsave else b"",
        lapic=_raw(vcpu.get_lapic()), events=_raw(vcpu.get_vcpu_events()),
        mp_state=vcpu.get_mp_state().mp_state, debugregs=_raw(vcpu.get_debugregs()),
        msrs=tuple((i, msrs[i]) for i in msr_indices if i in msrs),
    )


def apply_vcpu(vcpu: Vcpu, st: VcpuState, tsc_advance: int = 0) -> None:
    """Order matters: sregs before LAPIC (APIC base/mode), LAPIC before MSRs (TSC deadline),
    TSC before the deadline, events and MP state last. `tsc_advance` ticks are added to
    the TSC, the time the guest was away: a guest whose clocksource is the TSC rather than
    kvmclock (Linux prefers it on hosts with an invariant TSC) then keeps the right time
    too; a TSC deadline already passed fires at once, as a late timer."""
    vcpu.set_sregs(_into(S.KvmSregs, st.sregs))
    vcpu.set_regs(_into(S.KvmRegs, st.regs))
    if st.xsave:
        vcpu.set_xsave(_into(S.KvmXsave, st.xsave))
        vcpu.set_xcrs(_into(S.KvmXcrs, st.xcrs))
    else:
        vcpu.set_fpu(_into(S.KvmFpu, st.fpu))
    vcpu.set_lapic(_into(S.KvmLapicState, st.lapic))
    msrs = dict(st.msrs)
    deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    ordered = {MSR_IA32_TSC: (msrs.pop(MSR_IA32_TSC) + tsc_advance) % (1 << 64)} \
        if MSR_IA32_TSC in msrs else {}
    ordered.update(msrs)
    if deadline is not None:
        ordered[MSR_IA32_TSC_DEADLINE] = deadline
    n = vcpu.set_msrs(ordered)
    if n != len(ordered):
        bad = list(ordered)[n]
        raise ValueError(f"vcpu{vcpu.index}: KVM refused MSR {bad:#x} = {ordered[bad]:#x}")
    vcpu.set_vcpu_events(_into(S.KvmVcpuEvents, st.events))
    mp = S.KvmMpState(st.mp_state)
    vcpu.set_mp_state(mp)
    vcpu.set_debugregs(_into(S.KvmDebugregs, st.debugregs))


KVM_CLOCK_REALTIME = 1 << 2


def read_clock(vm: Vm) -> tuple[int, int]:
    """(kvmclock ns, host CLOCK_REALTIME ns at that moment): KVM's own pair where the host
    kernel gives one (KVM_CLOCK_REALTIME, Linux 5.16+), else the time read right after."""
    data = vm.get_clock()
    realtime = data.realtime if data.flags & KVM_CLOCK_REALTIME else time.time_ns()
    return data.clock, realtime


def capture_vm(vm: Vm) -> VmKvmState:
    clock, realtime = read_clock(vm)
    return VmKvmState(
        pic_master=_raw(vm.get_irqchip(PIC_MASTER)), pic_slave=_raw(vm.get_irqchip(PIC_SLAVE)),
        ioapic=_raw(vm.get_irqchip(IOAPIC)), pit=_raw(vm.get_pit2()),
        clock=clock, realtime=realtime)


def apply_vm(vm: Vm, st: VmKvmState) -> None:
    for raw, chip_id in ((st.pic_master, PIC_MASTER), (st.pic_slave, PIC_SLAVE),
                         (st.ioapic, IOAPIC)):
        chip = _into(S.KvmIrqchip, raw)
        if chip.chip_id != chip_id:
            raise ValueError(f"irqchip state {chip_id} carries chip id {chip.chip_id}")
        vm.set_irqchip(chip)
    vm.set_pit2(_into(S.KvmPitState2, st.pit))


def elapsed_since(realtime: int, now: int | None = None) -> int:
    """Host nanoseconds since a state's clock was read: how far a continuing guest's
    clocks are advanced (as QEMU does for kvmclock), so its wall clock stays right and
    its monotonic clock jumps forward over the gap, never back. 0 for a version-1 record
    (realtime 0) or a host clock that went backwards."""
    if realtime <= 0:
        return 0
    now = time.time_ns() if now is None else now
    return max(0, now - realtime)


def apply_clock(vm: Vm, clock: int, vcpus: list[Vcpu]) -> None:
    """Set kvmclock (see restored_clock). Guests using kvmclock are told they were paused
    (their soft-lockup detectors then ignore the gap)."""
    vm.set_clock(S.KvmClockData(clock=clock))
    for v in vcpus:
        try:
            v.kvmclock_ctrl()
        except KvmError as e:
            if e.errno != errno.EINVAL:  # EINVAL: the guest has not enabled kvmclock
                raise


LAPIC_LVT0, LAPIC_LVT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x700, 0x400


def wire_lapic(v: Vcpu) -> None:
    """LINT0 = ExtINT, LINT1 = NMI: the PC wiring a PIC-mode guest (no MP table) needs.
    A restored vCPU's LAPIC state replaces this."""
    st = v.get_lapic()
    regs = bytearray(st.regs)
    for off, mode in ((LAPIC_LVT0, APIC_MODE_EXTINT), (LAPIC_LVT1, APIC_MODE_NMI)):
        val = int.from_bytes(regs[off:off + 4], "little")
        val = (val & ~0x700 & ~0x10000) | mode
        regs[off:off + 4] = val.to_bytes(4, "little")
    st.regs = bytes(regs)
    v.set_lapic(st)
