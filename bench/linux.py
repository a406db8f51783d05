"""The Linux lane's guest (docs/linux.md) under pyhyve and QEMU 7.2: cold boot to the
ready marker, and time to a working shell by restoring a snapshot of the booted guest.

Run: .venv/bin/python bench/linux.py [--runs N] [--shell-runs M]

Same vmlinux, initramfs, command line (the MP-table machine: `acpi=off`), 128 MiB and one
vCPU on both sides (a last row: pyhyve's boot with ACPI instead, what ACPI costs here);
QEMU is `-M microvm` as in every benchmark here. Clocks run from
spawning the process:
- cold boot: until the guest prints PYHYVE-READY on its console;
- working shell: a command is typed on the console at once and again every 0.2 s
  (`echo ok-$((40+2))`) and the clock stops when the guest's first answer (`ok-42`)
  comes back, so the restore counts only once the guest runs a shell command again,
  not when the VMM says "running". pyhyve restores with its defaults (eager); QEMU
  loads `-incoming "exec:cat FILE"` and gets `cont` as soon as it is paused.
Every cold boot goes on to a booted snapshot (at the ready marker plus one workload tick:
what the guest was doing at that instant moves a restore's time by up to 0.2 s, so one
snapshot per side would measure that instant, not the VMM), and each snapshot is restored
--shell-runs / --runs times. Runs are interleaved (pyhyve, QEMU, pyhyve, ...) so drift on
a noisy host hits both.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import tempfile
import time

from pyhyve import linuxguest
from qmp import Qmp

from common import PYHYVE, PYHYVECTL, QEMU_CPU, ensure_qemu, median, qemu_version, table

READY = linuxguest.READY.encode()
ASK, ANSWER = b"echo ok-$((40+2))\n", b"ok-42"
TIMEOUT = 300.0


def qemu_cmd(qemu: str, lane: dict[str, str], cmdline: str, qmp: str) -> list[str]:
    return [qemu, "-M", "microvm,isa-serial=on,rtc=off", "-enable-kvm", "-cpu", QEMU_CPU,
            "-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-kernel", lane["vmlinux"], "-initrd", lane["initramfs"],
            "-append", cmdline, "-qmp", f"unix:{qmp},server=on,wait=off"]


def pyhyve_cmd(name: str, lane: dict[str, str], cmdline: str) -> list[str]:
    return [PYHYVE, "run", name, "-m", "128M", "-c", "1", "-k", lane["vmlinux"], "--initrd",
            lane["initramfs"], "--cmdline", cmdline, "--console", "stdio"]


def until(p: subprocess.Popen, needle: bytes, t0: float, out: bytearray,
          timeout: float = TIMEOUT, ask: bytes = b"") -> float:
    """Seconds from t0 until `needle` appears in p's stdout (kept in `out`). With `ask`,
    type it on the console every 0.2 s until then: input sent before a VMM's serial port
    is ready to take it may be dropped (QEMU's is not open while it loads a snapshot)."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    deadline = time.monotonic() + timeout
    typed = -1.0
    while needle not in out:
        now = time.monotonic()
        left = deadline - now
        if left <= 0:
            raise TimeoutError(f"{needle!r} not seen in {timeout:.0f} s: {bytes(out[-300:])!r}")
        if ask:  # every 0.2 s, not after every chunk read: the guest echoes byte by byte
            assert p.stdin is not None
            if now - typed >= 0.2:
                p.stdin.write(ask)
                p.stdin.flush()
                typed = now
            left = min(left, typed + 0.2 - now)
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the VMM exited: {bytes(out[-300:])!r}")
            out += chunk
    return time.perf_counter() - t0


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)


def end(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


class Side:
    def __init__(self, kind: str, qemu: str, lane: dict[str, str], work: str,
                 acpi: bool = False) -> None:
        self.kind, self.qemu, self.lane, self.work = kind, qemu, lane, work
        self.cmdline = linuxguest.cmdline(acpi=acpi)
        self.env = {**os.environ, "PYHYVE_RUNDIR": os.path.join(work, "run")}
        self.snapshots: list[str] = []
        self.n = 0

    def _boot(self) -> tuple[subprocess.Popen, float, bytearray, str]:
        self.n += 1
        name = f"lx{self.n}"
        qmp = os.path.join(self.work, f"{name}.qmp")
        argv = qemu_cmd(self.qemu, self.lane, self.cmdline, qmp) if self.kind == "qemu" \
            else pyhyve_cmd(name, self.lane, self.cmdline)
        t0 = time.perf_counter()
        p = spawn(argv, self.env)
        out = bytearray()
        return p, until(p, READY, t0, out), out, name if self.kind == "pyhyve" else qmp

    def cold_boot(self, snapshot: bool = True) -> float:
        """Seconds to the ready marker; then (unless not `snapshot`) the booted snapshot."""
        p, t, out, handle = self._boot()
        try:
            if snapshot:
                path = os.path.join(self.work, f"{self.kind}-booted-{len(self.snapshots)}")
                self._suspend(p, out, handle, path)
                self.snapshots.append(path)
        finally:
            end(p)
        return t

    def _suspend(self, p: subprocess.Popen, out: bytearray, handle: str, path: str) -> None:
        until(p, b"tick 1 ", time.perf_counter(), out)
        if self.kind == "pyhyve":
            subprocess.run([PYHYVECTL, "--vm", handle, "--suspend", path],
                           check=True, env=self.env, capture_output=True)
            p.wait(60)
        else:
            q = Qmp(handle)
            q.cmd("stop")
            q.cmd("migrate", uri=f"exec:cat > {path}")
            if q.wait_migration(TIMEOUT) is None:
                raise TimeoutError("QEMU's snapshot did not complete")
            q.close()

    def shell_by_restore(self, snapshot: str) -> float:
        self.n += 1
        name = f"lx{self.n}"
        qmp = os.path.join(self.work, f"{name}.qmp")
        if self.kind == "pyhyve":
            argv = [PYHYVE, "run", name, "-r", snapshot, "--console", "stdio"]
        else:
            argv = [*qemu_cmd(self.qemu, self.lane, self.cmdline, qmp), "-incoming",
                    f"exec:cat {snapshot}"]
        t0 = time.perf_counter()
        p = spawn(argv, self.env)
        try:
            if self.kind == "qemu":
                q = Qmp(qmp)
                while (status := q.cmd("query-status")["status"]) != "running":  # type: ignore[index]
                    if status == "paused":
                        q.cmd("cont")
                    time.sleep(0.005)
                q.close()
            return until(p, ANSWER, t0, bytearray(), ask=ASK)
        finally:
            end(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--shell-runs", type=int, default=15)
    args = ap.parse_args()
    lane = linuxguest.build()
    qemu = ensure_qemu()
    work = tempfile.mkdtemp(prefix="bench-linux-")
    sides = {k: Side(k, qemu, lane, work) for k in ("pyhyve", "qemu")}
    acpi = Side("pyhyve", qemu, lane, work, acpi=True)
    boots: dict[str, list[float]] = {k: [] for k in (*sides, "acpi")}
    shells: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.runs):
        for k, s in sides.items():
            boots[k].append(s.cold_boot())
        boots["acpi"].append(acpi.cold_boot(snapshot=False))
    for i in range(max(args.shell_runs, args.runs)):
        for k, s in sides.items():
            shells[k].append(s.shell_by_restore(s.snapshots[i % args.runs]))
    b = {k: median(v) for k, v in boots.items()}
    sh = {k: median(v) for k, v in shells.items()}
    print(table(f"Linux lane guest ({lane['source']}, 128 MiB, 1 vCPU), medians of "
                f"{args.runs} boots and {args.shell_runs} restores ({qemu_version(qemu)})",
                ["", "pyhyve", "QEMU", "pyhyve/QEMU"],
                [["cold boot to ready marker (s)", f"{b['pyhyve']:.2f}", f"{b['qemu']:.2f}",
                  f"{b['pyhyve'] / b['qemu']:.2f}x"],
                 ["working shell by restore (s)", f"{sh['pyhyve']:.3f}", f"{sh['qemu']:.3f}",
                  f"{sh['pyhyve'] / sh['qemu']:.2f}x"],
                 ["restore / cold boot", f"{sh['pyhyve'] / b['pyhyve']:.1%}",
                  f"{sh['qemu'] / b['qemu']:.1%}", ""],
                 ["cold boot with ACPI instead of the MP table (s)", f"{b['acpi']:.2f}", "",
                  f"{b['acpi'] / b['pyhyve']:.2f}x of pyhyve's MP boot"]]))
    for k in sides:
        print(f"{k} boots (s): {', '.join(f'{x:.2f}' for x in boots[k])}; "
              f"shells (s): {', '.join(f'{x:.3f}' for x in shells[k])}")
    print(f"pyhyve ACPI boots (s): {', '.join(f'{x:.2f}' for x in boots['acpi'])}")


if __name__ == "__main__":
    main()
