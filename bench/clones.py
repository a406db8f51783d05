"""Clones and incremental snapshots, as the guest sees them.

Run: .venv/bin/python bench/clones.py [--runs 3] [--counts 1,10,50] [--only clones,incremental]

clones: one A-B guest (1 GiB RAM) that writes 8 MiB and reads 120 MiB it filled once (a
  runtime's code and data, say) every pass, checkpointed once, then N guests started
  from it at the same moment: pyhyve `run -r FILE --clone` (shared memory), QEMU 7.2 N
  separate `-incoming "exec:cat FILE"` restores (QEMU has no clones). Per guest: process
  start to its first console output and to its first full pass (the second `B` after the
  restore); reported as the median guest and the last one, with the host memory per guest
  (PSS summed over the N VMM processes, divided by N, once every guest has made its first
  full pass). Medians over --runs runs.
incremental: an A-B guest with 512 MiB of data in 1 GiB, of which it rewrites 1%, 10% or 50%
  of RAM every pass (the rest it filled once and leaves alone): after a first incremental
  checkpoint (full; it starts the tracking), checkpoints alternate between incremental
  (`--incremental`: the pages written since the last one) and full; for each, the bytes
  written, the command's time and the guest's longest silence (from the command until 1 s
  after it returned). Medians over --runs pairs. QEMU has no incremental snapshot; its full
  running-guest snapshot of the same guest is in bench/guestview.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from guestview import AFTER, Console, Pyhyve, Qemu, Vm, popen, stall
from pyhyve import guestkit

from common import PYHYVE, ensure_qemu, qemu_args, qemu_version, table, warm_memory

MB = 1 << 20
WS = 8
CMDLINE = f"ws={WS}M ro=120M"


def pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def first_output(con: Console, timeout: float = 300.0) -> float:
    with con.cond:
        if not con.cond.wait_for(lambda: bool(con.text), timeout):
            raise RuntimeError("no console output")
    return con.first


def start_clones(side: Pyhyve | Qemu, snap: str, n: int) -> list[Vm]:
    """N guests from `snap`, all started before any is waited for."""
    vms = []
    for i in range(n):
        name = f"c{i}"
        t = time.monotonic()
        if isinstance(side, Pyhyve):
            p = popen([PYHYVE, "run", name, "-r", snap, "--clone", "--console", "stdio"],
                      os.path.join(side.work, f"{name}.err"), env=side.env)
        else:  # saved from a running guest: QEMU runs it as soon as it is loaded
            p = popen([*qemu_args(side.qemu, side.kernel, CMDLINE),
                       "-incoming", f"exec:cat {snap}"], os.path.join(side.work, f"{name}.err"))
        vms.append(Vm(p, Console(p.stdout, False), t, name=name))
    return vms


def clones(side: Pyhyve | Qemu, snap: str, n: int) -> dict[str, float]:
    vms = start_clones(side, snap, n)
    try:
        firsts, fulls = [], []
        for vm in vms:
            fulls.append(vm.con.wait(2, timeout=600) - vm.t_start)
            firsts.append(first_output(vm.con) - vm.t_start)
        mem = sum(pss(vm.proc.pid) for vm in vms) / n
        return {"first_med": statistics.median(firsts), "first_max": max(firsts),
                "full_med": statistics.median(fulls), "full_max": max(fulls), "pss": mem}
    finally:
        for vm in vms:
            vm.close()


def snapshot_for(side: Pyhyve | Qemu, work: str) -> str:
    """A snapshot of the running guest (pyhyve's checkpoint, QEMU's migrate to a file)."""
    vm = side.boot("origin")
    try:
        vm.con.wait(5)
        path = os.path.join(work, f"origin-{side.label}")
        side.checkpoint(vm, path)
        return path
    finally:
        vm.close()


def run_clones(counts: list[int], runs: int, kernel: str, qemu: str) -> list[list[str]]:
    rows = []
    for n in counts:
        res: dict[str, list[dict[str, float]]] = {"pyhyve": [], "QEMU": []}
        for _ in range(runs):
            for label in ("pyhyve", "QEMU"):
                work = tempfile.mkdtemp(prefix="pyhyve-clones-")
                try:
                    side: Pyhyve | Qemu = (Pyhyve(kernel, WS, work, CMDLINE)
                                           if label == "pyhyve"
                                           else Qemu(qemu, kernel, WS, work, CMDLINE))
                    snap = snapshot_for(side, work)
                    res[label].append(clones(side, snap, n))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in res.items()}
        p, q = med["pyhyve"], med["QEMU"]
        for key, what, unit in (("first_med", "first output, median guest", "s"),
                                ("first_max", "first output, last guest", "s"),
                                ("full_med", "first full pass, median guest", "s"),
                                ("full_max", "first full pass, last guest", "s"),
                                ("pss", "host memory per guest (PSS)", "MiB")):
            scale = 1 / MB if unit == "MiB" else 1.0
            fmt = "{:.0f} MiB" if unit == "MiB" else "{:.2f} s"
            rows.append([str(n), what, fmt.format(p[key] * scale), fmt.format(q[key] * scale),
                         f"{p[key] / q[key]:.2f}x" if q[key] else "-"])
    return rows


def run_incremental(runs: int, kernel: str) -> list[list[str]]:
    rows = []
    for pct in (1, 10, 50):
        ws = 1024 * pct // 100
        work = tempfile.mkdtemp(prefix="pyhyve-inc-")
        try:
            side = Pyhyve(kernel, ws, work)
            cmd = f"ws={ws}M ro={512 - ws}M roevery=0" if ws < 512 else f"ws={ws}M"
            vm = side._spawn("inc", ["-m", "1G", "-k", kernel, "--cmdline", cmd], True)
            try:
                vm.con.wait(3, timeout=300)
                side.ctl(vm, "checkpoint", path=os.path.join(work, "L0"), incremental=True)
                got: dict[str, list[tuple[float, float, float]]] = {"incremental": [], "full": []}
                for i in range(runs):
                    for kind in ("incremental", "full"):
                        vm.con.wait(len(vm.con.passes) + 2, timeout=300)
                        t0 = time.monotonic()
                        r = side.ctl(vm, "checkpoint", path=os.path.join(work, f"{kind}{i}"),
                                     incremental=kind == "incremental")
                        t1 = time.monotonic()
                        time.sleep(AFTER / 2)
                        gap, _ = stall(vm.con.passes, t0, t1 + AFTER / 2)
                        got[kind].append((r["written_bytes"], t1 - t0, gap))
                        if kind == "full":
                            os.unlink(os.path.join(work, f"{kind}{i}.meta"))
            finally:
                vm.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        inc = [statistics.median(x[j] for x in got["incremental"]) for j in range(3)]
        full = [statistics.median(x[j] for x in got["full"]) for j in range(3)]
        rows.append([f"{pct}%", f"{inc[0] / MB:.0f} MiB", f"{full[0] / MB:.0f} MiB",
                     f"{inc[1] * 1e3:.0f} ms", f"{full[1] * 1e3:.0f} ms",
                     f"{inc[2] * 1e3:.0f} ms", f"{full[2] * 1e3:.0f} ms",
                     f"{inc[1] / full[1]:.2f}x"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--counts", default="1,10,50")
    ap.add_argument("--only", default="clones,incremental")
    args = ap.parse_args()
    kernel = guestkit.build()["ab"]
    warm_memory()
    only = set(args.only.split(","))
    if "clones" in only:
        qemu = ensure_qemu()
        rows = run_clones([int(c) for c in args.counts.split(",")], args.runs, kernel, qemu)
        print(table(f"N guests from one snapshot (1 GiB, {CMDLINE}; medians of {args.runs} "
                    f"runs; pyhyve --clone vs {qemu_version(qemu)} N restores; "
                    f"{time.strftime('%Y-%m-%d')})",
                    ["N", "figure", "pyhyve", "QEMU", "ratio"], rows))
    if "incremental" in only:
        rows = run_incremental(args.runs, kernel)
        print(table(f"incremental vs full checkpoint (1 GiB RAM, 512 MiB data; medians of "
                    f"{args.runs}; {time.strftime('%Y-%m-%d')})",
                    ["dirtied", "inc size", "full size", "inc time", "full time",
                     "inc silence", "full silence", "time ratio"], rows))


if __name__ == "__main__":
    main()
