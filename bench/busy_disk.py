"""The pause a busy disk sees during a checkpoint and a live migration, pyhyve against
QEMU 7.2, on the kit's device guest.

The guest (guests/virtio.c, `bench=blk ... mark=M`) keeps `qd` random 4 KiB writes in
flight on its virtio-blk disk and prints a '.' every M completions; every byte of its
console is timestamped here as it arrives. The pause is the longest time no mark arrived,
from the command until 2 s after it finished (across source and destination consoles for
a migration), so it counts whatever stopped the disk: the guest paused, requests held
while the device quiesced (AIO in flight drained, the image fdatasync'd), the switch-over,
a slow restart of I/O after it. Printed beside it: the same guest's longest gap in an
undisturbed second before the command (the noise floor, taken 2 s after its start), the
command's own duration, and when the longest gap began relative to the command's end
(negative: during it). A run whose disk makes no progress after the operation fails.

Both sides bypass the host's page cache (pyhyve `--disk IMG,direct`, QEMU `cache=none`,
`aio=native`) on one image a migration's two ends share (the destination opens the same
file: pyhyve `--reuse-paths`, QEMU the same `-drive`). Checkpoint: pyhyve `checkpoint` on
the control socket, which keeps the 1 GiB disk as it was at the pause (copy-before-write,
docs/snapshot-format.md), and again with `--no-disk-copy`, which does not, as QEMU's does
not; each run checkpoints to the same path, so from the second run on a save also removes
the generation before it (its disk copy too); QEMU `migrate "exec:cat > F"` then `cont`
(its running-guest snapshot), at 10 GiB/s. Migration (loopback TCP): each at its defaults
and matched as bench/guestview.py defines them. Medians of --runs runs, the two
interleaved; a run that fails is reported.

    .venv/bin/python bench/busy_disk.py --runs 5
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time

from devices import KERNEL, make_image, qemu_args
from guestview import KEY, QEMU_TIMEOUT, Console, free_port, load_key_hex, popen
from pyhyve.control.client import ControlClient
from qmp import Qmp

from common import PYHYVE, ensure_qemu, median, qemu_version, table

CMDLINE = "bench=blk bs=4096 qd=32 rand write ms=60000 mark=64 span=536870912"
MEMORY = "256M"
AFTER = 2.0


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float]:
    """The longest time without a mark in [start, end], and when it began."""
    inside = [t for t in times if start < t <= end]
    before = [t for t in times if t <= start]
    points = [before[-1] if before else start, *inside, end]
    return max((b - a, a) for a, b in itertools.pairwise(points))


class Vmm:
    label = ""

    def __init__(self, work: str, image: str) -> None:
        self.work, self.image = work, image
        self.procs: list[subprocess.Popen] = []
        self.qmps: dict[str, Qmp] = {}

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> Console:
        """The guest's progress marks: after "BENCH go" on one that boots here, from the
        first byte on one that arrives."""
        p = popen(args, os.path.join(self.work, f"{self.label}-{name}.err"), env=env)
        self.procs.append(p)
        return Console(p.stdout, name != "dst", mark=b".", start=b"BENCH go")

    def close(self) -> None:
        for q in self.qmps.values():
            q.close()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs, self.qmps = [], {}


class Pyhyve(Vmm):
    label = "pyhyve"

    def __init__(self, work: str, image: str) -> None:
        super().__init__(work, image)
        self.env = {**os.environ, "PYHYVE_RUNDIR": os.path.join(work, "run")}
        self.key = os.path.join(work, "key")
        with open(self.key, "w") as f:
            f.write(KEY)

    def boot(self) -> Console:
        return self._spawn("src", [PYHYVE, "run", "src", "--memory", MEMORY, "--kernel", KERNEL,
                                   "--cmdline", CMDLINE, "--disk", f"{self.image},direct",
                                   "--console", "stdio"], self.env)

    def _ctl(self, cmd: str, **args: object) -> dict:
        os.environ["PYHYVE_RUNDIR"] = self.env["PYHYVE_RUNDIR"]
        with ControlClient("src", timeout=120) as c:
            reply = c.call(cmd, **args)
        if not reply.get("ok", True) or reply.get("error"):
            raise RuntimeError(f"{cmd}: {reply.get('error')}")
        return reply

    def checkpoint(self, path: str, disk_copy: bool = True) -> None:
        self._ctl("checkpoint", path=path, disk_copy=disk_copy)

    def listen(self, port: int, kind: str) -> Console:
        return self._spawn("dst", [PYHYVE, "run", "dst", "-R", f"127.0.0.1,{port}",
                                   "--key-file", self.key, "--reuse-paths",
                                   "--console", "stdio"], self.env)

    def migrate(self, port: int, kind: str) -> None:
        opts = {"defaults": {}, "matched": {"downtime_ms": 300.0, "compress": "none"}}[kind]
        r = self._ctl("migrate", target=f"127.0.0.1:{port}", live=True,
                      key=load_key_hex(self.key), **opts)
        if r.get("state") != "completed":
            raise RuntimeError(f"pyhyve migration {r.get('state')}: {r.get('error')}")


class Qemu(Vmm):
    label = "QEMU"

    def __init__(self, work: str, image: str, qemu: str) -> None:
        super().__init__(work, image)
        self.qemu = qemu

    def _vm(self, name: str, extra: list[str]) -> Console:
        sock = os.path.join(self.work, f"{name}.qmp")
        m = self._spawn(name, [*qemu_args(self.qemu, self.image, CMDLINE, "native"),
                               "-m", MEMORY, "-qmp", f"unix:{sock},server=on,wait=off",
                               *extra])
        self.qmps[name] = Qmp(sock)
        return m

    def boot(self) -> Console:
        return self._vm("src", [])

    def checkpoint(self, path: str, disk_copy: bool = True) -> None:
        """(QEMU's snapshot never keeps the disk: `disk_copy` is pyhyve's alone.)"""
        q = self.qmps["src"]
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        q.cmd("migrate", uri=f"exec:cat > {path}")
        if q.wait_migration(QEMU_TIMEOUT) is None:
            raise TimeoutError("QEMU's snapshot did not complete")
        q.cmd("cont")

    def listen(self, port: int, kind: str) -> Console:
        return self._vm("dst", ["-incoming", f"tcp:127.0.0.1:{port}"])

    def migrate(self, port: int, kind: str) -> None:
        q = self.qmps["src"]
        if kind == "matched":
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "auto-converge", "state": True}])
            q.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30,
                                               "downtime-limit": 300})
        q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        if q.wait_migration(QEMU_TIMEOUT) is None:
            q.cmd("migrate_cancel")
            raise TimeoutError(f"QEMU's migration did not complete in {QEMU_TIMEOUT:.0f} s")


def one(vmm: Vmm, op: str) -> dict[str, float]:
    """Boot, let the disk run for a second and more, do `op`, watch 2 s more."""
    try:
        dst = None
        if not op.startswith("checkpoint"):
            port = free_port()
            dst = vmm.listen(port, op)
        src = vmm.boot()
        t_go = src.wait(1)
        # warmed up (pyhyve imports its save and migration code 1 s after start, in the
        # background: not in the quiet second), then a quiet second
        while src.wait(len(src.passes) + 1) - t_go < 3.0:
            pass
        t0 = time.monotonic()
        floor, _ = longest_gap(src.passes, t0 - 1.0, t0)
        if op.startswith("checkpoint"):
            vmm.checkpoint(os.path.join(vmm.work, f"{vmm.label}-ck"), op == "checkpoint")
        else:
            vmm.migrate(port, op)
        t1 = time.monotonic()
        time.sleep(AFTER)
        marks = sorted(src.passes + (dst.passes if dst else []))
        for m in (src, dst):
            if m is not None and (b"bench:" in m.text or b"VIRTIO ERROR" in m.text):
                raise RuntimeError(f"the guest failed: {bytes(m.text[-300:])!r}")
        if not [t for t in (dst or src).passes if t > t1]:
            raise RuntimeError("the disk made no progress after the operation")
        pause, at = longest_gap(marks, t0, t1 + AFTER)
        return {"pause": pause, "at": at - t1, "floor": floor, "cmd": t1 - t0}
    finally:
        vmm.close()


def col(got: dict[str, list[dict[str, float]]], label: str, key: str) -> float:
    """Median of `key` over `label`'s runs, in ms."""
    return median([r[key] for r in got[label]]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ops", default="checkpoint,checkpoint-nocopy,defaults,matched",
                    help="which of checkpoint, checkpoint-nocopy, defaults, matched "
                    "(comma-separated)")
    ap.add_argument("--work", default="/var/tmp", help="a directory on a disk-backed file "
                    "system (O_DIRECT); the 1 GiB image is made there and removed")
    a = ap.parse_args()
    if not os.path.exists(KERNEL):
        subprocess.run(["make", "-s", "-C", os.path.join(os.path.dirname(KERNEL), "..")],
                       check=True)
    qemu = ensure_qemu()
    work = tempfile.mkdtemp(prefix="pyhyve-bench-", dir=a.work)
    errors: list[str] = []
    try:
        image = make_image(work)
        sides = (Pyhyve(work, image), Qemu(work, image, qemu))
        rows = []
        for op in a.ops.split(","):
            got: dict[str, list[dict[str, float]]] = {s.label: [] for s in sides}
            for _ in range(a.runs):
                for s in sides:
                    try:
                        got[s.label].append(one(s, op))
                    except Exception as e:  # a failed run is a finding, not the end
                        errors.append(f"{s.label} {op}: {type(e).__name__}: {e}")

            p, q = col(got, "pyhyve", "pause"), col(got, "QEMU", "pause")
            name = {"checkpoint": "checkpoint (pyhyve keeps the disk)",
                    "checkpoint-nocopy": "checkpoint (pyhyve --no-disk-copy)"}.get(
                        op, f"live migration ({op})")
            rows.append([name, f"{p:.1f} ms", f"{q:.1f} ms", f"{p - q:+.1f} ms",
                         f"{col(got, 'pyhyve', 'floor'):.1f} / {col(got, 'QEMU', 'floor'):.1f} ms",
                         f"{col(got, 'pyhyve', 'cmd'):.0f} / {col(got, 'QEMU', 'cmd'):.0f} ms",
                         f"{col(got, 'pyhyve', 'at'):+.0f} / {col(got, 'QEMU', 'at'):+.0f} ms",
                         f"{len(got['pyhyve'])}/{len(got['QEMU'])}"])
            print(f"bench: {name}: pyhyve {p:.1f} ms, QEMU {q:.1f} ms", file=sys.stderr)
        print(table(f"busy disk (32 random 4 KiB writes in flight, O_DIRECT): longest pause in "
                    f"its progress, medians of {a.runs} ({qemu_version(qemu)})",
                    ["operation", "pyhyve", "QEMU", "pyhyve - QEMU", "quiet floor (p / Q)",
                     "command (p / Q)", "pause began, from its end (p / Q)",
                     "runs ok (p / Q)"], rows))
        for e in errors:
            print(f"bench: failed run: {e}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
