"""`pyhyvectl`: talk to a running VM through its control socket."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from .. import __version__
from ..control.client import ClientError, ControlClient
from .common import Parser, UsageError, fail, guarded, parse_size

PROG = "pyhyvectl"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Control a running pyhyve VM.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--vm", required=True, help="VM name")
    acts = p.add_mutually_exclusive_group(required=True)
    acts.add_argument("--status", action="store_true", help="show the VM's state")
    acts.add_argument("--pause", action="store_true", help="pause every vCPU")
    acts.add_argument("--resume", action="store_true", help="resume a paused VM")
    acts.add_argument("--powerdown", action="store_true",
                      help="press the ACPI power button: the guest shuts down cleanly (waits "
                      "up to --timeout seconds for the VM to end)")
    acts.add_argument("--nmi", action="store_true",
                      help="send an NMI to every vCPU (Linux reports it; with "
                      "kernel.unknown_nmi_panic=1 it panics, and kdumps if set up)")
    acts.add_argument("--destroy", action="store_true",
                      help="stop the VM and its process; returns once the process is gone")
    acts.add_argument("--suspend", metavar="FILE", help="save to FILE (+.kern, .meta); the VM exits")
    acts.add_argument("--checkpoint", metavar="FILE", help="save to FILE; the VM keeps running")
    acts.add_argument("--migrate", metavar="HOST:PORT",
                      help="warm migration: pause, send everything, the guest continues there")
    acts.add_argument("--migrate-live", metavar="HOST:PORT",
                      help="live migration (pre-copy with dirty-page tracking)")
    acts.add_argument("--migrate-status", action="store_true", help="progress of a migration")
    acts.add_argument("--migrate-cancel", action="store_true",
                      help="cancel a migration; the guest keeps running here")
    acts.add_argument("--migrate-recover", action="store_true",
                      help="a post-copy that gave up after its switch (its --recover-timeout "
                      "passed): reconnect to the same destination and finish sending")
    p.add_argument("--incremental", action="store_true",
                   help="with --checkpoint/--suspend: write only the pages written since the "
                   "VM's previous incremental snapshot, as a layer over it (the first one is "
                   "full and starts the tracking)")
    p.add_argument("--loading-set", type=float, metavar="MS", nargs="?", const=100.0,
                   help="with --checkpoint/--suspend: first watch for MS ms (default 100) "
                   "which 2 MiB blocks the guest writes, so a --lazy restore copies in only "
                   "those; the guest re-faults its memory once (docs/snapshot-format.md)")
    p.add_argument("--no-disk-copy", action="store_true",
                   help="with --checkpoint: do not keep the VM's writable disks as they are "
                   "at the pause beside the snapshot (FILE.gN.diskK); its restore then needs "
                   "--disk-changed-ok once the guest has written on")
    m = p.add_argument_group("migration options")
    m.add_argument("--downtime-ms", type=float, help="downtime target (default 5)")
    m.add_argument("--bandwidth", metavar="SIZE", help="cap per second, e.g. 100M (default: none)")
    m.add_argument("--compress", choices=("auto", "none", "zstd", "lz4"),
                   help="page compression (default auto: zstd where a sample compresses 2:1)")
    m.add_argument("--no-auto-converge", action="store_true",
                   help="never slow the guest down to converge")
    m.add_argument("--postcopy", action="store_true",
                   help="with --migrate-live: run the guest on the destination at once and "
                   "send its memory after (pages it waits on first); a cut connection is "
                   "retried, see --recover-timeout")
    m.add_argument("--postcopy-after", type=int, metavar="N",
                   help="post-copy after N pre-copy rounds (implies --postcopy)")
    m.add_argument("--recover-timeout", type=float, metavar="S",
                   help="post-copy: keep reconnecting after a cut for S seconds (default "
                   "600); the VM here stays paused and keeps every page until then")
    m.add_argument("--key-file", help="migration key file (default: $PYHYVE_MIGRATION_KEY)")
    m.add_argument("--tls-dir", help="use mutual TLS with DIR/cert.pem and DIR/key.pem")
    m.add_argument("--insecure", action="store_true",
                   help="allow a destination that does not authenticate")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="with --powerdown: seconds to wait for the guest to power off "
                   "(default 60; 0 returns at once)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    return p


def migrate_args(args: argparse.Namespace, cmd: str) -> dict[str, Any]:
    from ..migration.security import SecurityError, load_key

    try:
        key = load_key(args.key_file)
    except SecurityError as e:
        fail(PROG, str(e))
    out: dict[str, Any] = {"target": getattr(args, cmd), "live": cmd == "migrate_live",
                 "key": key.hex() if key else None, "downtime_ms": args.downtime_ms,
                 "compress": args.compress, "auto_converge": not args.no_auto_converge,
                 "tls_dir": os.path.abspath(args.tls_dir) if args.tls_dir else None,
                 "insecure": args.insecure,
                 "postcopy": bool(args.postcopy or args.postcopy_after is not None),
                 "postcopy_after": args.postcopy_after or 0,
                 "recover_timeout": args.recover_timeout}
    if args.bandwidth:
        try:
            out["bandwidth"] = parse_size(args.bandwidth.removesuffix("/s"))
        except UsageError as e:
            fail(PROG, str(e))
    return out


def main(argv: list[str] | None = None) -> int:
    return guarded(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `pyhyvectl --status | head` ends quietly
    args = build_parser().parse_args(argv)
    cmd = next(c for c in ("status", "pause", "resume", "powerdown", "nmi", "destroy", "suspend",
                           "checkpoint",
                           "migrate", "migrate_live", "migrate_status", "migrate_cancel",
                           "migrate_recover")
               if getattr(args, c))
    extra: dict[str, Any] = {}
    if args.incremental and cmd not in ("suspend", "checkpoint"):
        fail(PROG, "--incremental goes with --checkpoint or --suspend", 2)
    if args.loading_set is not None and cmd not in ("suspend", "checkpoint"):
        fail(PROG, "--loading-set goes with --checkpoint or --suspend", 2)
    if args.no_disk_copy and cmd != "checkpoint":
        fail(PROG, "--no-disk-copy goes with --checkpoint", 2)
    if cmd in ("suspend", "checkpoint"):
        extra["path"] = os.path.abspath(getattr(args, cmd))  # the VMM has its own cwd
        extra["incremental"] = args.incremental
        if args.no_disk_copy:
            extra["disk_copy"] = False
        if args.loading_set is not None:
            if not 0 < args.loading_set <= 10000:
                fail(PROG, "--loading-set takes 1 to 10000 ms", 2)
            extra["loading_window"] = args.loading_set / 1000
    if cmd in ("migrate", "migrate_live"):
        extra = migrate_args(args, cmd)
        cmd = "migrate"
    if cmd == "migrate_recover":
        extra = {"recover_timeout": args.recover_timeout}
    cmd = cmd.replace("_", "-")
    progress = Progress(args.vm) if cmd == "migrate" and sys.stderr.isatty() else None
    try:
        with ControlClient(args.vm, timeout=None if extra else 30.0) as c:
            reply = c.call(cmd, **extra)
    except ClientError as e:
        fail(PROG, str(e))
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        fail(PROG, interrupted(args.vm, cmd), 130)
    finally:
        if progress:
            progress.stop()
    reply.pop("ok", None)
    if cmd in ("migrate", "migrate-recover") and reply.get("state") != "completed":
        state, error = reply.get("state"), str(reply.get("error"))
        why = error if error.startswith("migration") else f"migration {state}: {error}"
        paused = "stays paused" in why or "kept paused" in why
        fail(PROG, why if paused else f"{why} (the guest keeps running here)")
    if args.json:
        print(json.dumps(reply, indent=2))
    elif "line" in reply:
        print(f"{args.vm}: {reply['line']}")
    elif cmd == "status":
        print(format_status(reply))
    else:
        print(f"{args.vm}: {reply.get('state', 'done')}")
    if cmd == "destroy" and isinstance(reply.get("pid"), int) and not wait_gone(reply["pid"]):
        fail(PROG, f"{args.vm}: the VMM process {reply['pid']} did not exit within 30 s")
    if cmd == "powerdown" and args.timeout > 0 and isinstance(reply.get("pid"), int):
        if not wait_gone(reply["pid"], args.timeout):
            fail(PROG, f"{args.vm}: the guest did not power off within {args.timeout:g} s "
                 "(it is still running; --destroy ends it)")
        print(f"{args.vm}: the VM has exited")
    return 0


class Progress:
    """On a terminal, a live line of a running migration (from --migrate-status, asked
    over a second control connection twice a second)."""

    def __init__(self, vm: str) -> None:
        import threading

        self.vm, self.done = vm, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        width = 0
        while not self.done.wait(0.5):
            try:
                with ControlClient(self.vm, timeout=5.0) as c:
                    st = c.call("migrate-status")
            except ClientError:
                continue
            if st.get("state") not in ("setup", "active"):
                continue
            line = (f"{self.vm}: migrating: {st.get('pages_sent', 0)} pages, "
                    f"{st.get('bytes_sent', 0) / (1 << 20):.1f} MiB sent, round "
                    f"{st.get('rounds', 0)}, throttle {st.get('throttle', 0):.0%}")
            width = max(width, len(line))
            sys.stderr.write("\r" + line.ljust(width))
            sys.stderr.flush()
        if width:
            sys.stderr.write("\r" + " " * width + "\r")
            sys.stderr.flush()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(2)


def interrupted(vm: str, cmd: str) -> str:
    """Ctrl-C while waiting for the VMM. A migration is cancelled (the guest keeps running
    here); anything else the VMM may still finish."""
    if cmd != "migrate":
        return f"interrupted; the VM may still complete '{cmd}'"
    try:
        with ControlClient(vm, timeout=10.0) as c:
            c.call("migrate-cancel")
    except (ClientError, KeyboardInterrupt):
        return "interrupted; cancelling the migration failed: try --migrate-cancel"
    return "interrupted: migration cancelled (the guest keeps running here)"


def human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def format_status(reply: dict[str, Any]) -> str:
    """One `key: value` line per field that has a value; sizes in human units."""
    lines = []
    for k, v in reply.items():
        if v in ("", None):
            continue
        if k in ("memory", "huge_pages") and isinstance(v, int):
            v = human(v)
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    """Until process `pid` has exited (a zombie waiting for its parent counts as gone)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


if __name__ == "__main__":
    sys.exit(main())
