"""`pyhyve clone FILE --count N --name-prefix P`: N guests from one snapshot at once.

Each clone is a detached `pyhyve run P-i -r FILE --clone` process with its own name,
control socket, console (DIR/P-i.console) and log (DIR/P-i.log, the VMM's own lines): one
clone failing or being killed leaves the others alone. Their memory is the snapshot's page
cache, shared copy-on-write; each gets a new generation ID. The command returns when every
clone runs (or has failed), reporting each one's start time, and exits 1 naming any that
failed; those are stopped, never left half-started.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..control import rundir, socket_path
from .common import Parser, UsageError, fail

if TYPE_CHECKING:
    import subprocess

PROG = "pyhyve"
MAX_CLONES = 1000
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    c = sub.add_parser("clone", help="start N guests from one snapshot, sharing its memory")
    c.add_argument("file", help="the snapshot (any of its names)")
    c.add_argument("--count", type=int, required=True, help="how many clones (1 to 1000)")
    c.add_argument("--name-prefix", required=True, metavar="P",
                   help="clones are named P-1 ... P-N (their control sockets too)")
    c.add_argument("--dir", metavar="DIR",
                   help="where P-i.console and P-i.log go (default: the run directory, "
                   "$PYHYVE_RUNDIR or /run/pyhyve)")
    c.add_argument("--console", choices=("file", "unix"), default="file",
                   help="each console as a file DIR/P-i.console (default) or a UNIX socket "
                   "there to connect to")
    c.add_argument("--bind", action="append", metavar="ID=SPEC",
                   help="a device backend, given to every clone (as with run --bind)")
    c.add_argument("--reuse-paths", action="store_true",
                   help="reopen the disk images the snapshot recorded (each clone writes its "
                   "own copy-on-write view, never the image)")
    c.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="a clone not running by then has failed (default %(default)g)")


@dataclass
class _Clone:
    name: str
    proc: subprocess.Popen[bytes] | None
    log: str
    t0: float
    started: float | None = None
    error: str = ""


def _check(a: argparse.Namespace) -> None:
    if not 1 <= a.count <= MAX_CLONES:
        raise UsageError(f"--count must be 1 to {MAX_CLONES}")
    if not _NAME.match(a.name_prefix):
        raise UsageError(f"bad --name-prefix '{a.name_prefix}': letters, digits, '_', '.', '-'")
    if a.timeout <= 0:
        raise UsageError("--timeout must be positive")
    taken = [f"{a.name_prefix}-{i}" for i in range(1, a.count + 1)
             if _answers(f"{a.name_prefix}-{i}")]
    if taken:
        raise UsageError(f"a VM named {taken[0]} is running; choose another --name-prefix")


def _answers(name: str) -> bool:
    """A live VM owns the name (a socket a dead VMM left behind does not count: `run`
    takes such a name over)."""
    import socket

    path = socket_path(name)
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def cmd_clone(a: argparse.Namespace) -> int:
    from ..snapshot.format import SnapshotError
    from ..snapshot.restore import open_snapshot

    try:
        _check(a)
        snap = open_snapshot(a.file, verify_memory=False)  # each clone verifies it fully
        snap.close()
        if snap.meta.get("parent"):
            raise SnapshotError(f"{snap.base} is an incremental layer: clones share a full "
                                "snapshot's memory (flatten it first: pyhyve snapshot merge)")
        out = os.path.abspath(a.dir or rundir())
        os.makedirs(out, mode=0o700, exist_ok=True)
    except (UsageError, SnapshotError) as e:
        fail(PROG, str(e))
    except OSError as e:
        fail(PROG, f"cannot use {a.dir or rundir()}: {e.strerror or e}")
    clones: list[_Clone] = []
    try:
        for i in range(1, a.count + 1):
            clones.append(_spawn(a, snap.base, out, i))
        _wait(clones, a.timeout)
    except BaseException:  # interrupted, or a bug: never leave clones half-started
        for c in clones:
            if not c.started:
                _stop(c)
        raise
    failed = [c for c in clones if c.error]
    for c in clones:
        if c.error:
            print(f"{c.name}: failed: {c.error} (log {c.log})", file=sys.stderr)
        else:
            assert c.started is not None and c.proc is not None
            print(f"{c.name}: running, pid {c.proc.pid}, started in "
                  f"{(c.started - c.t0) * 1e3:.0f} ms")
    if failed:
        fail(PROG, f"{len(failed)} of {len(clones)} clones failed: "
             f"{', '.join(c.name for c in failed)}")
    print(f"{len(clones)} clones of {snap.base} running")
    return 0


def _create(path: str) -> int:
    """A log or console file of ours: a regular file, never through a symlink someone
    planted in a shared --dir."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)


def _spawn(a: argparse.Namespace, base: str, out: str, i: int) -> _Clone:
    """Start clone i; one that cannot even start is a failed clone, not a crash."""
    import subprocess  # only `pyhyve clone` needs it: not on every VMM's start-up

    name = f"{a.name_prefix}-{i}"
    console = os.path.join(out, f"{name}.console")
    log = os.path.join(out, f"{name}.log")
    t0 = time.monotonic()
    try:
        if a.console == "unix":
            console += ".sock"
        else:
            os.close(_create(console))
        argv = [sys.executable, "-m", "pyhyve.cli.main", "run", name, "-r", base, "--clone",
                "--console", f"{a.console}:{console}"]
        for b in a.bind or []:
            argv += ["--bind", b]
        if a.reuse_paths:
            argv.append("--reuse-paths")
        fd = _create(log)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                    start_new_session=True)
        finally:
            os.close(fd)
    except OSError as e:
        return _Clone(name, None, log, t0, error=f"cannot start: {e.strerror or e} "
                      f"({e.filename or ''})")
    return _Clone(name, proc, log, t0)


def _stop(c: _Clone) -> None:
    """SIGTERM (the VMM removes its socket), then SIGKILL if it does not go."""
    if c.proc is None or c.proc.poll() is not None:
        return
    import subprocess

    c.proc.terminate()
    try:
        c.proc.wait(5)
    except subprocess.TimeoutExpired:
        c.proc.kill()
        c.proc.wait()


def _running(name: str) -> bool:
    from ..control.client import ClientError, ControlClient

    if not os.path.exists(socket_path(name)):
        return False
    try:
        with ControlClient(name, timeout=5.0) as c:
            return c.call("status").get("state") == "running"
    except ClientError:
        return False


def _wait(clones: list[_Clone], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = [c for c in clones if c.proc is not None]
    while pending:
        for c in list(pending):
            assert c.proc is not None
            if c.proc.poll() is not None:
                c.error = f"exited with status {c.proc.returncode}: {_last_line(c.log)}"
            elif _running(c.name):
                c.started = time.monotonic()
            else:
                continue
            pending.remove(c)
        if pending and time.monotonic() > deadline:
            for c in pending:
                _stop(c)
                c.error = f"not running after {timeout:g} s; stopped"
            return
        time.sleep(0.02)


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"
