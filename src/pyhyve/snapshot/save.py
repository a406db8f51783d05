"""Save a VM into the three files: atomically, and without harming the VM on failure.

Order of work: pause, capture vCPU/VM/device state, write memory (page cache) into an
exclusive temporary, then for a checkpoint resume the guest at once (the memory bytes are
already in the file), then fsync, write the state temporary, fsync, and commit (files.py:
a new generation, FILE.meta renamed into place last, the old generation removed after).
Any failure removes the temporaries, leaves the last good snapshot as it was and the VM
running.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import __version__
from ..kvm import ioctls as I
from ..machine.cpuid import cpuid_to_list
from ..machine.memory import PAGE
from . import codec
from .files import SnapshotFiles, commit, create_temp, write_all
from .format import FORMAT, FORMAT_VERSION, SnapshotError, checksum, kern_header, meta_checksum
from .memfile import encode_runs, guest_runs, write_memory

if TYPE_CHECKING:
    from ..vm import MachineState, VirtualMachine

ProgressFactory = Callable[[int], Callable[[int], None]]


@dataclass(frozen=True)
class SaveStats:
    path: str
    kind: str
    ram_bytes: int
    written_bytes: int
    zero_pages: int
    seconds: float
    downtime: float
    generation: int = 0
    removed: tuple[str, ...] = ()  # leftovers of the old snapshot and interrupted saves

    def line(self) -> str:
        extra = f", removed {len(self.removed)} stale file(s)" if self.removed else ""
        return (f"{self.kind} to {self.path}: {self.ram_bytes >> 20} MiB RAM, "
                f"{self.written_bytes / (1 << 20):.1f} MiB written, {self.zero_pages} zero pages "
                f"skipped, {self.seconds:.3f} s, downtime {self.downtime * 1e3:.1f} ms{extra}")


def state_sections(st: MachineState, runs: list[tuple[int, int]]) -> list[tuple[str, bytes]]:
    """The named byte blobs of FILE.kern; migration sends the same blobs."""
    out = [("vm", codec.encode(st.vm)), ("memory-runs", encode_runs(runs))]
    out += [(f"vcpu{i}", codec.encode(v)) for i, v in enumerate(st.vcpus)]
    out += [(f"dev:{name}", codec.encode(d)) for name, d in sorted(st.devices.items())]
    return out


def host_facts(vm: VirtualMachine) -> dict:
    caps = {name: vm.kvm.check_extension(getattr(I, name)) for name in
            ("KVM_CAP_XSAVE", "KVM_CAP_XCRS", "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS",
             "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_TSC_CONTROL", "KVM_CAP_KVMCLOCK_CTRL",
             "KVM_CAP_PIT2", "KVM_CAP_IRQCHIP")}
    return {"tsc_khz": vm.tsc_khz, "kvm_api_version": 12,
            "capabilities": caps, "kernel": os.uname().release,
            "msrs": [f"{i:#x}" for i in vm.msr_indices]}


def build_meta(vm: VirtualMachine, files: SnapshotFiles, kind: str, st: MachineState,
               sections: list[tuple[str, int, int, str]], kern_size: int, mem_stats: object) -> dict:
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pyhyve_version": __version__,
        "generation": files.generation,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "kind": kind,
        "vm": vm.config.to_dict(),
        "description": vm.description.to_dict(),
        "cpuid": cpuid_to_list(vm.cpuid),
        "host": host_facts(vm),
        "memory": {
            "file": os.path.basename(files.memory), "size": vm.memory.size,
            "regions": [{"guest_phys_addr": r.gpa, "size": r.size,
                         "file_offset": r.layout.file_offset} for r in vm.memory.regions],
            "checksum_algo": "xxh3_128", "checksum": mem_stats.checksum,  # type: ignore[attr-defined]
            "data_pages": mem_stats.data_pages,  # type: ignore[attr-defined]
            "zero_pages": mem_stats.zero_pages,  # type: ignore[attr-defined]
        },
        "state": {"file": os.path.basename(files.state), "size": kern_size,
                  "checksum_algo": "xxh3_128",
                  "sections": [{"name": n, "offset": o, "length": ln, "checksum": c}
                               for n, o, ln, c in sections]},
        "devices": [{"name": name, "kind": vm.devices[name].kind, "version": d.VERSION}
                    for name, d in sorted(st.devices.items())],
    }
    meta["meta_checksum"] = meta_checksum(meta)
    return meta


def save(vm: VirtualMachine, base: str, kind: str, progress: ProgressFactory | None = None,
         keep_paused: bool = False) -> SaveStats:
    """Snapshot `vm` to `base` (FILE.meta naming FILE.gN and FILE.gN.kern). `kind` is
    "suspend" or "checkpoint"; a
    checkpoint resumes the guest as soon as its memory is written (unless keep_paused)."""
    base = os.path.abspath(base)
    directory = os.path.dirname(base)
    if not os.path.isdir(directory):
        raise SnapshotError(f"cannot save snapshot: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise SnapshotError(f"cannot save snapshot: directory {directory} is not writable")
    t0 = time.perf_counter()
    if keep_paused and vm.state == "running":
        vm.pause()  # the caller's pause: it outlives the save
    vm.hold()
    held = True
    resumed_at = None
    fds: list[int] = []
    tmps: list[str] = []
    try:
        st = vm.capture()
        runs = guest_runs(vm.memory)
        fd, tmp = create_temp(base, ".mem")
        fds.append(fd)
        tmps.append(tmp)
        os.ftruncate(fd, vm.memory.size)
        data_bytes = sum(n for _, n in runs) * PAGE
        mem_stats = write_memory(vm.memory, fd, runs, progress(data_bytes) if progress else None)
        if kind == "checkpoint":
            vm.release()  # the memory bytes are in the file: the guest may go on
            held = False
            resumed_at = time.perf_counter()
        os.fsync(fd)
        blobs = state_sections(st, runs)
        header = kern_header()
        table, off = [], len(header)
        for name, blob in blobs:
            table.append((name, off, len(blob), checksum(blob)))
            off += len(blob)
        kern = header + b"".join(b for _, b in blobs)
        kfd, ktmp = create_temp(base, ".kern")
        fds.append(kfd)
        tmps.append(ktmp)
        write_all(kfd, kern)
        os.fsync(kfd)

        def make_meta(files: SnapshotFiles) -> bytes:
            meta = build_meta(vm, files, kind, st, table, len(kern), mem_stats)
            return json.dumps(meta, indent=1).encode() + b"\n"

        files, removed = commit(base, tmp, ktmp, make_meta)
    except BaseException as e:
        for p in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if held:
            vm.release()
            held = False
        if isinstance(e, OSError):
            raise SnapshotError(f"cannot save snapshot to {base}: {e.strerror or e}") from None
        raise
    finally:
        for fd in fds:
            os.close(fd)
    if held:  # a suspend: stays paused (the caller stops the VM) as if the user paused it
        if vm.state == "paused":
            vm.pause()
        vm.release()
    end = time.perf_counter()
    downtime = (resumed_at or end) - t0
    return SaveStats(base, kind, vm.memory.size, data_bytes, mem_stats.zero_pages, end - t0,
                     downtime, files.generation, tuple(removed))
