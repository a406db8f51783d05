"""Open, verify and restore a snapshot. Nothing runs until every check has passed.

Checks, in order: metadata (structure, own checksum), the memory file's size, the state
file's header and every section's checksum, the memory run table, the memory checksum
(hashing only the runs, not the holes), stray data outside the runs; then, building the
VM (pipeline/build.py), the host: RAM, CPUID features, TSC frequency; then the state,
decoded against the built VM's devices; only then is memory copied (eager) or left mapped
under the file's lease (lazy).
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..description import CONSOLE_ID, VmDescription
from ..devices.console import Console
from ..devices.virtio.blk import DiskError, file_identity
from ..errors import PyhyveError, RecordError
from ..machine.memory import PAGE, GuestMemory
from ..pipeline.build import build_vm, decode_for
from ..pipeline.pages import Runs, decode_runs
from ..pipeline.record import MachineSpec
from ..vm import VirtualMachine
from .chain import layers, open_parents, root, stack
from .files import dir_lock, disk_copy_path, generation_files, meta_path, resolve_base
from .format import KERN_MAGIC, Section, SnapshotError, checksum, kern_header, read_meta, sections
from .incremental import ParentRef, depth_of, track
from .lease import LeaseGuard, take_lease
from .loadset import BLOCK_PAGES, hot_blocks, intersect, prefetch_runs
from .loadset import SECTION as LOADING_SECTION
from .memfile import hash_file_runs, load_eager, stray_data, zero_spans
from .prefetch import Prefetcher

ProgressFactory = Callable[[int], Callable[[int], None]]

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
    parent: Snapshot | None = None  # an incremental layer's (chain.py)
    loading: Runs | None = None  # the recorded loading set (loadset.py); None before v5

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1
        if self.parent is not None:
            self.parent.close()


def _open_read(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{what} {path} is missing") from None
    except OSError as e:
        raise SnapshotError(f"cannot read {what} {path}: {e.strerror}") from None


def open_snapshot(base: str, verify_memory: bool = True,
                  progress: ProgressFactory | None = None, parents: bool = True) -> Snapshot:
    """Read and check FILE.meta and the state file, open the memory file; FILE may be
    given by any of its names. The files are opened under the directory's shared lock,
    so a save committing to the same path at that moment cannot mix generations. An
    incremental layer's parents are opened and checked too (chain.py)."""
    snap = _open_one(base, verify_memory, progress)
    if parents and snap.meta.get("parent"):
        open_parents(snap, lambda b: _open_one(b, verify_memory, progress))
    return snap


def _open_one(base: str, verify_memory: bool, progress: ProgressFactory | None) -> Snapshot:
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
        loading = None
        if LOADING_SECTION in blobs:  # required from version 5 (format.py)
            if len(blobs[LOADING_SECTION]) > 16 * (size // PAGE // BLOCK_PAGES + 1):
                raise SnapshotError(f"state section '{LOADING_SECTION}' has more runs than "
                                    "RAM has 2 MiB blocks (corrupt)")
            try:
                loading = decode_runs(blobs[LOADING_SECTION], size // PAGE, "loading set")
            except ValueError as e:
                raise SnapshotError(f"state section '{LOADING_SECTION}': {e}") from None
        snap = Snapshot(base, meta, blobs, runs, fd, memory_path=mem_path,
                        lease_error=lease_error, loading=loading)
        if verify_memory:
            verify_memory_file(snap, progress)
        snap.verify_seconds = time.perf_counter() - t0
        return snap
    except BaseException:
        os.close(fd)
        raise


def verify_memory_file(snap: Snapshot, progress: ProgressFactory | None
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


def restore(snap: Snapshot, name: str | None = None, console: Console | None = None,
            console_spec: str | None = None, lazy: bool = True,
            progress: ProgressFactory | None = None,
            bindings: dict[str, str] | None = None, reuse_paths: bool = False,
            prefetch: bool = True, clone: bool = False,
            track_dirty: bool = False, clone_dir: str | None = None,
            disk_changed_ok: bool = False, hugepages: bool = False) -> VirtualMachine:
    """Build a VM from a snapshot; returns it ready to start(). Lazily (this function's default)
    the guest reads the memory file through a private mapping, except for the snapshot's loading
    set, copied into memory of its own first (loadset.py); with no set recorded and `prefetch`,
    a thread pulls every data page in while it runs. A `clone` is lazy, copies nothing, and its
    prefetch only maps the file's pages (the page cache, shared by every clone of the snapshot):
    a clone costs the host only the pages it writes, and gets private copy-on-write disks
    (scratch files in `clone_dir`, default the temporary directory; devices/virtio/image.py).
    Every restore gets a new generation ID (devices/genid.py). A layer's chain is stacked
    (chain.py) and the VM goes on tracking for the next layer over it, as `track_dirty` makes
    any restore do (incremental.py). A disk that changed since the save is refused unless
    `disk_changed_ok` (devices/virtio/blk.py). If the memory file has not been verified yet, it
    is verified here on another thread while the VM is built (the kernel work of building
    overlaps the hashing), and nothing is returned unless it passed. `hugepages` puts guest RAM
    in the host's reserved 2 MiB pages (machine/memory.py): an eager restore only, since a lazy
    one maps the file."""
    if hugepages and (lazy or clone):
        raise SnapshotError("huge pages need an eager restore (a lazy one or a clone maps "
                            "the snapshot's file)")

    verifier = None
    verify_error: list[BaseException] = []
    if not snap.memory_verified:
        def verify() -> None:
            t0 = time.perf_counter()
            try:
                for layer in layers(snap):
                    if not layer.memory_verified:
                        verify_memory_file(layer, progress)
            except BaseException as e:
                verify_error.append(e)
            snap.verify_seconds += time.perf_counter() - t0
        verifier = threading.Thread(target=verify, name="verify", daemon=True)
        verifier.start()
    try:
        binds = dict(bindings or {})
        if console_spec:
            binds[CONSOLE_ID] = console_spec  # --console is com1's --bind
        opts = f",clone={clone_dir or _tempdir()}" if clone else ""
        vm = _build(snap, name, console, binds, reuse_paths, lazy or clone, progress,
                    prefetch, opts + (",force" if disk_changed_ok else ""), clone, hugepages)
    finally:
        if verifier is not None:
            verifier.join()
    if verify_error:
        vm.close()
        raise verify_error[0]
    if track_dirty or (snap.meta.get("parent") and not clone):  # before the guest runs
        track(vm, ParentRef(snap.base, snap.meta["meta_checksum"], depth_of(snap.meta)))
    return vm


def _build(snap: Snapshot, name: str | None, console: Console | None, bindings: dict[str, str],
           reuse_paths: bool, lazy: bool, progress: ProgressFactory | None,
           prefetch: bool, disk_opts: str, clone: bool, hugepages: bool) -> VirtualMachine:
    try:
        spec = MachineSpec.from_record(snap.meta, name, bindings, reuse_paths)
    except RecordError as e:
        raise SnapshotError(f"metadata: {e}") from None
    if hugepages:
        spec = replace(spec, config=replace(spec.config, hugepages=True))
    if disk_opts or clone:
        spec = _device_options(spec, disk_opts, clone)
    try:
        bottom = root(snap)
        if clone and bottom is not snap:
            raise SnapshotError(f"{snap.base} is an incremental layer: clones share a full "
                                "snapshot's memory (flatten it first: pyhyve snapshot merge)")
        # a lazy restore copies its loading set's blocks in before the guest starts, into
        # memory of their own (2 MiB pages); a clone keeps every page shared instead
        hot = hot_blocks(snap.loading, bottom.runs, spec.config.memory // PAGE) \
            if lazy and not clone else []
        vm = build_vm(spec, console,
                      (lambda size: _lazy_memory(bottom, size, hot)) if lazy else None)
    except PyhyveError as e:
        raise _loading_error(e) from None
    except OSError as e:  # the host refused something (memory, a mapping): not a bug
        raise SnapshotError(f"cannot restore: {e.strerror or e}") from None
    try:
        state = decode_for(vm, snap.blobs, snap.meta["devices"])  # before any copying
        copy = bottom.runs if not lazy else intersect(hot, bottom.runs)
        if copy:
            data = sum(n for _, n in copy) * PAGE
            load_eager(vm.memory, bottom.mem_fd, copy, progress(data) if progress else None)
        stack(vm.memory, snap)
        vm.apply(state)
        vm.renew_generation()  # the guest's memory is a copy now: it may run twice
        if lazy:  # what the hot blocks do not hold comes in on first touch, or, with no
            # loading set recorded, by prefetch
            _guard(vm, bottom, prefetch_runs(snap.loading, bottom.runs)
                   if prefetch and not hot else None, clone)
    except PyhyveError as e:  # the user's or the host's: said as it is
        vm.close()
        raise _loading_error(e, snap) from None
    except OSError as e:
        vm.close()
        raise SnapshotError(f"cannot restore: {e.strerror or e}") from None
    except BaseException:  # anything else is a bug: it escapes as itself
        vm.close()
        raise
    return vm


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()


def _device_options(spec: MachineSpec, disk_opts: str, clone: bool) -> MachineSpec:
    """Backend options of this restore: a clone writes its own copy-on-write view of each
    disk, never the image (`,clone=DIR`), and gets a fresh MAC unless one is bound
    (`,newmac`); `,force` accepts a changed disk."""
    def opts(kind: str) -> str:
        if kind == "virtio-blk":
            return disk_opts
        return ",newmac" if kind == "virtio-net" and clone else ""
    devices = tuple(replace(d, backend=f"{d.backend}{opts(d.kind)}") if d.backend else d
                    for d in spec.config.machine().devices)
    return replace(spec, config=replace(spec.config, description=VmDescription(devices)))


def _loading_error(e: PyhyveError, snap: Snapshot | None = None) -> SnapshotError:
    kept = snap.meta.get("disk_copies") if snap is not None else None
    if kept and isinstance(e, DiskError):  # a checkpoint's VM wrote on: say where the
        # disks as they were are (the user binds one, or a copy to keep the snapshot's)
        files = generation_files(snap.base, snap.meta["generation"])  # type: ignore[union-attr]
        where = ", ".join(f"{d} in {disk_copy_path(files, d)}" for d in sorted(kept))
        return SnapshotError(f"cannot restore: {e}; the checkpoint kept its disks as they "
                             f"were ({where}): bind a copy of one, e.g. --bind "
                             f"{min(kept)}=COPY after cp --sparse=always")
    return e if isinstance(e, SnapshotError) else SnapshotError(f"cannot restore: {e}")


def check_disk_copies(snap: Snapshot) -> int:
    """Every disk the checkpoint kept is there and is the disk at its pause (its identity,
    module docstring of devices/virtio/blk.py); returns how many."""
    kept = snap.meta.get("disk_copies") or {}
    files = generation_files(snap.base, snap.meta["generation"]) if kept else None
    for dev_id, ident in sorted(kept.items()):
        assert files is not None
        path = disk_copy_path(files, dev_id)
        try:  # (not a link, not a FIFO that would hang us)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise SnapshotError(f"the copy of {dev_id} ({path}) cannot be read: "
                                f"{e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SnapshotError(f"the copy of {dev_id} ({path}) is not a regular file")
            size = os.fstat(fd).st_size
            if size != ident["size"] or file_identity(fd, size) != ident:
                raise SnapshotError(f"the copy of {dev_id} ({path}) is not the disk at the "
                                    "checkpoint (changed or corrupt)")
        finally:
            os.close(fd)
    return len(kept)


def _lazy_memory(snap: Snapshot, size: int, hot: Runs) -> GuestMemory:
    """Guest RAM as a private mapping of the memory file; the big zero stretches and the
    `hot` blocks mapped anonymous (the former never read from the file, the latter copied
    in by the caller)."""
    memory = GuestMemory(size, backing_fd=snap.mem_fd)
    try:
        memory.map_anonymous(zero_spans(snap.runs, memory))
        memory.map_anonymous([piece for p, n in hot  # never across a region's edge
                              for piece in memory.pieces(p * PAGE, (p + n) * PAGE, 1 << 62)])
    except BaseException:
        memory.close()
        raise
    return memory


def _guard(vm: VirtualMachine, snap: Snapshot, prefetch: Runs | None, clone: bool) -> None:
    """Watch the memory file's lease: a writer elsewhere detaches the guest from it; and
    prefetch the runs `prefetch` names (the loading set's data pages, or all of them)."""
    guard = LeaseGuard(vm.memory, snap.mem_fd, snap.memory_path, snap.meta["memory"]["size"],
                       snap.lease_error, lambda why: vm.stop(why, 1), vm.paused)
    vm.memory.guard = guard
    guard.start()
    if prefetch is not None and guard.depends:  # measured (docs/benchmarks.md): populating
        # for writing reaches full speed 2.3x sooner at 512 MiB; for reading it is slower
        # than nothing, but a clone reads to keep the page cache's pages shared
        guard.prefetch = Prefetcher(vm.memory, prefetch, write=not clone)
        guard.prefetch.start()


__all__ = ["Section", "Snapshot", "SnapshotError", "open_snapshot", "restore"]
