"""Save a VM to BASE and die with exit status 9 (no cleanup, as kill -9 would) right
after the STEP-th rename or fsync the save makes: `crash_save.py KERNEL BASE rename|fsync N`."""

from __future__ import annotations

import os
import sys

from pyhyve.devices.console import Console
from pyhyve.snapshot.save import save
from pyhyve.vm import VirtualMachine, VmConfig


def main() -> None:
    kernel, base, call, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    vm = VirtualMachine.create(VmConfig("crash", 16 << 20, kernel=kernel, cmdline="ws=1M"),
                               console=Console())
    real = getattr(os, call)
    count = [0]

    def crashing(*args: object) -> None:
        real(*args)
        count[0] += 1
        if count[0] == step:
            os._exit(9)

    setattr(os, call, crashing)
    save(vm, base, "suspend")
    os._exit(0)


if __name__ == "__main__":
    main()
