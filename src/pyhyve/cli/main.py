"""`pyhyve`: run a VM (bhyve-style flags), and inspect snapshots."""

from __future__ import annotations

import signal
import sys

from ..boot.common import BootError
from ..control.server import ControlError
from ..control.session import Session
from ..devices.console import ConsoleError
from ..kvm import KvmError
from ..machine.cpuid import DEFAULT_HIDDEN, CpuidError, parse_feature_list
from ..vm import VirtualMachine, VmConfig, VmError
from .common import Parser, UsageError, fail, parse_size

PROG = "pyhyve"


def _console_spec(args: object) -> str:
    spec = getattr(args, "console", None)
    lpc = getattr(args, "lpc", None)
    if lpc:
        dev, _, backend = lpc.partition(",")
        if dev.lower() != "com1" or not backend:
            raise UsageError(f"bad -l '{lpc}': use com1,stdio | com1,file:PATH | com1,unix:PATH")
        spec = backend
    return spec or "stdio"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="A VMM in Python on KVM, built for save, restore "
               "and migration.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    r = sub.add_parser("run", help="create and run a VM")
    r.add_argument("name", help="VM name (names its control socket)")
    r.add_argument("-m", "--memory", default="512M", help="guest RAM, e.g. 512M or 1G")
    r.add_argument("-c", "--cpus", type=int, default=1, help="number of vCPUs")
    r.add_argument("-k", "--kernel", help="PVH ELF or bzImage to boot")
    r.add_argument("--initrd", help="initial ramdisk")
    r.add_argument("--cmdline", default="", help="kernel command line")
    r.add_argument("--console", help="stdio (default), file:PATH, unix:PATH or null")
    r.add_argument("-l", dest="lpc", metavar="com1,BACKEND", help="bhyve-style console")
    r.add_argument("--cpuid-clear", default=",".join(DEFAULT_HIDDEN),
                   help="CPUID features hidden from the guest (comma list; '' for none)")
    return p


def cmd_run(args: object) -> int:
    a = args
    try:
        config = VmConfig(name=a.name, memory=parse_size(a.memory), cpus=a.cpus,
                          kernel=a.kernel, initrd=a.initrd, cmdline=a.cmdline,
                          console=_console_spec(a),
                          cpuid_hidden=parse_feature_list(a.cpuid_clear))
        if "/" in a.name or not a.name or a.name.startswith("."):
            raise UsageError(f"bad VM name '{a.name}'")
        vm = VirtualMachine.create(config)
    except (UsageError, VmError, CpuidError, ConsoleError, BootError) as e:
        fail(PROG, str(e))
    except KvmError as e:
        fail(PROG, f"KVM refused: {e}")
    return serve(vm)


def serve(vm: VirtualMachine) -> int:
    """Run `vm` under a control socket until it stops; return the exit status."""
    session = Session(vm)
    try:
        session.listen()
    except ControlError as e:
        vm.close()
        fail(PROG, str(e))

    def on_signal(signum: int, _frame: object) -> None:
        vm.stop(f"stopped by signal {signal.Signals(signum).name}", 0)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if vm.state == "created":
            vm.start()
        while not vm.wait(0.5):
            pass
    finally:
        session.close()
        vm.close()
    print(f"{PROG}: {vm.config.name}: {vm.stop_reason}", file=sys.stderr)
    return vm.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
