"""Save a VM into the three files: atomically, and without harming the VM on failure.

Order of work: pause, capture vCPU/VM/device state, write memory (page cache) into an
exclusive temporary -- for a checkpoint, copy it into a staging buffer (staging.py) instead,
resume the guest at once, and write the file from the copy -- then fsync, write the state
temporary, fsync, and commit (files.py:
a new generation, FILE.meta renamed into place last, the old generation removed after).
Any failure removes the temporaries, leaves the last good snapshot as it was and the VM
running.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..devices.virtio.blk import Blk, file_identity
from ..devices.virtio.diskcopy import DiskCopy
from ..devices.virtio.image import FICLONE
from ..machine.memory import PAGE
from ..pipeline.pages import Runs, candidate_runs, encode_runs, guest_runs
from ..pipeline.record import machine_record
from ..pipeline.sections import device_list, to_sections
from ..vmtypes import meminfo
from . import loadset
from .files import DISK_COPY, SnapshotFiles, commit, create_temp, write_all
from .format import FORMAT, FORMAT_VERSION, SnapshotError, checksum, kern_header, meta_checksum
from .incremental import Layer, begin, pending_pages, plan
from .memfile import MemStats, write_memory
from .staging import Placed, Staging

if TYPE_CHECKING:
    from ..vm import MachineState, VirtualMachine

ProgressFactory = Callable[[int], Callable[[int], None]]
SectionRow = tuple[str, int, int, str]  # name, offset, length, checksum


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
    parent: str | None = None      # an incremental layer's parent
    note: str = ""                 # why an incremental save wrote a full snapshot

    def line(self) -> str:
        extra = f", removed {len(self.removed)} stale file(s)" if self.removed else ""
        if self.note:
            extra += f", a full snapshot: {self.note}"
        what = (f"{self.zero_pages} zero pages skipped" if not self.parent else
                f"a layer over {self.parent}: {self.written_bytes // 4096} pages written since")
        return (f"{self.kind} to {self.path}: {self.ram_bytes >> 20} MiB RAM, "
                f"{self.written_bytes / (1 << 20):.1f} MiB written, {what}, "
                f"{self.seconds:.3f} s, downtime {self.downtime * 1e3:.1f} ms{extra}")


def build_meta(vm: VirtualMachine, files: SnapshotFiles, kind: str, st: MachineState,
               sections: list[SectionRow], kern_size: int,
               mem_stats: MemStats, parent: dict[str, Any] | None = None,
               disks: dict[str, dict[str, object]] | None = None) -> dict[str, Any]:
    """FILE.meta: the machine record (pipeline/record.py) plus what the files hold."""
    record = machine_record(vm)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pyhyve_version": __version__,
        "generation": files.generation,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "kind": kind,
        "parent": parent,  # incremental.py: the snapshot a layer stacks on
        **record,
        "memory": {
            **record["memory"], "file": os.path.basename(files.memory),
            "checksum_algo": "xxh3_128", "checksum": mem_stats.checksum,
            "data_pages": mem_stats.data_pages, "zero_pages": mem_stats.zero_pages,
        },
        "state": {"file": os.path.basename(files.state), "size": kern_size,
                  "checksum_algo": "xxh3_128",
                  "sections": [{"name": n, "offset": o, "length": ln, "checksum": c}
                               for n, o, ln, c in sections]},
        "devices": device_list(vm, st),
    }
    if disks:  # a checkpoint's copies of its disks (FILE.gN.diskK), with their identities
        meta["disk_copies"] = disks
    meta["meta_checksum"] = meta_checksum(meta)
    return meta


class _Temps:
    """A save's exclusive temporaries: always closed, removed unless the commit renamed
    them into place."""

    def __init__(self, base: str) -> None:
        self.base, self.fds, self.paths = base, list[int](), list[str]()

    def create(self, suffix: str) -> tuple[int, str]:
        fd, path = create_temp(self.base, suffix)
        self.fds.append(fd)
        self.paths.append(path)
        return fd, path

    def __enter__(self) -> _Temps:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        for fd in self.fds:
            os.close(fd)
        if kind is not None:
            for p in self.paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)


def _target(base: str) -> str:
    base = os.path.abspath(base)
    directory = os.path.dirname(base)
    if not os.path.isdir(directory):
        raise SnapshotError(f"cannot save snapshot: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise SnapshotError(f"cannot save snapshot: directory {directory} is not writable")
    return base


def _memory_file(temps: _Temps, vm: VirtualMachine, runs: Runs,
                 progress: ProgressFactory | None,
                 staging: Staging | None = None,
                 placed: Placed | None = None) -> tuple[int, str, MemStats]:
    """Guest RAM (or its staged copy, `placed` in it) into a temporary (page cache; the
    caller fsyncs)."""
    fd, tmp = temps.create(".mem")
    os.ftruncate(fd, vm.memory.size)
    data_bytes = sum(n for _, n in runs) * PAGE
    report = progress(data_bytes) if progress else None
    if staging is not None and placed is not None:
        return fd, tmp, staging.write_out(fd, placed, vm.memory.size, report)
    return fd, tmp, write_memory(vm.memory, fd, runs, report)


def _state_file(temps: _Temps, st: MachineState, runs: Runs,
                loading: Runs) -> tuple[str, list[SectionRow], int]:
    """The state sections (and the loading set) into a temporary, fsynced; returns it, its
    table and its size."""
    table, off = [], len(kern_header())
    blobs = [*to_sections(st, runs), (loadset.SECTION, encode_runs(loading))]
    for name, blob in blobs:
        table.append((name, off, len(blob), checksum(blob)))
        off += len(blob)
    kfd, ktmp = temps.create(".kern")
    write_all(kfd, kern_header() + b"".join(b for _, b in blobs))
    os.fsync(kfd)
    return ktmp, table, off


def _staging(vm: VirtualMachine, incremental: bool, candidates: Runs) -> Staging | None:
    """A staging buffer for the guest's data (an incremental layer's: the pages written so
    far, with slack for what the guest writes until it is held), faulted in while it still
    runs; none when the host could not spare the memory (the checkpoint then writes while
    the guest is held)."""
    pages = pending_pages(vm) if incremental else None
    if pages is None:  # what the pause will copy: zero pages the guest touched too, or,
        # if the host cannot spare that much, only the data (then found during the pause)
        pages = sum(n for _, n in candidates)
        if pages * PAGE * 2 > meminfo("MemAvailable"):
            pages = sum(n for _, n in guest_runs(vm.memory))
    want = pages * PAGE
    if want * 2 > meminfo("MemAvailable"):
        return None
    try:
        return Staging(want)
    except OSError:
        return None


def _warm(vm: VirtualMachine, candidates: Runs) -> None:
    """Before the pause, map the snapshot file's data that a lazily restored guest never
    touched (read from disk if it must be, GIL released), so the pause copies it at memory
    speed instead of waiting on the disk."""
    mem = vm.memory
    backed = [(off // PAGE, n // PAGE) for off, n in mem.file_backed()]  # sorted runs
    for page, count in loadset.intersect(backed, candidates):
        for off, n in mem.pieces(page * PAGE, (page + count) * PAGE, 1 << 30):
            mem.populate(off, n, write=False)


def _recorder(vm: VirtualMachine, window: float) -> loadset.Recorder | None:
    """The loading set's recorder, if asked for and the host lets the dirty log be
    switched on (a save without one still works: its restore prefetches every data
    page)."""
    if window <= 0:
        return None
    try:
        return loadset.Recorder(vm, window)
    except OSError:
        return None


class _DiskCopies:
    """A checkpoint's copies of its writable disks (devices/virtio/diskcopy.py), begun
    while the devices are quiesced; ended on leaving the block, before the temporaries
    it writes are closed, so a failed save leaves the disks as they were."""

    def __init__(self) -> None:
        self.disks: list[tuple[str, Blk, DiskCopy, int, str]] = []  # id, device, copy,
        # its fd and its temporary

    def __enter__(self) -> _DiskCopies:
        return self

    def __exit__(self, *exc: object) -> None:
        for disk in self.disks:
            disk[1].end_copy(disk[2])

    @staticmethod
    def writable(vm: VirtualMachine) -> list[tuple[str, Blk]]:
        """The disks a checkpoint keeps; refused (one line, before any pause) where one
        cannot be kept: an id that cannot name a file of the snapshot, or no room."""
        disks = []
        for name, dev in vm.devices.items():
            blk = getattr(dev, "backend", None)
            if isinstance(blk, Blk) and not blk.read_only:
                disks.append((name, blk))
        for name, _ in disks:
            if not DISK_COPY.fullmatch(name):
                raise SnapshotError(f"cannot keep disk '{name}' with the checkpoint (only "
                                    "disks with ids disk0..disk999 are kept): use --no-disk-copy")
        return disks

    @staticmethod
    def check_room(disks: list[tuple[str, Blk]], base: str) -> None:
        need = sum(blk.allocated() for _, blk in disks)
        st = os.statvfs(os.path.dirname(base))
        room = st.f_bavail * st.f_frsize
        if need and need + (64 << 20) > room and not _reflinks(disks[0][1], base):
            raise SnapshotError(f"cannot keep the VM's disks with the checkpoint: they hold "
                                f"{need >> 20} MiB, {os.path.dirname(base)} has {room >> 20} "
                                "MiB free (--no-disk-copy leaves them out)")

    def begin(self, disks: list[tuple[str, Blk]], temps: _Temps) -> None:
        for name, blk in disks:
            fd, tmp = temps.create(f".{name}")
            self.disks.append((name, blk, blk.begin_copy(fd), fd, tmp))

    def finish(self) -> dict[str, dict[str, object]]:
        """Wait for every copy; each must be the disk at the pause (its identity then,
        taken by the capture). Returns id -> identity for the metadata."""
        out = {}
        for name, blk, copy, fd, _ in self.disks:
            copy.finish()
            got = file_identity(fd, copy.size)
            if got != blk.saved_identity:
                raise SnapshotError(f"the copy of {name} does not match the disk at the pause")
            out[name] = got
        return out

    def temporaries(self) -> dict[str, str]:
        return {name: tmp for name, _, _, _, tmp in self.disks}


def _reflinks(blk: Blk, base: str) -> bool:
    """Whether the disk can be reflinked beside `base` (then a copy takes no room)."""
    fd, tmp = create_temp(base, ".disk0")
    try:
        fcntl.ioctl(fd, FICLONE, blk.image.fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(tmp)


def save(vm: VirtualMachine, base: str, kind: str, progress: ProgressFactory | None = None,
         keep_paused: bool = False, stage: bool = True, incremental: bool = False,
         loading_window: float = 0.0, disk_copies: bool = True) -> SaveStats:
    """Snapshot `vm` to `base` (FILE.meta naming FILE.gN and FILE.gN.kern). `kind` is
    "suspend" or "checkpoint"; a checkpoint resumes the guest as soon as its memory is
    copied aside (a staging buffer, unless `stage` is False) or written (unless
    keep_paused). A suspended VM stays paused; the caller stops it. `incremental`
    writes only the pages written since the VM's previous incremental save, as a layer
    over it (incremental.py). With `loading_window` (seconds), the guest's writes are
    sampled that long before the pause for the loading set a lazy restore copies in
    (loadset.py); without, the set is empty. A checkpoint keeps each writable disk as it
    was at the pause (FILE.gN.diskK), unless `disk_copies` is False; it commits once the
    copies are complete."""
    base = _target(base)
    refusal = vm.save_refusal()
    if refusal:
        raise SnapshotError(f"cannot save {vm.config.name}: {refusal}")
    keep = _DiskCopies.writable(vm) if kind == "checkpoint" and disk_copies else []
    if keep:
        _DiskCopies.check_room(keep, base)
    t0 = time.perf_counter()
    if keep_paused and vm.state == "running":
        vm.pause()  # the caller's pause: it outlives the save
    recorder = _recorder(vm, loading_window)
    try:
        ahead = plan(vm, base) if incremental else None  # file checks, before the guest waits
        staging = None
        if stage and kind == "checkpoint":
            candidates = candidate_runs(vm.memory)  # one scan for both, before the pause
            staging = _staging(vm, incremental, candidates)
            if staging is not None:
                _warm(vm, candidates)
        loading = recorder.finish() if recorder else []  # the window overlaps the staging
    finally:
        if recorder:
            recorder.cancel()
    t_hold = time.perf_counter()
    vm.hold()
    held, done, resumed_at = True, False, None
    layer: Layer | None = None
    try:
        with _Temps(base) as temps, _DiskCopies() as copies:
            st = vm.capture()
            if keep:
                copies.begin(keep, temps)
            if ahead is not None:
                layer = begin(vm, lambda: guest_runs(vm.memory), ahead)
                runs = layer.runs  # a layer records the pages written, zero or not
            else:  # zero pages are found after the pause when staging, else now
                runs = candidate_runs(vm.memory) if staging else guest_runs(vm.memory)
                if staging is not None and not staging.fits(runs):
                    runs = guest_runs(vm.memory)  # only the data: it may still fit
            if staging is not None and staging.fits(runs):
                staging.copy_in(vm.memory, runs)
                vm.release()  # the guest's memory is copied aside: it may go on
                held, resumed_at = False, time.perf_counter()
                placed = staging.placed(drop_zero=ahead is None)
                runs = [(page, count) for page, count, _ in placed]
                fd, tmp, mem_stats = _memory_file(temps, vm, runs, progress, staging, placed)
            else:  # outgrew the buffer (runs are guest_runs then): written while held
                fd, tmp, mem_stats = _memory_file(temps, vm, runs, progress)
            if kind == "checkpoint" and held:
                vm.release()  # the memory bytes are in the file: the guest may go on
                held, resumed_at = False, time.perf_counter()
            os.fsync(fd)
            ktmp, table, kern_size = _state_file(temps, st, runs, loading)
            disks = copies.finish()

            written: dict[str, Any] = {}

            def make_meta(files: SnapshotFiles) -> bytes:
                meta = build_meta(vm, files, kind, st, table, kern_size, mem_stats,
                                  layer.record(base) if layer else None, disks)
                written.update(meta)
                return json.dumps(meta, indent=1).encode() + b"\n"

            files, removed = commit(base, tmp, ktmp, make_meta, copies.temporaries())
            done = True
            if layer is not None:
                layer.committed(base, written)
    except OSError as e:
        raise SnapshotError(f"cannot save snapshot to {base}: {e.strerror or e}") from None
    finally:
        if layer is not None and not done:
            layer.failed()
        if staging is not None:
            staging.close()
        if held:
            if done and vm.state == "paused":
                vm.pause()  # a suspend stays paused as if the user paused it
            vm.release()
    end = time.perf_counter()
    data_bytes = mem_stats.data_pages * PAGE
    downtime = (resumed_at or end) - t_hold  # the guest's, not the window's or the staging's
    return SaveStats(base, kind, vm.memory.size, data_bytes, mem_stats.zero_pages, end - t0,
                     downtime, files.generation, tuple(removed),
                     layer.parent.base if layer and layer.parent else None,
                     layer.note if layer else "")
