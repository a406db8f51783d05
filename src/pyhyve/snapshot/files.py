"""Where a snapshot's files live, and how a save replaces them without ever breaking the
last good snapshot.

    FILE.meta         the commit record: names the generation N that is current
    FILE.gN           guest RAM of generation N
    FILE.gN.kern      vCPU, VM and device state of generation N
    FILE.gN.diskK     a checkpoint's copy of disk K as it was at the pause (save.py)
    (format 1, read only: FILE and FILE.kern)

A save writes its data into temporaries created exclusively (O_EXCL|O_NOFOLLOW, mode
0600, unpredictable names) in the target directory, renames them to a generation no file
uses yet, and then renames the new FILE.meta into place: that one rename is the commit.
Until it, the old snapshot is untouched and whole; after it, the old generation's files
are removed. Commits to one directory are serialised by an flock on the directory, so two
saves to the same path never mix their files. Leftovers of interrupted saves (temporaries
of dead processes, generations no metadata names) are removed by the next save to the
same path and by `snapshot verify`, and reported.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass

from ..devices.virtio.diskcopy import KEPT_NAME
from .errors import SnapshotError

MAX_GENERATION = 999_999_999
_TMP = re.compile(r"\.tmp-([0-9]+)-[A-Za-z0-9_]+\.(mem|kern|meta|disk[0-9]{1,3})$")
_GEN = re.compile(r"\.g([0-9]{1,9})(\.kern|\.disk[0-9]{1,3})?$")
DISK_COPY = re.compile(r"disk[0-9]{1,3}")  # the device ids whose copies a snapshot keeps


@dataclass(frozen=True)
class SnapshotFiles:
    memory: str
    state: str
    meta: str
    generation: int  # 0: format 1 (FILE, FILE.kern)


def meta_path(base: str) -> str:
    return base + ".meta"


def generation_files(base: str, generation: int) -> SnapshotFiles:
    if generation == 0:
        return SnapshotFiles(base, base + ".kern", meta_path(base), 0)
    g = f"{base}.g{generation}"
    return SnapshotFiles(g, g + ".kern", meta_path(base), generation)


def disk_copy_path(files: SnapshotFiles, dev_id: str) -> str:
    """Where a checkpoint keeps disk `dev_id` (FILE.gN.diskK): named by the command line's
    FILE and the device's id, never by the snapshot's content."""
    assert DISK_COPY.fullmatch(dev_id) and files.generation
    return f"{files.memory}.{dev_id}"


def resolve_base(path: str) -> str:
    """FILE from any of its names: FILE, FILE.meta, FILE.kern, FILE.gN, FILE.gN.kern. A
    snapshot whose own name ends like that (FILE.g1 with its FILE.g1.meta) is itself."""
    path = os.path.abspath(path)
    if os.path.exists(meta_path(path)):
        return path
    if path.endswith(".meta"):
        return path[:-5]
    m = _GEN.search(path)
    if m and os.path.exists(meta_path(path[:m.start()])):
        return path[:m.start()]
    if path.endswith(".kern") and os.path.exists(meta_path(path[:-5])):
        return path[:-5]
    return path


LOCK_TIMEOUT = 10.0


@contextlib.contextmanager
def dir_lock(base: str, exclusive: bool, timeout: float | None = None) -> Iterator[None]:
    """flock on the snapshot's directory: commits exclusive, readers shared. Waits at most
    `timeout` (another user of a shared directory could hold it forever), then fails with
    one line. A file system without flock still works, unserialised."""
    try:
        fd = os.open(os.path.dirname(base) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SnapshotError(f"cannot lock {os.path.dirname(base)}: another process "
                                        f"has held it for {timeout:.0f} s") from None
                time.sleep(0.01)
            except OSError:
                break  # no flock here
        yield
    finally:
        os.close(fd)


def create_temp(base: str, suffix: str) -> tuple[int, str]:
    """An exclusively created 0600 temporary beside `base` (mkstemp: O_EXCL|O_NOFOLLOW,
    a random name): nobody can pre-create it, link it elsewhere, or read it."""
    d, name = os.path.split(base)
    import tempfile  # not at import: a VMM's start-up pays for every module

    fd, path = tempfile.mkstemp(prefix=f"{name}.tmp-{os.getpid()}-", suffix=suffix, dir=d)
    os.set_inheritable(fd, False)
    return fd, path


def fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(path: str) -> bool:
    """A regular file (not a link) owned by us: the only kind of leftover we delete."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def current_generation(base: str) -> tuple[int, int] | None:
    """(format version, generation) named by FILE.meta, read leniently (the commit step
    needs only these two numbers; trust is checked by readers). None: no usable meta."""
    try:
        with open(meta_path(base), "rb") as f:
            meta = json.loads(f.read(4 << 20))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return None
    version, gen = meta.get("format_version"), meta.get("generation", 0)
    if version == 1:
        return 1, 0
    if isinstance(gen, int) and not isinstance(gen, bool) and 0 < gen <= MAX_GENERATION:
        return version if isinstance(version, int) else 0, gen
    return None


def current_files(base: str) -> SnapshotFiles:
    """The files FILE.meta names now (leniently read: for tools and tests, not trust)."""
    base = resolve_base(base)
    cur = current_generation(base)
    return generation_files(base, cur[1] if cur else 0)


def leftovers(base: str, keep: int | None) -> list[str]:
    """Files of this snapshot that nothing uses: temporaries of dead processes, and (when
    `keep` is known) generations other than `keep`. Call with the directory locked."""
    d, name = os.path.split(base)
    out = []
    try:
        entries = os.listdir(d or ".")
    except OSError:
        return []
    for entry in entries:
        if not entry.startswith(name + "."):
            continue
        rest = entry[len(name):]
        path = os.path.join(d, entry)
        m = _TMP.fullmatch(rest)
        if m and not _alive(int(m.group(1))) and _ours(path):
            out.append(path)
            continue
        g = _GEN.fullmatch(rest)
        if keep is not None and g and int(g.group(1)) != keep and _ours(path) \
                and not os.path.exists(meta_path(os.path.join(d, name + f".g{g.group(1)}"))):
            out.append(path)  # (FILE.gN with a FILE.gN.meta is another snapshot's)
    return sorted(out)


def clean(base: str) -> list[str]:
    """Remove this snapshot's leftovers under the directory lock: what FILE.meta names at
    that moment is kept (a save may have committed a newer generation meanwhile), and
    with no readable FILE.meta only dead saves' temporaries go."""
    with dir_lock(base, exclusive=True):
        cur = current_generation(base)
        return remove(leftovers(base, cur[1] if cur else None))


def remove(paths: list[str]) -> list[str]:
    removed = []
    for p in paths:
        with contextlib.suppress(OSError):
            _unlink(p)
            removed.append(p)
    return removed


TRUNCATE_STEP = 32 << 20
F_SETSIG = 10  # fcntl: the signal a lease break comes as (lease.py too)


def _unlink(path: str) -> None:
    """Unlink; a big file nobody else has open is emptied a step at a time first. Freeing
    a GiB of extents in one go (an old generation's disk copy, its memory) is one long
    journal commit on ext4, and a running guest's disk writes wait behind it (hundreds of
    ms, measured: docs/snapshot-format.md). A write lease tells whether anybody else has
    it open: a lazy restore mapping a memory file (it holds a read lease, which the
    read-only open and the lease leave alone) keeps its inode, unlinked; a disk copy that
    some VM has open as its disk is not removed at all (unlinked, the VM's writes after
    it would be lost when it exits)."""
    fd = _alone(path, os.O_RDONLY)
    if fd is not None:  # nobody else: now a writable fd, still alone (no restore opens it
        os.close(fd)  # meanwhile: the commit holds the directory's lock)
        fd = _alone(path, os.O_RDWR)
    if fd is None:
        if KEPT_NAME.search(path) and _in_use(path):
            raise OSError(16, "in use")  # (remove() leaves it, for a later save)
        os.unlink(path)
        return
    try:
        os.unlink(path)  # nobody opens it by its name after this
        st = os.fstat(fd)
        size = st.st_size if st.st_nlink == 0 else 0  # (another name keeps it whole)
        while size > TRUNCATE_STEP:
            size -= TRUNCATE_STEP
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _lease(fd: int) -> bool:
    """Whether a write lease can be had on `fd` (then nobody else has the file open); a
    break of it would come as SIGURG, ignored, never as the default SIGIO."""
    try:
        fcntl.fcntl(fd, F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        return False
    return True


def _in_use(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return not _lease(fd)
    finally:
        os.close(fd)


def _alone(path: str, mode: int) -> int | None:
    """`path` opened with a write lease (so nobody else has it open), if it is big enough
    to matter and that can be had; else None."""
    try:
        fd = os.open(path, mode | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if os.fstat(fd).st_size > TRUNCATE_STEP and _lease(fd):
        return fd
    os.close(fd)
    return None


def _highest_generation(base: str) -> int:
    """The highest generation among our own files (foreign ones cannot steer numbering)."""
    d, name = os.path.split(base)
    best = 0
    with contextlib.suppress(OSError):
        for entry in os.listdir(d or "."):
            if entry.startswith(name + "."):
                g = _GEN.fullmatch(entry[len(name):])
                if g and _ours(os.path.join(d, entry)):
                    best = max(best, int(g.group(1)))
    return best


def write_all(fd: int, data: bytes | memoryview, offset: int = 0) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def commit(base: str, tmp_memory: str, tmp_state: str,
           make_meta: Callable[[SnapshotFiles], bytes],
           disks: dict[str, str] | None = None) -> tuple[SnapshotFiles, list[str]]:
    """Make the written temporaries the current snapshot at `base`: rename them (and the
    disk copies, device id -> temporary) to a new generation, write and rename FILE.meta
    (the commit), then remove what the old snapshot and interrupted saves left. Returns
    the new files and what was removed."""
    with dir_lock(base, exclusive=True):
        old = current_generation(base)
        gen = max(old[1] if old else 0, _highest_generation(base)) + 1
        while any(os.path.lexists(p) for p in (*astuple(generation_files(base, gen))[:2], *(
                disk_copy_path(generation_files(base, gen), d) for d in disks or {}))):
            gen += 1  # a name someone else put there: step over it, never write through it
        if gen > MAX_GENERATION:
            raise SnapshotError(f"cannot save snapshot to {base}: generation numbers are "
                                "exhausted (remove the old FILE.gN files)")
        files = generation_files(base, gen)
        renamed: list[str] = []
        mfd, tmp_meta = create_temp(base, ".meta")
        try:
            for a, b in ((tmp_memory, files.memory), (tmp_state, files.state),
                         *((t, disk_copy_path(files, d)) for d, t in (disks or {}).items())):
                os.rename(a, b)
                renamed.append(b)
            write_all(mfd, make_meta(files))
            os.fsync(mfd)
            os.rename(tmp_meta, files.meta)  # the commit
        except BaseException:
            remove([*renamed, tmp_meta])
            raise
        finally:
            os.close(mfd)
        fsync_dir(base)
        stale = leftovers(base, keep=gen)
        if old and old[0] == 1:  # the format-1 files this commit replaced
            stale += [p for p in (base, base + ".kern") if _ours(p)]
        return files, remove(stale)
