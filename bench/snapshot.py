"""Suspend, checkpoint and restore-to-running: pyhyve vs QEMU 7.2, same A-B guest, same run.

Run: .venv/bin/python bench/snapshot.py [--runs 3] [--ws 0,64,512]
Guest: the kit's A-B guest, 1 GiB RAM, working set 0/64/512 MiB, warmed for a few passes.
- pyhyve: `pyhyvectl --suspend` / `--checkpoint` (wall time of the command and reported
  downtime); `pyhyve run -r` (process start to the guest running again, and the same
  inside the process).
- QEMU: `migrate "exec:cat > FILE"` on the running guest (its running-guest snapshot, QEMU
  defaults), the same after `stop` (stopped-guest snapshot), and `-incoming "exec:cat FILE"`
  from process start to `query-status` running.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

from pyhyve import guestkit
from qmp import Qmp

from common import PYHYVE, PYHYVECTL, ensure_qemu, median, qemu_args, qemu_version, table

QEMU_SNAPSHOT_TIMEOUT = 20.0


def wait_passes(log: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(log, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        nl = data.find(b"\n")
        if nl >= 0 and data[nl:].count(b"B") >= count:
            return
        time.sleep(0.01)
    raise RuntimeError(f"guest did not make {count} passes in {timeout}s")


def warm_memory() -> None:
    """Touch and free 6 GiB once: on these hosts the first touch of machine memory is slow
    (~0.4 GB/s), whoever pays it; this keeps that cost out of both sides' numbers."""
    import numpy as np
    a = np.ones(6 << 30, dtype=np.uint8)
    del a


class PyhyveSide:
    def __init__(self, kernel: str, ws: int, work: str) -> None:
        self.kernel, self.ws, self.work = kernel, ws, work
        self.env = {**os.environ, "PYHYVE_RUNDIR": os.path.join(work, "run")}

    def boot(self, name: str, log: str) -> subprocess.Popen:
        p = subprocess.Popen([PYHYVE, "run", name, "-m", "1G", "-k", self.kernel, "--cmdline",
                              f"ws={self.ws}M", "--console", f"file:{log}"], env=self.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_passes(log, 3)
        return p

    def ctl(self, name: str, *args: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = subprocess.run([PYHYVECTL, "--vm", name, *args], env=self.env, check=True,
                             capture_output=True, text=True).stdout
        wall = time.perf_counter() - t0
        downtime = float(re.search(r"downtime ([\d.]+) ms", out).group(1)) / 1e3
        return wall, downtime

    def restore(self, name: str, snap: str, log: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        p = subprocess.Popen([PYHYVE, "run", name, "-r", snap, "--console", f"file:{log}"],
                             env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        line = p.stderr.readline()
        wall = time.perf_counter() - t0
        m = re.search(r"to running ([\d.]+) ms", line)
        if not m:
            raise RuntimeError(f"restore failed: {line}")
        subprocess.run([PYHYVECTL, "--vm", name, "--destroy"], env=self.env,
                       capture_output=True)
        p.wait()
        return wall, float(m.group(1)) / 1e3

    def run(self) -> dict[str, float]:
        log = os.path.join(self.work, "py.log")
        snap = os.path.join(self.work, "py-snap")
        p = self.boot("b", log)
        ck_wall, ck_down = self.ctl("b", "--checkpoint", snap + "-ck")
        sus_wall, sus_down = self.ctl("b", "--suspend", snap)
        p.wait()
        rs_wall, rs_in = self.restore("r", snap, os.path.join(self.work, "py2.log"))
        for f in os.listdir(self.work):
            if f.startswith("py-snap"):
                os.unlink(os.path.join(self.work, f))
        return {"suspend": sus_wall, "suspend_down": sus_down, "checkpoint": ck_wall,
                "checkpoint_down": ck_down, "restore": rs_wall, "restore_in": rs_in}


class QemuSide:
    def __init__(self, qemu: str, kernel: str, ws: int, work: str) -> None:
        self.qemu, self.kernel, self.ws, self.work = qemu, kernel, ws, work

    def start(self, log: str, extra: list[str]) -> tuple[subprocess.Popen, Qmp]:
        sock = os.path.join(self.work, f"qmp-{time.monotonic_ns()}.sock")
        args = qemu_args(self.qemu, self.kernel, f"ws={self.ws}M")
        args[args.index("-serial") + 1] = f"file:{log}"
        p = subprocess.Popen([*args, "-qmp", f"unix:{sock},server=on,wait=off", *extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return p, Qmp(sock)

    def snapshot(self, q: Qmp, path: str) -> float | None:
        t0 = time.perf_counter()
        q.cmd("migrate", uri=f"exec:cat > {path}")
        info = q.wait_migration(QEMU_SNAPSHOT_TIMEOUT)
        if info is None:
            q.cmd("migrate_cancel")
            while q.cmd("query-migrate").get("status") not in ("cancelled", "failed",  # type: ignore[union-attr]
                                                                  "completed"):
                time.sleep(0.01)
            return None
        return time.perf_counter() - t0

    def run(self) -> dict[str, float | None]:
        results = {}
        for what in ("running", "stopped"):  # a QEMU that completed a migration is done
            log = os.path.join(self.work, f"q-{what}.log")
            p, q = self.start(log, [])
            try:
                wait_passes(log, 3)
                if what == "stopped":
                    q.cmd("stop")
                results[what] = self.snapshot(q, os.path.join(self.work, f"q-{what}"))
            finally:
                q.close()
                p.kill()
                p.wait()
        running, stopped = results["running"], results["stopped"]
        t0 = time.perf_counter()
        p2, q2 = self.start(os.path.join(self.work, "q2.log"),
                            ["-incoming", f"exec:cat {os.path.join(self.work, 'q-stopped')}"])
        try:
            # the incoming guest was stopped when saved: QEMU waits in "paused" for `cont`
            while (status := q2.cmd("query-status")["status"]) != "running":  # type: ignore[index]
                if status == "paused":
                    q2.cmd("cont")
                time.sleep(0.001)
            restore = time.perf_counter() - t0
        finally:
            q2.close()
            p2.kill()
            p2.wait()
        for f in ("q-running", "q-stopped"):
            if os.path.exists(os.path.join(self.work, f)):
                os.unlink(os.path.join(self.work, f))
        return {"running": running, "stopped": stopped, "restore": restore}


def fmt(x: float | None) -> str:
    return "no (20 s)" if x is None else f"{x * 1e3:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-" if a is None else "pyhyve only"
    return f"{a / b:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ws", default="0,64,512", help="working sets in MiB")
    args = ap.parse_args()
    kernel = guestkit.build()["ab"]
    qemu = ensure_qemu()
    warm_memory()
    rows = []
    for ws in (int(x) for x in args.ws.split(",")):
        py_runs, q_runs = [], []
        for _ in range(args.runs):
            work = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR"))
            try:
                py_runs.append(PyhyveSide(kernel, ws, work).run())
                q_runs.append(QemuSide(qemu, kernel, ws, work).run())
            finally:
                shutil.rmtree(work, ignore_errors=True)

        def med(runs: list[dict], key: str) -> float | None:
            vals = [r[key] for r in runs if r[key] is not None]
            return median(vals) if len(vals) * 2 > len(runs) else None

        qrun_ok = sum(r["running"] is not None for r in q_runs)
        rows.append([f"{ws} MiB", "suspend running guest",
                     f"{fmt(med(py_runs, 'suspend'))} (down {fmt(med(py_runs, 'suspend_down'))})",
                     f"{fmt(med(q_runs, 'running'))} ({qrun_ok}/{args.runs} done)",
                     ratio(med(py_runs, "suspend"), med(q_runs, "running"))])
        rows.append(["", "checkpoint running guest",
                     f"{fmt(med(py_runs, 'checkpoint'))} (down "
                     f"{fmt(med(py_runs, 'checkpoint_down'))})",
                     f"{fmt(med(q_runs, 'running'))} ({qrun_ok}/{args.runs} done)",
                     ratio(med(py_runs, "checkpoint"), med(q_runs, "running"))])
        rows.append(["", "snapshot of stopped guest (QEMU) vs suspend",
                     fmt(med(py_runs, "suspend")), fmt(med(q_runs, "stopped")),
                     ratio(med(py_runs, "suspend"), med(q_runs, "stopped"))])
        rows.append(["", "restore: process start -> running",
                     f"{fmt(med(py_runs, 'restore'))} (in-process "
                     f"{med(py_runs, 'restore_in') * 1e3:.1f})",
                     fmt(med(q_runs, "restore")),
                     ratio(med(py_runs, "restore"), med(q_runs, "restore"))])
    print(table(f"snapshot benchmark, 1 GiB A-B guest, median of {args.runs} (ms) — "
                f"{qemu_version(qemu)}", ["ws", "what", "pyhyve", "QEMU", "pyhyve/QEMU"], rows))


if __name__ == "__main__":
    main()
