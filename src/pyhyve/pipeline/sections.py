"""A VM's state as named byte sections, and back: `vm`, `vcpuN`, `dev:NAME`, and the
memory run table. The snapshot's state file and the migration stream's STATE frames
carry exactly these blobs; the device list beside them says each device's kind and state
version, which is checked before any section is decoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..devices.base import DeviceState
from ..errors import RecordError
from ..machine.state import VcpuState, VmKvmState
from ..vmtypes import MachineState
from . import codec
from .pages import Runs, encode_runs

if TYPE_CHECKING:
    from ..vm import VirtualMachine

RUNS_SECTION = "memory-runs"


def to_sections(st: MachineState, runs: Runs | None) -> list[tuple[str, bytes]]:
    """The named blobs of a captured state (with the run table when `runs` is given)."""
    out = [("vm", codec.encode(st.vm))]
    if runs is not None:
        out.append((RUNS_SECTION, encode_runs(runs)))
    out += [(f"vcpu{i}", codec.encode(v)) for i, v in enumerate(st.vcpus)]
    out += [(f"dev:{name}", codec.encode(d)) for name, d in sorted(st.devices.items())]
    return out


def device_list(vm: VirtualMachine, st: MachineState) -> list[dict[str, Any]]:
    """[{name, kind, version}] for the devices whose state `st` holds."""
    return [{"name": name, "kind": vm.devices[name].kind, "version": d.VERSION}
            for name, d in sorted(st.devices.items())]


def check_device_list(devices: object) -> list[dict[str, Any]]:
    """The structure of an untrusted device list."""
    if not isinstance(devices, list) or not all(
            isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("kind"), str)
            for d in devices):
        raise RecordError("malformed device list")
    return devices


DeviceClasses = dict[str, tuple[str, type[DeviceState]]]


def _device_class(d: dict[str, Any], classes: DeviceClasses) -> type[DeviceState]:
    name = d["name"]
    if name not in classes:
        raise RecordError(f"the saved VM has a device '{name}' this pyhyve cannot build")
    kind, cls = classes[name]
    if d["kind"] != kind:
        raise RecordError(f"device '{name}' is a {d['kind']} in the saved VM, a {kind} here")
    v = d.get("version", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise RecordError(f"device '{name}' has a bad state version")
    if v > cls.VERSION:  # said before anything is decoded
        raise RecordError(f"device '{name}' has {cls.NAME} state version {v}; this "
                          f"pyhyve reads up to version {cls.VERSION}")
    return cls


def decode_state(blobs: dict[str, bytes], cpus: int, devices: list[dict[str, Any]],
                 classes: DeviceClasses) -> MachineState:
    """MachineState from verified blobs. `devices`: the saved [{name, kind, version}];
    `classes`: name -> (kind, state class) of the VM being built."""
    devices = check_device_list(devices)
    listed = [d["name"] for d in devices]
    absent = sorted(set(classes) - set(listed))
    if absent or len(set(listed)) != len(listed):  # a device left out would run from reset
        raise RecordError(f"the saved VM's device list is incomplete or repeats a name "
                          f"(missing {', '.join(absent) or 'none'})")
    try:
        vm_state = codec.decode(VmKvmState, blobs["vm"], "vm")
        vcpus = tuple(codec.decode(VcpuState, blobs[f"vcpu{i}"], f"vcpu{i}") for i in range(cpus))
        states: dict[str, DeviceState] = {}
        for d in devices:
            section = f"dev:{d['name']}"
            states[d["name"]] = codec.decode(_device_class(d, classes), blobs[section], section)
    except KeyError as e:
        raise RecordError(f"state section {e} is missing") from None
    except codec.StateError as e:
        raise RecordError(f"state: {e}") from None
    return MachineState(vm_state, vcpus, states)
