"""Save a VM into the three files: atomically, and without harming the VM on failure.

Order of work: pause, capture vCPU/VM/device state, write memory (page cache), then for a
checkpoint resume the guest at once (the memory bytes are already in the file), then fsync,
write the state and metadata files, fsync, rename all three with the metadata last (it is
the commit record), fsync the directory. Any failure removes the temporary files and leaves
the VM running.
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
from .format import (
    FORMAT,
    FORMAT_VERSION,
    KERN_HEADER,
    SnapshotError,
    checksum,
    fsync_dir,
    meta_checksum,
    paths,
)
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

    def line(self) -> str:
        return (f"{self.kind} to {self.path}: {self.ram_bytes >> 20} MiB RAM, "
                f"{self.written_bytes / (1 << 20):.1f} MiB written, {self.zero_pages} zero pages "
                f"skipped, {self.seconds:.3f} s, downtime {self.downtime * 1e3:.1f} ms")


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
    return {"tsc_khz": vm.vcpus[0].get_tsc_khz(), "kvm_api_version": 12,
            "capabilities": caps, "kernel": os.uname().release,
            "msrs": [f"{i:#x}" for i in vm.msr_indices]}


def build_meta(vm: VirtualMachine, base: str, kind: str, st: MachineState,
               sections: list[tuple[str, int, int, str]], kern_size: int, mem_stats: object) -> dict:
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pyhyve_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "kind": kind,
        "vm": vm.config.to_dict(),
        "cpuid": cpuid_to_list(vm.cpuid),
        "host": host_facts(vm),
        "memory": {
            "file": os.path.basename(base), "size": vm.memory.size,
            "regions": [{"guest_phys_addr": r.gpa, "size": r.size,
                         "file_offset": r.layout.file_offset} for r in vm.memory.regions],
            "checksum_algo": "xxh3_128", "checksum": mem_stats.checksum,  # type: ignore[attr-defined]
            "data_pages": mem_stats.data_pages,  # type: ignore[attr-defined]
            "zero_pages": mem_stats.zero_pages,  # type: ignore[attr-defined]
        },
        "state": {"file": os.path.basename(base) + ".kern", "size": kern_size,
                  "checksum_algo": "xxh3_128",
                  "sections": [{"name": n, "offset": o, "length": ln, "checksum": c}
                               for n, o, ln, c in sections]},
        "devices": [{"name": name, "kind": vm.devices[name].kind, "version": d.VERSION}
                    for name, d in sorted(st.devices.items())],
    }
    meta["meta_checksum"] = meta_checksum(meta)
    return meta


def _write_all(fd: int, data: bytes, offset: int = 0) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def save(vm: VirtualMachine, base: str, kind: str, progress: ProgressFactory | None = None,
         keep_paused: bool = False) -> SaveStats:
    """Snapshot `vm` to `base` (+ .kern, .meta). `kind` is "suspend" or "checkpoint"; a
    checkpoint resumes the guest as soon as its memory is written (unless keep_paused)."""
    base = os.path.abspath(base)
    directory = os.path.dirname(base)
    if not os.path.isdir(directory):
        raise SnapshotError(f"cannot save snapshot: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise SnapshotError(f"cannot save snapshot: directory {directory} is not writable")
    final = paths(base)
    tmp = [f"{p}.tmp-{os.getpid()}" for p in final]
    t0 = time.perf_counter()
    was_running = vm.state == "running"
    if was_running:
        vm.pause()
    resumed_at = None
    fds: list[int] = []
    try:
        st = vm.capture()
        runs = guest_runs(vm.memory)
        fd = os.open(tmp[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fds.append(fd)
        os.ftruncate(fd, vm.memory.size)
        data_bytes = sum(n for _, n in runs) * PAGE
        mem_stats = write_memory(vm.memory, fd, runs, progress(data_bytes) if progress else None)
        if was_running and kind == "checkpoint" and not keep_paused:
            vm.resume()
            resumed_at = time.perf_counter()
        os.fsync(fd)
        blobs = state_sections(st, runs)
        table, off = [], len(KERN_HEADER)
        for name, blob in blobs:
            table.append((name, off, len(blob), checksum(blob)))
            off += len(blob)
        kern = KERN_HEADER + b"".join(b for _, b in blobs)
        kfd = os.open(tmp[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fds.append(kfd)
        _write_all(kfd, kern)
        os.fsync(kfd)
        meta = build_meta(vm, base, kind, st, table, len(kern), mem_stats)
        raw = json.dumps(meta, indent=1).encode() + b"\n"
        mfd = os.open(tmp[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fds.append(mfd)
        _write_all(mfd, raw)
        os.fsync(mfd)
        for a, b in zip(tmp, final, strict=True):
            os.rename(a, b)
        fsync_dir(base)
    except BaseException as e:
        for p in tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if was_running and vm.state == "paused" and not keep_paused:
            vm.resume()
        if isinstance(e, OSError):
            raise SnapshotError(f"cannot save snapshot to {base}: {e.strerror or e}") from None
        raise
    finally:
        for fd in fds:
            os.close(fd)
    end = time.perf_counter()
    downtime = (resumed_at or end) - t0
    return SaveStats(base, kind, vm.memory.size, data_bytes, mem_stats.zero_pages, end - t0,
                     downtime)
