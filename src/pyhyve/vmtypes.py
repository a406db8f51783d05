"""The VM's plain types: its config, run state, captured state, errors and exit statuses,
and the host facts a VM is built on. Kept apart from vm.py (the VM object and its life
cycle) so that module stays one read."""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .description import VmDescription, default_description
from .devices.base import DeviceState
from .errors import BootFailed
from .kvm import Kvm
from .machine.cpuid import DEFAULT_HIDDEN
from .machine.state import VcpuState, VmKvmState

# Exit status of `pyhyve run` (docs in README): 0 the guest powered off or reset itself,
# was suspended or migrated away; 1 the guest or the VMM failed; 2 usage; 3 destroyed
# (pyhyvectl --destroy, or Ctrl-A x on the console); 128+N stopped by signal N.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DESTROYED = 0, 1, 2, 3


MIN_MEMORY = 8 << 20  # the smallest guest pyhyve builds


class RunState(enum.StrEnum):
    """A VM's run state. Transitions (each made under VirtualMachine._state_lock):

        created --start()--> running | paused (started paused, or held)
        running --pause()/hold()--> paused --resume()/release(), nothing else holding--> running
        any --stop (guest power-off, reset, triple fault, destroy, signal, suspend,
               migrated away)--> stopped, which is final: no later transition leaves it
    A str enum: `vm.state == "running"` reads as before, and status prints the word."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class VmError(BootFailed, RuntimeError):
    """A user-facing failure to create or run a VM; the message is the whole story."""


@dataclass
class VmConfig:
    name: str
    memory: int
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    console: str = "stdio"
    cpuid_hidden: tuple[str, ...] = DEFAULT_HIDDEN
    extra: dict[str, str] = field(default_factory=dict)
    # the machine's devices with their bound backends (None: the default machine, its
    # console `console`); recorded apart from this config (description.py)
    description: VmDescription | None = None
    # guest RAM from the host's reserved 2 MiB pages (--hugepages): a host resource, so
    # the command line's choice, never recorded
    hugepages: bool = False

    def machine(self) -> VmDescription:
        return self.description or default_description(self.console)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("description")
        d.pop("hugepages")
        d["cpuid_hidden"] = list(self.cpuid_hidden)
        return d


@dataclass(frozen=True)
class MachineState:
    """Everything needed to continue a paused VM elsewhere, memory aside."""

    vm: VmKvmState
    vcpus: tuple[VcpuState, ...]
    devices: dict[str, DeviceState]


def meminfo(field: str) -> int:
    """A /proc/meminfo figure in bytes (0 where the kernel does not report it)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def host_memory_bytes() -> int:
    return meminfo("MemTotal")


def open_kvm() -> Kvm:
    """/dev/kvm, or the node named by PYHYVE_KVM_DEVICE (for hosts that put it elsewhere)."""
    path = os.environ.get("PYHYVE_KVM_DEVICE") or "/dev/kvm"
    try:
        return Kvm(path)
    except FileNotFoundError:
        raise VmError(f"cannot open {path}: no such device (is KVM enabled on this host?)") from None
    except PermissionError:
        raise VmError(f"cannot open {path}: permission denied (run as root or join group kvm)") from None
    except OSError as e:
        raise VmError(f"cannot open {path}: {e.strerror or e}") from None
