"""Open, verify and restore a snapshot. Nothing runs until every check has passed.

Checks, in order: metadata (structure, own checksum), the memory file's size, the state
file's header and every section's checksum, the memory run table, the memory checksum
(hashing only the runs, not the holes), stray data outside the runs, state decoding,
then the host: memory, CPUID features, TSC frequency.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..description import CONSOLE_ID, DescriptionError, VmDescription, bind, default_description
from ..devices.console import Console
from ..errors import PyhyveError
from ..kvm import ioctls as I
from ..machine.cpuid import cpuid_from_list, for_vcpu, missing_features
from ..machine.memory import PAGE, GuestMemory
from ..machine.state import VcpuState, VmKvmState
from . import codec
from .files import dir_lock, generation_files, meta_path, resolve_base
from .format import KERN_MAGIC, Section, SnapshotError, checksum, kern_header, read_meta, sections
from .lease import LeaseGuard, take_lease
from .memfile import decode_runs, hash_file_runs, load_eager, stray_data, zero_spans

TSC_TOLERANCE_PPM = 250  # KVM's own tolerance before it scales or complains


@dataclass
class Snapshot:
    base: str
    meta: dict[str, Any]
    blobs: dict[str, bytes]
    runs: list[tuple[int, int]]
    mem_fd: int
    memory_path: str = ""
    lease_error: str = ""  # why no lease could be taken on the memory file ("" if held)
    verify_seconds: float = 0.0
    memory_verified: bool = False

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1


def _open_read(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{what} {path} is missing") from None
    except OSError as e:
        raise SnapshotError(f"cannot read {what} {path}: {e.strerror}") from None


def open_snapshot(base: str, verify_memory: bool = True,
                  progress: Callable[[int], Callable[[int], None]] | None = None) -> Snapshot:
    """Read and check FILE.meta and the state file, open the memory file; FILE may be
    given by any of its names. The files are opened under the directory's shared lock,
    so a save committing to the same path at that moment cannot mix generations."""
    t0 = time.perf_counter()
    base = resolve_base(base)
    with dir_lock(base, exclusive=False):
        meta = read_meta(meta_path(base))
        files = generation_files(base, meta.get("generation", 0))
        fd = _open_read(files.memory, "memory file")
        lease_error = take_lease(fd)  # before any byte of it is checked
        try:
            kfd = _open_read(files.state, "state file")
        except BaseException:
            os.close(fd)
            raise
    mem_path, kern_path = files.memory, files.state
    size = meta["memory"]["size"]
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise SnapshotError(f"memory file {mem_path} is {actual} bytes, metadata says {size} "
                                "(truncated or replaced)")
        try:
            kern_size = os.fstat(kfd).st_size
            if kern_size != meta["state"]["size"]:
                raise SnapshotError(f"state file {kern_path} is {kern_size} bytes, metadata says "
                                    f"{meta['state']['size']} (truncated or replaced)")
            kern = os.pread(kfd, kern_size, 0)
        finally:
            os.close(kfd)
        if not kern.startswith(KERN_MAGIC):
            raise SnapshotError(f"{kern_path} is not a pyhyve state file (bad magic)")
        if not kern.startswith(kern_header(meta["format_version"])):
            raise SnapshotError(f"{kern_path}: state file version does not match the metadata's")
        blobs = {}
        for name, sec in sections(meta).items():
            blob = kern[sec.offset:sec.offset + sec.length]
            if checksum(blob) != sec.checksum:
                raise SnapshotError(f"state section '{name}' checksum mismatch (corrupt)")
            blobs[name] = blob
        try:
            runs = decode_runs(blobs["memory-runs"], size // PAGE)
        except ValueError as e:
            raise SnapshotError(f"memory run table: {e}") from None
        if sum(n for _, n in runs) != meta["memory"]["data_pages"]:
            raise SnapshotError("memory run table disagrees with the metadata's page count")
        snap = Snapshot(base, meta, blobs, runs, fd, memory_path=mem_path,
                        lease_error=lease_error)
        if verify_memory:
            verify_memory_file(snap, progress)
        snap.verify_seconds = time.perf_counter() - t0
        return snap
    except BaseException:
        os.close(fd)
        raise


def verify_memory_file(snap: Snapshot, progress: Callable[[int], Callable[[int], None]] | None
                       = None) -> None:
    size = snap.meta["memory"]["size"]
    with mmap.mmap(snap.mem_fd, size, prot=mmap.PROT_READ) as mm:
        data = sum(n for _, n in snap.runs) * PAGE
        got = hash_file_runs(mm, snap.runs, progress(data) if progress else None)
        if got != snap.meta["memory"]["checksum"]:
            raise SnapshotError(f"memory file {snap.base} checksum mismatch (corrupt)")
        stray = stray_data(snap.mem_fd, mm, snap.runs, size)
        if stray is not None:
            raise SnapshotError(f"memory file {snap.base} has data at {stray:#x} where the "
                                "snapshot has a zero page (corrupt)")
    snap.memory_verified = True


def decode_state(blobs: dict[str, bytes], cpus: int, devices_meta: list[dict],
                 device_classes: dict[str, tuple[str, type]]) -> object:
    """MachineState from verified section blobs (snapshot file or migration stream).
    `devices_meta`: [{name, kind, version}]; `device_classes`: name -> (kind, state class)."""
    from ..vm import MachineState

    listed = [d["name"] for d in devices_meta]
    absent = sorted(set(device_classes) - set(listed))
    if absent or len(set(listed)) != len(listed):  # a device left out would run from reset
        raise SnapshotError(f"the saved VM's device list is incomplete or repeats a name "
                            f"(missing {', '.join(absent) or 'none'})")
    try:
        vm_state = codec.decode(VmKvmState, blobs["vm"], "vm")
        vcpus = tuple(codec.decode(VcpuState, blobs[f"vcpu{i}"], f"vcpu{i}") for i in range(cpus))
        devices = {}
        for d in devices_meta:
            name = d["name"]
            if name not in device_classes:
                raise SnapshotError(f"the saved VM has a device '{name}' this pyhyve cannot build")
            kind, cls = device_classes[name]
            if d["kind"] != kind:
                raise SnapshotError(f"device '{name}' is a {d['kind']} in the saved VM, a {kind} here")
            v = d.get("version", 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SnapshotError(f"device '{name}' has a bad state version")
            if v > cls.VERSION:  # the metadata says so before anything is decoded
                raise SnapshotError(f"device '{name}' has {cls.NAME} state version {v}; this "
                                    f"pyhyve reads up to version {cls.VERSION}")
            devices[name] = codec.decode(cls, blobs[f"dev:{name}"], f"dev:{name}")
    except KeyError as e:
        raise SnapshotError(f"state section {e} is missing") from None
    except codec.StateError as e:
        raise SnapshotError(f"state: {e}") from None
    return MachineState(vm_state, vcpus, devices)


def check_host(cpuid_rows: list, saved_tsc_khz: int, host_cpuid: list, host_tsc_khz: int,
               tsc_control: bool) -> bool:
    """Refuse what this host cannot run; returns True when the TSC must be scaled."""
    try:
        needed = cpuid_from_list(cpuid_rows)
    except ValueError as e:
        raise SnapshotError(f"CPUID table: {e}") from None
    missing = missing_features(needed, host_cpuid)
    if missing:
        raise SnapshotError(f"this host lacks CPU features the guest uses: {', '.join(missing)}")
    saved = saved_tsc_khz
    if saved and abs(saved - host_tsc_khz) * 1_000_000 > saved * TSC_TOLERANCE_PPM:
        if not tsc_control:
            raise SnapshotError(f"TSC frequency differs ({saved} kHz on the source, "
                                f"{host_tsc_khz} kHz here) and this host cannot scale it")
        return True
    return False


def recorded_description(meta: dict[str, Any]) -> VmDescription:
    """The machine a snapshot (or a stream's HELLO) records; older ones imply the default
    machine, with the console they recorded as com1's backend."""
    if "description" in meta:
        return VmDescription.from_dict(meta["description"])
    console = meta.get("vm", {}).get("console")
    return default_description(console if isinstance(console, str) else None)


def restore(snap: Snapshot, name: str | None = None, console: Console | None = None,
            console_spec: str | None = None, lazy: bool = True,
            progress: Callable[[int], Callable[[int], None]] | None = None,
            bindings: dict[str, str] | None = None, reuse_paths: bool = False) -> object:
    """Build a VM from a snapshot; returns it ready to start(). If the memory file has not
    been verified yet, it is verified here on another thread while the VM is built (the
    kernel work of building overlaps the hashing), and nothing is returned unless it passed."""

    verifier = None
    verify_error: list[BaseException] = []
    if not snap.memory_verified:
        def verify() -> None:
            t0 = time.perf_counter()
            try:
                verify_memory_file(snap, progress)
            except BaseException as e:
                verify_error.append(e)
            snap.verify_seconds += time.perf_counter() - t0
        verifier = threading.Thread(target=verify, name="verify", daemon=True)
        verifier.start()
    try:
        binds = dict(bindings or {})
        if console_spec:
            binds[CONSOLE_ID] = console_spec  # --console is com1's --bind
        vm = _build(snap, name, console, binds, reuse_paths, lazy, progress)
    finally:
        if verifier is not None:
            verifier.join()
    if verify_error:
        vm.close()  # type: ignore[attr-defined]
        raise verify_error[0]
    return vm


def _build(snap: Snapshot, name: str | None, console: Console | None, bindings: dict[str, str],
           reuse_paths: bool, lazy: bool,
           progress: Callable[[int], Callable[[int], None]] | None) -> object:
    from ..machine.cpuid import CpuidError
    from ..vm import VirtualMachine, VmConfig, host_memory_bytes

    v = snap.meta["vm"]
    try:  # host resources come from the command line, never from the file
        machine = bind(recorded_description(snap.meta), bindings, reuse_paths)
    except DescriptionError as e:
        raise SnapshotError(str(e)) from None
    com1 = machine.device(CONSOLE_ID)
    config = VmConfig(name=name or v["name"], memory=v["memory"], cpus=v["cpus"],
                      kernel=v.get("kernel"), initrd=v.get("initrd"), cmdline=v["cmdline"],
                      console=(com1.backend if com1 and com1.backend else "null"),
                      cpuid_hidden=tuple(v["cpuid_hidden"]), description=machine)
    host = host_memory_bytes()
    if host and config.memory > host:
        raise SnapshotError(f"the guest needs {config.memory >> 20} MiB of RAM; this host has "
                            f"{host >> 20} MiB")
    try:
        cpuid = cpuid_from_list(snap.meta["cpuid"])
    except CpuidError as e:
        raise SnapshotError(f"metadata: {e}") from None
    if lazy:
        memory = GuestMemory(config.memory, backing_fd=snap.mem_fd, private=True)
        try:
            memory.map_anonymous(zero_spans(snap.runs, memory))
        except BaseException:
            memory.close()
            raise
    else:
        memory = GuestMemory(config.memory, name=f"pyhyve-{config.name}")
    try:  # the devices (com1's console included) open their bound backends
        vm = VirtualMachine(config, console, memory=memory, cpuid=cpuid)
    except BaseException:
        memory.close()
        if console is not None:
            console.close()
        raise
    try:
        scale = check_host(snap.meta["cpuid"], snap.meta["host"]["tsc_khz"],
                           vm.kvm.supported_cpuid(), vm.tsc_khz,
                           bool(vm.kvm.check_extension(I.KVM_CAP_TSC_CONTROL)))
        if scale:
            vm.set_tsc_khz(snap.meta["host"]["tsc_khz"])
        for i, vc in enumerate(vm.vcpus):
            vc.set_cpuid2(for_vcpu(cpuid, i, config.cpus))
        state = decode_state(snap.blobs, config.cpus, snap.meta["devices"],
                             vm.device_classes())
        if not lazy:
            with mmap.mmap(snap.mem_fd, config.memory, prot=mmap.PROT_READ) as mm:
                data = sum(n for _, n in snap.runs) * PAGE
                load_eager(vm.memory, mm, snap.runs, progress(data) if progress else None)
        vm.apply(state)  # type: ignore[arg-type]
        if lazy:
            guard = LeaseGuard(memory, snap.mem_fd, snap.memory_path, snap.meta["memory"]["size"],
                               snap.lease_error, lambda why: vm.stop(why, 1), vm.paused)
            memory.guard = guard
            vm.snapshot_file = snap.memory_path
            guard.start()
    except PyhyveError as e:  # the user's or the host's: said as it is
        vm.close()
        if isinstance(e, SnapshotError):
            raise
        raise SnapshotError(f"cannot restore: {e}") from None
    except OSError as e:  # the host refused something (memory, a mapping): not a bug
        vm.close()
        raise SnapshotError(f"cannot restore: {e.strerror or e}") from None
    except BaseException:  # anything else is a bug: it escapes as itself
        vm.close()
        raise
    return vm


__all__ = ["Section", "Snapshot", "SnapshotError", "open_snapshot", "restore"]
