"""Many consecutive suspend/restore cycles of one guest, checked end to end.

Run: .venv/bin/python bench/cycles.py [--cycles 1000] [--memory 256M]
The hash-chain guest runs, is suspended to a file, restored (lazily, from that file) and
runs again, over and over; at the end its console output must be one unbroken chain.
Reports cycles/s and the median suspend and restore times. (No QEMU column: QEMU has no
in-process equivalent; bench/guestview.py has the side-by-side numbers.) Restore time is
measured to the guest's first new line of output, not to the VMM's start() returning.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from pyhyve import guestkit
from pyhyve.devices.console import MemoryConsole
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save
from pyhyve.vm import VirtualMachine, VmConfig


class Capture(MemoryConsole):
    def wait_lines(self, n: int, timeout: float = 20.0) -> None:
        if not self.wait(lambda buf: buf.count(b"\n") >= n, timeout):
            raise RuntimeError("guest made no progress")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--memory", default="256M")
    args = ap.parse_args()
    from pyhyve.cli.common import parse_size
    kernel = guestkit.build()["hashchain"]
    work = tempfile.mkdtemp()
    con = Capture()
    vm = VirtualMachine.create(VmConfig("cycles", parse_size(args.memory), 1, kernel=kernel,
                                        cmdline="rounds=64"), console=con)
    vm.start()
    con.wait_lines(3)
    text, saves, restores = "", [], []
    t0 = time.perf_counter()
    for i in range(args.cycles):
        base = os.path.join(work, f"c{i % 2}")
        t = time.perf_counter()
        save(vm, base, "suspend")
        saves.append(time.perf_counter() - t)
        vm.stop("suspended")
        text += con.buf.decode()
        vm.close()
        t = time.perf_counter()
        snap = open_snapshot(base)
        con = Capture()
        vm = restore(snap, console=con)
        snap.close()
        vm.start()
        con.wait_lines(1)  # the guest's own progress, not the VMM's "running"
        restores.append(time.perf_counter() - t)
    vm.pause()
    text += con.buf.decode()
    vm.close()
    elapsed = time.perf_counter() - t0
    last = guestkit.check_hashchain(text, rounds=64)[0]
    print(f"{args.cycles} suspend/restore cycles of a {args.memory} hash-chain guest in "
          f"{elapsed:.1f} s ({args.cycles / elapsed:.1f} cycles/s); chain unbroken to step {last}")
    p99 = sorted(restores)[int(len(restores) * 0.99)]
    print(f"suspend median {statistics.median(saves) * 1e3:.1f} ms, restore to the guest's "
          f"first new output line median {statistics.median(restores) * 1e3:.1f} ms "
          f"(p99 {p99 * 1e3:.1f} ms)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
