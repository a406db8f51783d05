"""The ctypes layouts and ioctl numbers must match the kernel's, byte for byte."""

import ctypes
import errno

import pytest

from pyhyve.kvm import Kvm, KvmError
from pyhyve.kvm import ioctls as I
from pyhyve.kvm import structs as S


@pytest.mark.parametrize("cls,size", list(S.EXPECTED_SIZES.items()),
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_struct_sizes(cls, size):
    assert ctypes.sizeof(cls) == size


def test_kvm_run_layout():
    assert S.KvmRun.exit_reason.offset == 8
    assert S.KvmRun.u.offset == 32
    assert S.KvmVcpuEvents.exception_payload.offset == 56


# values from <linux/kvm.h> as compiled for x86_64
KNOWN = {
    "KVM_GET_API_VERSION": 0xAE00, "KVM_CREATE_VM": 0xAE01, "KVM_RUN": 0xAE80,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05, "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46, "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_GET_REGS": 0x8090AE81, "KVM_SET_REGS": 0x4090AE82, "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84, "KVM_GET_MSRS": 0xC008AE88, "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C, "KVM_GET_LAPIC": 0x8400AE8E, "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98, "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_GET_DEBUGREGS": 0x8080AEA1, "KVM_GET_XSAVE": 0x9000AEA4, "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_GET_IRQCHIP": 0xC208AE62, "KVM_SET_IRQCHIP": 0x8208AE63, "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0, "KVM_GET_CLOCK": 0x8030AE7C, "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_CREATE_PIT2": 0x4040AE77, "KVM_IRQ_LINE": 0x4008AE61, "KVM_TRANSLATE": 0xC018AE85,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0, "KVM_ENABLE_CAP": 0x4068AEA3,
}


@pytest.mark.parametrize("name,value", list(KNOWN.items()))
def test_ioctl_numbers(name, value):
    assert getattr(I, name) == value


@pytest.mark.kvm
def test_error_names_ioctl_and_errno():
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError) as ei:
            vm.set_user_memory_region(0, 0x1000, 0x1001, 0x1234)  # unaligned: EINVAL
        assert ei.value.errno == errno.EINVAL
        assert "KVM_SET_USER_MEMORY_REGION failed: Invalid argument" in str(ei.value)
    finally:
        vm.close()
        kvm.close()


@pytest.mark.kvm
def test_every_state_ioctl_round_trips():
    """GET then SET of every state a snapshot needs is accepted by this host's KVM, and a
    GET after the SET returns exactly what was set."""
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.create_irqchip()
    vm.create_pit2()
    v = vm.create_vcpu(0)
    try:
        v.set_cpuid2(kvm.supported_cpuid())
        for get, set_ in (("get_regs", "set_regs"), ("get_sregs", "set_sregs"),
                          ("get_fpu", "set_fpu"), ("get_xsave", "set_xsave"),
                          ("get_xcrs", "set_xcrs"), ("get_lapic", "set_lapic"),
                          ("get_vcpu_events", "set_vcpu_events"), ("get_mp_state", "set_mp_state"),
                          ("get_debugregs", "set_debugregs")):
            st = getattr(v, get)()
            getattr(v, set_)(st)
            assert bytes(getattr(v, get)()) == bytes(st), get
        msrs = v.get_msrs(kvm.msr_index_list())
        assert len(msrs) > 10
        for chip in (0, 1, 2):
            st = vm.get_irqchip(chip)
            vm.set_irqchip(st)
            assert bytes(vm.get_irqchip(chip)) == bytes(st), f"irqchip {chip}"
        pit = vm.get_pit2()
        vm.set_pit2(pit)
        back = vm.get_pit2()  # its counters run on; what was programmed stays
        assert back.flags == pit.flags
        for a, b in zip(back.channels, pit.channels, strict=True):
            assert (a.count, a.mode, a.rw_mode, a.gate, a.bcd) == (b.count, b.mode, b.rw_mode,
                                                                   b.gate, b.bcd)
        clock = vm.get_clock()
        vm.set_clock(clock)
        assert abs(vm.get_clock().clock - clock.clock) < 1_000_000_000  # runs on from it
    finally:
        v.close()
        vm.close()
        kvm.close()
