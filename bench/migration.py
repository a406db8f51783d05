"""Live migration over loopback TCP: pyhyve vs QEMU 7.2, same A-B guest, same run.

Run: .venv/bin/python bench/migration.py [--runs 3] [--ws 0,64,512]
Guest: the kit's A-B guest, 1 GiB RAM, working set 0/64/512 MiB, warmed for a few passes.
- pyhyve: destination `pyhyve run dst -R 127.0.0.1,PORT --key-file K`, source
  `pyhyvectl --vm src --migrate-live 127.0.0.1:PORT --key-file K`: defaults (authenticated,
  5 ms downtime target, auto-converge, adaptive compression), and again with
  `--compress none`. Total time, downtime and bytes as pyhyve reports them.
- QEMU: `-incoming tcp:...` on the destination; on the source max-bandwidth raised to 10G
  (at its 128 MiB/s default it never converges for this guest), then `migrate`; total-time,
  downtime and transferred bytes from query-migrate.
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
from snapshot import wait_passes, warm_memory

from common import PYHYVE, PYHYVECTL, ensure_qemu, median, qemu_args, qemu_version, table

QEMU_TIMEOUT = 30.0


def pyhyve_once(kernel: str, ws: int, work: str, port: int, extra: list[str]) -> dict:
    key = os.path.join(work, "key")
    with open(key, "w") as f:
        f.write("benchmark migration key 0123456789")
    env = {**os.environ, "PYHYVE_RUNDIR": os.path.join(work, "run")}
    log = os.path.join(work, "src.log")
    src = subprocess.Popen([PYHYVE, "run", "src", "-m", "1G", "-k", kernel, "--cmdline",
                            f"ws={ws}M", "--console", f"file:{log}"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dst = subprocess.Popen([PYHYVE, "run", "dst", "-R", f"127.0.0.1,{port}", "--key-file", key,
                            "--console", "null"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_passes(log, 3)
        time.sleep(0.5)
        out = subprocess.run([PYHYVECTL, "--vm", "src", "--migrate-live", f"127.0.0.1:{port}",
                              "--key-file", key, *extra], env=env, capture_output=True,
                             text=True)
        m = re.search(r"total ([\d.]+) ms, downtime ([\d.]+) ms.*?([\d.]+) MiB sent", out.stdout)
        if out.returncode or not m:
            raise RuntimeError(f"pyhyve migration failed: {out.stdout} {out.stderr}")
        return {"total": float(m.group(1)) / 1e3, "down": float(m.group(2)) / 1e3,
                "mib": float(m.group(3))}
    finally:
        subprocess.run([PYHYVECTL, "--vm", "dst", "--destroy"], env=env, capture_output=True)
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
            p.wait()


def qemu_once(qemu: str, kernel: str, ws: int, work: str, port: int) -> dict | None:
    log = os.path.join(work, "q.log")
    args = qemu_args(qemu, kernel, f"ws={ws}M")
    args[args.index("-serial") + 1] = f"file:{log}"
    sq, dq = os.path.join(work, "s.qmp"), os.path.join(work, "d.qmp")
    dargs = qemu_args(qemu, kernel, f"ws={ws}M")
    dargs[dargs.index("-serial") + 1] = "null"
    src = subprocess.Popen([*args, "-qmp", f"unix:{sq},server=on,wait=off"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dst = subprocess.Popen([*dargs, "-qmp", f"unix:{dq},server=on,wait=off", "-incoming",
                            f"tcp:127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        q = Qmp(sq)
        Qmp(dq).close()
        wait_passes(log, 3)
        time.sleep(0.5)
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = q.wait_migration(QEMU_TIMEOUT)
        if info is None:
            q.cmd("migrate_cancel")
            return None
        return {"total": info["total-time"] / 1e3, "down": info["downtime"] / 1e3,
                "mib": info["ram"]["transferred"] / (1 << 20)}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ws", default="0,64,512")
    args = ap.parse_args()
    kernel = guestkit.build()["ab"]
    qemu = ensure_qemu()
    warm_memory()
    rows = []
    port = 7800
    for ws in (int(x) for x in args.ws.split(",")):
        res: dict[str, list[dict]] = {"pyhyve": [], "pyhyve --compress none": [], "QEMU": []}
        for _ in range(args.runs):  # interleaved, so machine noise hits all three alike
            for name in res:
                work = tempfile.mkdtemp()
                port += 1
                try:
                    if name == "QEMU":
                        r = qemu_once(qemu, kernel, ws, work, port)
                    else:
                        extra = ["--compress", "none"] if "none" in name else []
                        r = pyhyve_once(kernel, ws, work, port, extra)
                    if r is not None:
                        res[name].append(r)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
        q = res["QEMU"]
        qt = median([r["total"] for r in q]) if q else None
        qd = median([r["down"] for r in q]) if q else None
        for name in ("pyhyve", "pyhyve --compress none", "QEMU"):
            rs = res[name]
            t = median([r["total"] for r in rs])
            d = median([r["down"] for r in rs])
            mib = median([r["mib"] for r in rs])
            rows.append([f"{ws} MiB" if name == "pyhyve" else "", name,
                         f"{t * 1e3:.0f}", f"{d * 1e3:.1f}", f"{mib:.1f}",
                         f"{len(rs)}/{args.runs}",
                         "" if name == "QEMU" or not qt else f"{t / qt:.2f}x",
                         "" if name == "QEMU" or not qd else f"{d / qd:.2f}x"])
    print(table(f"live migration over loopback, 1 GiB A-B guest, median of {args.runs} — "
                f"{qemu_version(qemu)} (max-bandwidth 10G)",
                ["ws", "who", "total ms", "downtime ms", "MiB sent", "done", "total/QEMU",
                 "downtime/QEMU"], rows))


if __name__ == "__main__":
    main()
