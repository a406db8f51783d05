#!/usr/bin/env python3
"""Make the booted snapshot: the Linux lane's guest suspended at its ready marker, so a
restore gives a working shell instead of a cold boot (docs/linux.md).

    .venv/bin/python guests/linux/booted.py OUT [--cpus N] [--memory MIB] [--no-acpi]
    pyhyve run lx -r OUT            # a shell at once: type a command

Builds the kernel and initramfs first if the cache has none (guests/linux/build.py).
"""

from __future__ import annotations

import argparse
import sys

from pyhyve import linuxguest
from pyhyve.devices.console import MemoryConsole
from pyhyve.snapshot.save import save
from pyhyve.vm import VirtualMachine, VmConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="snapshot base path (OUT.meta, OUT.gN, OUT.gN.kern)")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", type=int, default=128, help="MiB (default 128)")
    ap.add_argument("--no-acpi", action="store_true", help="the MP-table machine")
    a = ap.parse_args()
    try:
        lane = linuxguest.build()
    except linuxguest.LaneError as e:
        print(f"booted: {e}", file=sys.stderr)
        return 1
    con = MemoryConsole()
    vm = VirtualMachine.create(VmConfig("booted", a.memory << 20, a.cpus,
                                        kernel=lane["vmlinux"], initrd=lane["initramfs"],
                                        cmdline=linuxguest.cmdline(not a.no_acpi)),
                               console=con)
    try:
        vm.start()
        if not con.wait(lambda b: b"tick 1 " in b, 600):
            print(f"booted: no ready marker in 600 s: {con.text[-300:]!r}", file=sys.stderr)
            return 1
        stats = save(vm, a.out, "suspend")
    finally:
        vm.close()
    print(f"booted: {stats.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
