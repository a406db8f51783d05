"""Process start to first guest output: pyhyve vs QEMU 7.2 on the same PVH guest.

Run: .venv/bin/python bench/boot.py [--runs N]
The guest is the kit's A-B guest (1 GiB, ws=0); the clock runs from spawning the process
to the first byte the guest writes to COM1, read from the process's stdout.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import tempfile
import time

from pyhyve import guestkit

from common import PYHYVE, ensure_qemu, median, qemu_args, qemu_version, table


def first_output(argv: list[str], env: dict[str, str], timeout: float = 30.0) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env)
    try:
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        if not ready or not os.read(p.stdout.fileno(), 1):
            raise RuntimeError(f"no guest output from {argv[0]}")
        return time.perf_counter() - t0
    finally:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    kernel = guestkit.build()["ab"]
    qemu = ensure_qemu()
    rundir = tempfile.mkdtemp()
    env = {**os.environ, "PYHYVE_RUNDIR": rundir}
    cmd_py = [PYHYVE, "run", "bench", "-m", "1G", "-k", kernel, "--cmdline", "ws=0"]
    cmd_q = qemu_args(qemu, kernel, "ws=0")
    py, q = [], []
    first_output(cmd_py, env)  # warm the page cache for both
    first_output(cmd_q, env)
    for _ in range(args.runs):  # interleaved, so drift on a noisy machine hits both alike
        py.append(first_output(cmd_py, env))
        q.append(first_output(cmd_q, env))
    mp, mq = median(py), median(q)
    print(table(f"process start -> first guest output, median of {args.runs} "
                f"({qemu_version(qemu)})", ["", "pyhyve", "QEMU", "pyhyve/QEMU"],
                [["ms", f"{mp * 1e3:.1f}", f"{mq * 1e3:.1f}", f"{mp / mq:.2f}x"]]))
    print(f"all pyhyve runs (ms): {', '.join(f'{x * 1e3:.1f}' for x in py)}")
    print(f"all QEMU runs (ms):   {', '.join(f'{x * 1e3:.1f}' for x in q)}")


if __name__ == "__main__":
    main()
