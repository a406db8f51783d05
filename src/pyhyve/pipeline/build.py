"""The one build-and-apply path: a MachineSpec becomes an unstarted VM on this host, then
its state sections are loaded into it. Snapshot restore and migration receive differ only
in where memory bytes come from (a file mapping, stream frames) and when they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..devices.console import Console
from ..errors import RecordError
from ..kvm import ioctls as I
from ..kvm.structs import KvmCpuidEntry2
from ..machine.cpuid import missing_features
from ..machine.memory import GuestMemory
from ..vm import VirtualMachine
from ..vmtypes import MachineState, host_memory_bytes, open_kvm
from .record import MachineSpec
from .sections import decode_state

TSC_TOLERANCE_PPM = 250  # KVM's own tolerance before it scales or complains


@dataclass(frozen=True)
class HostFacts:
    """What the compatibility checks need of this host."""

    cpuid: tuple[KvmCpuidEntry2, ...]
    tsc_khz: int
    tsc_control: bool
    memory_bytes: int

    @classmethod
    def probe(cls) -> HostFacts:
        """Ask KVM directly (a throwaway VM and vCPU), before any guest exists."""
        kvm = open_kvm()
        try:
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    return cls(tuple(kvm.supported_cpuid()), vcpu.get_tsc_khz(),
                               bool(kvm.check_extension(I.KVM_CAP_TSC_CONTROL)),
                               host_memory_bytes())
                finally:
                    vcpu.close()
            finally:
                vm.close()
        finally:
            kvm.close()

    @classmethod
    def of(cls, vm: VirtualMachine) -> HostFacts:
        return cls(tuple(vm.kvm.supported_cpuid()), vm.tsc_khz,
                   bool(vm.kvm.check_extension(I.KVM_CAP_TSC_CONTROL)), host_memory_bytes())


def check_host(spec: MachineSpec, host: HostFacts) -> bool:
    """Refuse what this host cannot run; True when the guest's TSC rate must be set."""
    need = spec.config.memory
    if host.memory_bytes and need > host.memory_bytes:
        raise RecordError(f"the guest needs {need >> 20} MiB of RAM; this host has "
                          f"{host.memory_bytes >> 20} MiB")
    missing = missing_features(list(spec.cpuid), list(host.cpuid))
    if missing:
        raise RecordError(f"this host lacks CPU features the guest uses: {', '.join(missing)}")
    saved = spec.tsc_khz
    if saved and abs(saved - host.tsc_khz) * 1_000_000 > saved * TSC_TOLERANCE_PPM:
        if not host.tsc_control:
            raise RecordError(f"TSC frequency differs ({saved} kHz on the source, "
                              f"{host.tsc_khz} kHz here) and this host cannot scale it")
        return True
    return False


def check_memory(spec: MachineSpec) -> None:
    host = host_memory_bytes()
    need = spec.config.memory
    if host and need > host:
        raise RecordError(f"the guest needs {need >> 20} MiB of RAM; this host has "
                          f"{host >> 20} MiB")


def build_vm(spec: MachineSpec, console: Console | None = None,
             memory: Callable[[int], GuestMemory] | None = None,
             host: HostFacts | None = None) -> VirtualMachine:
    """An unstarted VM of `spec`'s shape on this host, its guest TSC rate kept. `memory`
    makes guest RAM of the given size (a snapshot's mapping), once the host is known to
    have that much; `host` facts probed earlier are re-checked, or the new VM's own used."""
    check_memory(spec)
    ram = None
    try:
        ram = memory(spec.config.memory) if memory is not None else None
        vm = VirtualMachine(spec.config, console, memory=ram, cpuid=list(spec.cpuid))
    except BaseException:  # a console the VM did not take stays its caller's
        if ram is not None:
            ram.close()
        raise
    try:
        if check_host(spec, host or HostFacts.of(vm)):
            vm.set_tsc_khz(spec.tsc_khz)
    except BaseException:
        vm.close()
        raise
    return vm


def decode_for(vm: VirtualMachine, blobs: dict[str, bytes], devices: Any) -> MachineState:
    """Decode the sections against `vm`'s own devices (versions, kinds, completeness)."""
    return decode_state(blobs, vm.config.cpus, devices, vm.device_classes())


def apply_state(vm: VirtualMachine, blobs: dict[str, bytes], devices: Any) -> None:
    """Decode the sections and load them into `vm` (built, not yet started)."""
    vm.apply(decode_for(vm, blobs, devices))
