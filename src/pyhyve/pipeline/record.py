"""The machine record: what a guest's machine is, as a snapshot's metadata stores it and a
migration stream's HELLO sends it (the same keys: vm, description, cpuid, host, memory).
It is untrusted input on the way back: `MachineSpec.from_record` checks every field it
uses, binds host backends by the binding rule (description.py), and yields the one value
the VM is rebuilt from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import untrusted
from ..description import CONSOLE_ID, DescriptionError, VmDescription, bind, default_description
from ..errors import RecordError
from ..kvm import ioctls as I
from ..kvm.structs import KvmCpuidEntry2
from ..machine.cpuid import CpuidError, cpuid_from_list, cpuid_to_list
from ..machine.memory import PAGE, ram_layout
from ..vmtypes import MIN_MEMORY, VmConfig

if TYPE_CHECKING:
    from ..vm import VirtualMachine

MAX_MEMORY = 1 << 40
MAX_CPUS = 64
MAX_CPUID_ROWS = 4096
MAX_HIDDEN = 256  # names; a command line gives at most one of each known feature
HOST_CAPS = ("KVM_CAP_XSAVE", "KVM_CAP_XCRS", "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS",
             "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_TSC_CONTROL", "KVM_CAP_KVMCLOCK_CTRL",
             "KVM_CAP_PIT2", "KVM_CAP_IRQCHIP")


def memory_regions(size: int) -> list[dict[str, int]]:
    return [{"guest_phys_addr": r.guest_phys_addr, "size": r.size, "file_offset": r.file_offset}
            for r in ram_layout(size)]


def host_facts(vm: VirtualMachine) -> dict[str, Any]:
    """What the source host was (informational, except the TSC rate the guest keeps)."""
    caps = {name: vm.kvm.check_extension(getattr(I, name)) for name in HOST_CAPS}
    return {"tsc_khz": vm.tsc_khz, "kvm_api_version": 12, "capabilities": caps,
            "kernel": os.uname().release, "msrs": [f"{i:#x}" for i in vm.msr_indices]}


def machine_record(vm: VirtualMachine) -> dict[str, Any]:
    return {"vm": vm.config.to_dict(), "description": vm.description.to_dict(),
            "cpuid": cpuid_to_list(vm.cpuid), "host": host_facts(vm),
            "memory": {"size": vm.memory.size, "regions": memory_regions(vm.memory.size)}}


F = untrusted.Fields(RecordError)


def validate_record(rec: dict[str, Any]) -> None:
    """Structure and bounds of the record's fields; RecordError names the first bad one."""
    vm = F.obj(rec, "vm")
    size = F.integer(vm, "memory", MIN_MEMORY, MAX_MEMORY)
    F.need(size % PAGE == 0, "memory size is not page-aligned")
    F.integer(vm, "cpus", 1, MAX_CPUS)
    F.text(vm, "name")
    F.text(vm, "cmdline")
    F.opt_text(vm, "kernel")
    F.opt_text(vm, "initrd")
    hidden = F.array(vm, "cpuid_hidden", MAX_HIDDEN)
    F.need(all(isinstance(x, str) for x in hidden), "bad cpuid_hidden")
    mem = F.obj(rec, "memory")
    F.need(F.integer(mem, "size", PAGE, MAX_MEMORY) == size, "memory size disagrees with the VM config")
    F.need(mem.get("regions") == memory_regions(size), "memory regions do not match the memory size")
    F.array(rec, "cpuid", MAX_CPUID_ROWS)
    F.integer(F.obj(rec, "host"), "tsc_khz", 0, 1 << 32)
    if "description" in rec:
        recorded_description(rec)


def recorded_description(rec: dict[str, Any]) -> VmDescription:
    """The machine a record describes; records from before descriptions imply the default
    machine, with the console they recorded as com1's backend."""
    if "description" not in rec:
        console = rec.get("vm", {}).get("console")
        return default_description(console if isinstance(console, str) else None, genid=False)
    try:
        return VmDescription.from_dict(rec["description"])
    except DescriptionError as e:
        raise RecordError(str(e)) from None


@dataclass(frozen=True)
class MachineSpec:
    """A checked record with host backends bound: everything `build_vm` needs."""

    config: VmConfig
    cpuid: tuple[KvmCpuidEntry2, ...]
    tsc_khz: int  # the guest's TSC rate where it ran (0: not recorded)

    @classmethod
    def from_record(cls, rec: dict[str, Any], name: str | None, bindings: dict[str, str],
                    reuse_paths: bool) -> MachineSpec:
        validate_record(rec)
        vm = rec["vm"]
        try:  # host resources come from the command line, never from the record
            machine = bind(recorded_description(rec), bindings, reuse_paths)
            cpuid = cpuid_from_list(rec["cpuid"])
        except (DescriptionError, CpuidError) as e:
            raise RecordError(str(e)) from None
        com1 = machine.device(CONSOLE_ID)
        config = VmConfig(name=name or vm["name"], memory=vm["memory"], cpus=vm["cpus"],
                          kernel=vm.get("kernel"), initrd=vm.get("initrd"), cmdline=vm["cmdline"],
                          console=com1.backend if com1 and com1.backend else "null",
                          cpuid_hidden=tuple(vm["cpuid_hidden"]), description=machine)
        return cls(config, tuple(cpuid), rec["host"]["tsc_khz"])
