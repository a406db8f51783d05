"""`pyhyve`: run a VM (bhyve-style flags), and inspect snapshots."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable

from .. import __version__
from ..boot.common import BootError
from ..control import rundir
from ..control.server import ControlError
from ..control.session import Session
from ..description import CONSOLE_ID, DescriptionError, bind, default_description, with_virtio
from ..devices.console import ConsoleError, eol
from ..kvm import KvmError
from ..machine.cpuid import DEFAULT_HIDDEN, CpuidError, parse_feature_list
from ..vm import VirtualMachine, VmConfig, VmError
from .clone import add_parser as add_clone_parser
from .clone import cmd_clone
from .common import Parser, UsageError, fail, guarded, parse_size
from .snapshots import cmd_snapshot

PROG = "pyhyve"
EXIT_HELP = ("exit status: 0 the guest powered off or reset, or was suspended or migrated away; "
             "1 failure; 2 usage; 3 destroyed (pyhyvectl --destroy, Ctrl-A x); 128+N stopped "
             "by signal N (130 SIGINT, 143 SIGTERM)")
DEFAULT_MEMORY = "512M"
GIL_SWITCH_S = 0.0002
SIGNAL_POLL_S = 0.05  # how soon serve() acts on a recorded SIGINT/SIGTERM


def _console_spec(args: argparse.Namespace) -> str:
    spec = getattr(args, "console", None)
    lpc = getattr(args, "lpc", None)
    if lpc:
        dev, _, backend = lpc.partition(",")
        if dev.lower() != "com1" or not backend:
            raise UsageError(f"bad -l '{lpc}': use com1,stdio | com1,file:PATH | com1,unix:PATH")
        spec = backend
    return spec or "stdio"


def _bindings(a: argparse.Namespace) -> dict[str, str]:
    """--bind ID=SPEC, with --console / -l as the shorthand for com1."""
    from ..description import CONSOLE_ID, parse_bindings

    binds = parse_bindings(getattr(a, "bind", None))
    if getattr(a, "console", None) or getattr(a, "lpc", None):
        if CONSOLE_ID in binds:
            raise UsageError(f"--console and --bind {CONSOLE_ID}=... both name the console")
        binds[CONSOLE_ID] = _console_spec(a)
    return binds


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="A VMM in Python on KVM, built for save, restore "
               "and migration.", epilog=EXIT_HELP)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser,
                           metavar="{run,clone,snapshot,migration-certs}")
    r = sub.add_parser("run", help="create and run a VM", epilog=EXIT_HELP)
    r.add_argument("name", help="VM name (names its control socket)")
    r.add_argument("-m", "--memory",  # None: not given (a restore checks a given one)
                   help=f"guest RAM, e.g. 512M or 1G; a bare number is MiB (default {DEFAULT_MEMORY})")
    r.add_argument("-c", "--cpus", type=int, help="number of vCPUs (default 1)")
    r.add_argument("-k", "--kernel", help="PVH ELF or bzImage to boot")
    r.add_argument("--initrd", help="initial ramdisk")
    r.add_argument("--cmdline", default="", help="kernel command line")
    r.add_argument("--console", help="COM1's back end: stdio (default; on a terminal raw, Ctrl-A x "
                   "quits, Ctrl-A Ctrl-A sends Ctrl-A), file:PATH, unix:PATH or null")
    r.add_argument("-l", dest="lpc", metavar="com1,BACKEND",
                   help="bhyve-style console: com1,stdio | com1,file:PATH | com1,unix:PATH | com1,null")
    r.add_argument("--bind", action="append", metavar="ID=SPEC",
                   help="the host backend of device ID (com1=file:PATH, ...); at restore and "
                   "receive every backend comes from here, never from the snapshot or stream")
    r.add_argument("--reuse-paths", action="store_true",
                   help="with --restore/--receive: reopen the backends the saved VM recorded "
                   "for devices not given --bind (shared storage); the console is stdout "
                   "otherwise")
    r.add_argument("--disk", action="append", metavar="PATH[,ro][,serial=ID]",
                   help="a virtio-blk disk on a raw image (disk0, disk1, ... in order)")
    r.add_argument("--rng", action="store_true", help="a virtio-rng device (rng0): host entropy")
    r.add_argument("--net", action="append", metavar="tap:NAME[,mac=MAC]|loop",
                   help="a virtio-net device (net0, ...) on a tap interface, or looped back")
    r.add_argument("--vsock", metavar="cid=N,uds=PATH",
                   help="a virtio-vsock device (vsock0): guest CID N; host programs connect "
                   "through the UNIX socket PATH (CONNECT <port>), the guest reaches PATH_<port>")
    r.add_argument("--vconsole", action="append", metavar="unix:PATH|file:PATH",
                   help="a virtio-console port (vconsole0, ...) to a UNIX socket or a file")
    r.add_argument("-s", dest="slots", action="append", metavar="SLOT,EMULATION[,CONF]",
                   help="bhyve-style PCI device: SLOT,virtio-blk,PATH[,ro][,serial=ID], "
                   "SLOT,virtio-net,TAP[,mac=MAC], SLOT,virtio-console,unix:PATH|file:PATH"
                   " or SLOT,virtio-rnd")
    r.add_argument("--cpuid-clear", default=None,
                   help="CPUID features hidden from the guest (comma list; '' for none); "
                   f"default {','.join(DEFAULT_HIDDEN)}")
    r.add_argument("--hugepages", action="store_true",
                   help="guest RAM in the host's reserved 2 MiB pages (hugetlbfs: "
                   "/proc/sys/vm/nr_hugepages); without enough free ones, ordinary memory "
                   "with transparent huge pages (--status says which). Not with --lazy or "
                   "--clone")
    r.add_argument("-r", "--restore", metavar="FILE",
                   help="continue the guest saved in FILE (+ .kern, .meta)")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--eager", action="store_true",
                     help="with --restore: copy the snapshot's data into memory before the "
                     "guest starts (the default for a snapshot without a loading set: it "
                     "reaches full speed soonest)")
    how.add_argument("--lazy", action="store_true",
                     help="with --restore: map FILE, copy its loading set in, and pull the "
                     "rest in while the guest runs (the default for a snapshot with a "
                     "loading set: full speed as soon, and cold data stays in the file)")
    r.add_argument("--clone", action="store_true",
                   help="with --restore: one of many guests from FILE at once: memory shared "
                   "copy-on-write with every other clone (lazy), a new generation ID")
    r.add_argument("--disk-changed-ok", action="store_true",
                   help="with --restore: accept disks that changed since the save (the guest "
                   "may then see data it does not expect)")
    r.add_argument("--track-dirty", action="store_true",
                   help="track written pages from the start, for incremental snapshots "
                   "(pyhyvectl --checkpoint FILE --incremental); after --restore the first "
                   "layer stacks on FILE. A restored layer tracks without it")
    r.add_argument("-R", "--receive", metavar="[HOST:]PORT",
                   help="wait for an incoming migration (PORT alone: every address; "
                   "HOST,PORT as bhyve and [V6]:PORT work too), then run that guest")
    r.add_argument("--receive-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="with --receive: give up when no migration succeeded by then "
                   "(default %(default)g)")
    r.add_argument("--key-file", help="migration key file (default: $PYHYVE_MIGRATION_KEY)")
    r.add_argument("--tls-dir", help="migrate over mutual TLS with DIR/cert.pem, DIR/key.pem")
    r.add_argument("--insecure", action="store_true",
                   help="with --receive: accept a migration without a key (unauthenticated)")
    add_clone_parser(sub)
    certs = sub.add_parser("migration-certs", help="create a TLS certificate for migrations")
    certs.add_argument("dir", help="directory for cert.pem and key.pem (copy it to each host)")
    snap = sub.add_parser("snapshot", help="inspect snapshots")
    ssub = snap.add_subparsers(dest="snapcmd", parser_class=Parser,
                               metavar="{info,verify,merge}")
    info = ssub.add_parser("info", help="print a snapshot's metadata")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="the metadata as JSON")
    ver = ssub.add_parser("verify", help="check every checksum of a snapshot")
    ver.add_argument("file")
    mrg = ssub.add_parser("merge", help="flatten an incremental snapshot's chain into a full "
                          "snapshot")
    mrg.add_argument("file", help="the newest layer")
    mrg.add_argument("out", help="where the full snapshot goes (not a snapshot of the chain)")
    return p


def cmd_run(args: argparse.Namespace) -> int:
    a = args

    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    # until serve() takes over: a signal during a boot, restore or receive ends it cleanly
    # (the console's terminal restored, one line), never a traceback or a raw terminal
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if a.restore and a.receive:
        fail(PROG, "--restore and --receive cannot be combined")
    if a.clone and not a.restore:
        fail(PROG, "--clone goes with --restore FILE")
    if a.track_dirty and a.receive:
        fail(PROG, "--track-dirty goes with a boot or --restore (a received guest starts "
             "tracking at its first --incremental checkpoint)")
    if a.restore:
        return cmd_restore(a)
    if a.receive:
        return cmd_receive(a)
    try:
        if a.reuse_paths:
            raise UsageError("--reuse-paths goes with --restore or --receive")
        binds = _bindings(a)
        machine = bind(with_virtio(default_description(binds.pop(CONSOLE_ID, "stdio")),
                                   a.disk or [], a.rng, a.slots, a.vconsole, a.net,
                                   [a.vsock] if a.vsock else None), binds, True)
        config = VmConfig(name=a.name, memory=parse_size(a.memory or DEFAULT_MEMORY),
                          cpus=a.cpus if a.cpus is not None else 1,
                          kernel=a.kernel, initrd=a.initrd, cmdline=a.cmdline,
                          console=_console_spec(a), description=machine,
                          hugepages=a.hugepages,
                          cpuid_hidden=parse_feature_list(
                              a.cpuid_clear if a.cpuid_clear is not None else ",".join(DEFAULT_HIDDEN)))
        if "/" in a.name or not a.name or a.name.startswith("."):
            raise UsageError(f"bad VM name '{a.name}'")
        vm = VirtualMachine.create(config)
        if a.track_dirty:
            from ..snapshot.incremental import track

            track(vm, None)
    except (UsageError, VmError, CpuidError, ConsoleError, BootError, DescriptionError) as e:
        fail(PROG, str(e))
    except KvmError as e:
        fail(PROG, f"KVM refused: {e}")
    return serve(vm)


def _no_config_flags(a: argparse.Namespace, mode: str, why: str, sizes: bool = False) -> None:
    """Guest configuration comes from the snapshot or the source, never the command line
    (a restore may repeat --memory/--cpus, and is refused if they disagree)."""
    flags = [("--kernel", a.kernel), ("--initrd", a.initrd), ("--cmdline", a.cmdline),
             ("--cpuid-clear", a.cpuid_clear), ("--disk", a.disk), ("--rng", a.rng or None),
             ("-s", a.slots), ("--vconsole", a.vconsole), ("--net", a.net),
             ("--vsock", a.vsock)]
    if sizes:
        flags += [("--memory", a.memory), ("--cpus", a.cpus)]
    given = [flag for flag, v in flags if v is not None and v != ""]
    if given:
        fail(PROG, f"{', '.join(given)} cannot be combined with {mode}: {why}")


def cmd_restore(a: argparse.Namespace) -> int:
    """pyhyve run NAME -r FILE: the guest's config comes from the snapshot; host
    resources (the console) come only from the command line, never from the file."""
    from ..cli.progress import bar
    from ..snapshot.format import SnapshotError
    from ..snapshot.restore import open_snapshot, restore

    _no_config_flags(a, "--restore", "the snapshot carries the VM's configuration")
    if a.clone and a.eager:
        fail(PROG, "--clone shares the snapshot's memory: it cannot be combined with --eager")
    if a.hugepages and (a.lazy or a.clone):
        fail(PROG, f"--hugepages cannot be combined with {'--lazy' if a.lazy else '--clone'}: "
             "that restore maps the snapshot's file", code=2)
    t0 = time.perf_counter()
    try:
        binds = _bindings(a)  # never the snapshot's: a file must not choose host paths
        with bar(f"restore {a.name}") as progress:
            snap = open_snapshot(a.restore, verify_memory=False)  # restore() verifies it
            # neither asked for: whichever reaches full speed first (docs/benchmarks.md)
            lazy = a.lazy or (not a.eager and not a.hugepages and bool(snap.loading))
            try:
                vm = restore(snap, name=a.name, lazy=lazy, progress=progress,
                             bindings=binds, reuse_paths=a.reuse_paths, clone=a.clone,
                             track_dirty=a.track_dirty, clone_dir=rundir(),
                             disk_changed_ok=a.disk_changed_ok, hugepages=a.hugepages)
            finally:
                snap.close()
        if a.memory is not None and parse_size(a.memory) != vm.config.memory:
            vm.close()
            fail(PROG, f"--memory {a.memory} disagrees with the snapshot's "
                 f"{vm.config.memory >> 20}M")
        if a.cpus is not None and a.cpus != vm.config.cpus:
            vm.close()
            fail(PROG, f"--cpus {a.cpus} disagrees with the snapshot's {vm.config.cpus}")
    except (SnapshotError, UsageError, VmError, ConsoleError) as e:
        fail(PROG, str(e))
    except KvmError as e:
        fail(PROG, f"KVM refused: {e}")
    data = snap.meta["memory"]["data_pages"] * 4096
    mode = "clone" if a.clone else "lazy" if lazy else "eager"
    return serve(vm, lambda: note(
        f"{PROG}: restored {a.name} from {snap.base} ({mode}): {vm.config.memory >> 20} MiB RAM, "
        f"{data / (1 << 20):.1f} MiB of data read, {snap.meta['memory']['zero_pages']} zero "
        f"pages never read, verify {snap.verify_seconds * 1e3:.1f} ms, "
        f"to running {(time.perf_counter() - t0) * 1e3:.1f} ms"))


def cmd_receive(a: argparse.Namespace) -> int:
    """pyhyve run NAME -R HOST,PORT: the destination of a migration (bhyve's -R)."""
    from ..migration import DEFAULT_PORT
    from ..migration.dest import ReceiveError, ReceiveOptions, Receiver
    from ..migration.protocol import PeerError, ProtocolError
    from ..migration.security import SecurityError, load_key
    from ..migration.source import MigrationError, parse_listen
    from ..snapshot.format import SnapshotError

    _no_config_flags(a, "--receive", "the source sends the VM's configuration",
                     sizes=True)
    try:
        host, port = parse_listen(a.receive, DEFAULT_PORT)
        if a.receive_timeout <= 0:
            raise UsageError("--receive-timeout must be positive")
        key = load_key(a.key_file)
        if key is None and not a.insecure:
            raise SecurityError("refusing to listen without a migration key: set "
                                "PYHYVE_MIGRATION_KEY or --key-file (or pass --insecure)")
        receiver = Receiver(a.name, host, port, key,
                            ReceiveOptions(console=None, bindings=_bindings(a),
                                           reuse_paths=a.reuse_paths, tls_dir=a.tls_dir,
                                           receive_timeout=a.receive_timeout,
                                           hugepages=a.hugepages))
    except (MigrationError, SecurityError, UsageError, VmError) as e:
        fail(PROG, str(e))
    except OSError as e:
        fail(PROG, f"cannot listen on {a.receive}: {e.strerror or e}")
    where = f"[{host}]" if ":" in host else host
    where = f"{where}:{receiver.port}" if host else f"every address, port {receiver.port}"
    if ":" not in a.receive and "," not in a.receive and not a.receive.strip().isdigit():
        where += " (the default port)"
    t0 = time.perf_counter()
    try:
        print(f"{PROG}: {a.name}: waiting for a migration on {where}, for up to "
              f"{a.receive_timeout:g} s", file=sys.stderr, flush=True)
        vm = receiver.receive()
    except Interrupted as e:
        fail(PROG, f"{a.name}: stopped by signal {signal.Signals(e.signum).name} while waiting "
             "for a migration", 128 + e.signum)
    except ReceiveError as e:
        n = len(receiver.failures)
        fail(PROG, f"{a.name}: {e}" + (f" ({n} failed attempt(s); last: {receiver.failures[-1]})"
                                       if n else ""))
    except (SecurityError, ProtocolError, PeerError, SnapshotError, VmError,
            KvmError, OSError, ValueError) as e:
        fail(PROG, f"{a.name}: migration failed: {e}")
    return serve(vm, lambda: note(
        f"{PROG}: {a.name}: migration received: {receiver.pages} pages in {receiver.rounds} "
        f"rounds, {receiver.bytes_received / (1 << 20):.1f} MiB, "
        f"{(time.perf_counter() - receiver.t_first) * 1e3:.1f} ms from accept to running "
        f"({(time.perf_counter() - t0):.1f} s waited in all)"
        + ("; post-copy: the rest of its memory follows" if receiver.postcopy else "")))


def cmd_certs(a: argparse.Namespace) -> int:
    from ..migration.security import SecurityError, make_certs

    try:
        cert, key = make_certs(a.dir)
    except SecurityError as e:
        fail(PROG, str(e))
    print(f"created {cert} and {key}; copy the directory to every host that migrates")
    return 0


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def note(msg: str) -> None:
    """A line of ours on stderr, right also while the console holds the terminal raw."""
    print(msg, end=eol(), file=sys.stderr, flush=True)


class SignalLatch:
    """SIGINT/SIGTERM for serve(): the handler only records the signal, serve's loop acts.

    A Python handler runs between two bytecodes of the main thread, which may be inside
    a lock the stop path takes (the VM's state lock while start() sets "running"):
    stopping the VM from the handler itself deadlocked the process."""

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum: int, _frame: object) -> None:
        if not self.signum:
            self.signum = signum


def serve(vm: VirtualMachine, on_running: Callable[[], None] | None = None) -> int:
    """Run `vm` under a control socket until it stops; return the exit status."""
    # A vCPU thread needs the GIL to handle each exit; while another thread runs Python
    # (an import, a migration) it would wait up to the 5 ms default switch interval.
    sys.setswitchinterval(GIL_SWITCH_S)
    latch = SignalLatch()
    signal.signal(signal.SIGINT, latch)  # before the socket appears: a client that
    signal.signal(signal.SIGTERM, latch)  # sees it may signal us at once
    session = Session(vm)
    try:
        session.listen()
    except ControlError as e:
        vm.close()
        fail(PROG, str(e))

    try:
        if vm.state == "created":
            vm.start()
        if on_running:
            on_running()
        while not vm.wait(SIGNAL_POLL_S):
            if latch.signum:
                vm.stop(f"stopped by signal {signal.Signals(latch.signum).name}",
                        128 + latch.signum)
    finally:
        session.close()
        vm.close()
    print(f"{PROG}: {vm.config.name}: {vm.stop_reason}", file=sys.stderr)
    return vm.exit_code


def main(argv: list[str] | None = None) -> int:
    return guarded(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: run, clone, snapshot or migration-certs")
    if args.command == "snapshot" and args.snapcmd is None:
        parser.error("choose a snapshot command: info FILE, verify FILE or merge FILE OUT")
    if args.command == "run":
        try:
            return cmd_run(args)
        except Interrupted as e:
            fail(PROG, f"stopped by signal {signal.Signals(e.signum).name}", 128 + e.signum)
    if args.command == "snapshot":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `snapshot info | head` ends quietly
        return cmd_snapshot(args)
    if args.command == "migration-certs":
        return cmd_certs(args)
    if args.command == "clone":
        return cmd_clone(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
