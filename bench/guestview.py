"""What the guest sees: pyhyve vs QEMU 7.2 on the same A-B guest, in the same run.

Run: .venv/bin/python bench/guestview.py [--runs 5] [--ws 0,64,512] [--only snapshot,migration]
     [--kinds defaults,matched,postcopy] [--cold MIB] [--loading-set MS]

The A-B guest prints one `B` per pass over its working set; every byte of its console is
timestamped as it arrives (pyhyve `--console stdio`, QEMU `-serial stdio`, both into a pipe
read here), so each figure is the guest's own progress, not a VMM's "done":
- floor: the same guest booted fresh: process start to its first pass (over freshly
  allocated memory), and its steady-state pass time.
- restore: process start to the first `B` after the restore (the end of the pass the guest
  was in), to its first full pass (the second `B`), and to steady speed (three passes in a
  row no slower than 1.5x the steady pass time). pyhyve --lazy and --eager (its default);
  QEMU `-incoming "exec:cat FILE"` of a stopped-guest snapshot, `cont` when loaded. And the
  VMM process's resident memory (VmRSS) after 8 passes, beside the booted guest's.
  `--cold MIB` adds that much data after the working set, written once at boot and never
  read again (the A-B guest's `ro=MIB roevery=0`): what a loading set leaves in the file.
- checkpoint: the longest silence of the guest from the command until 2 s after it
  finished, and the passes lost: passes in that window against the same guest's passes in
  the undisturbed second before it, scaled to the window. pyhyve
  `--checkpoint`; QEMU `migrate "exec:cat > F && sync F"` then `cont` (its running-guest
  snapshot), at max-bandwidth 10G (at its 128 MiB/s default it does not finish in 30 s).
- suspend: command to the files being safe on disk: pyhyve `--suspend` (fsyncs), QEMU
  `stop` + `migrate "exec:cat > F && sync F"`: fsync on both sides.
- migration (loopback TCP): longest silence across source and destination consoles from
  the command until 2 s after completion, passes lost, total time, and the throttle each
  applied. Rows: each at its defaults (pyhyve: 5 ms target, auto-converge, compression
  auto; QEMU: 128 MiB/s, 300 ms, no auto-converge), and matched (both: unlimited
  bandwidth, 300 ms target, auto-converge, no compression), target (pyhyve at its
  defaults but a 300 ms target, QEMU as in matched), and post-copy (both switch at
  once: pyhyve --postcopy, QEMU postcopy-ram with migrate-start-postcopy right after
  migrate; unlimited bandwidth, no compression). The destination guest must
  make passes afterwards, without starting over, or the run fails; a migration that does
  not finish in 30 s counts as infinitely slow (DNF) in the medians.
VMM-internal figures (pyhyve's and QEMU's own downtime) are printed too, labelled so.
Medians over --runs runs; runs of one kind are interleaved between the two systems.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from pyhyve import guestkit
from pyhyve.control.client import ControlClient
from qmp import Qmp

from common import PYHYVE, ensure_qemu, qemu_args, qemu_version, table, warm_memory

KEY = "benchmark migration key 0123456789"
INF = float("inf")
QEMU_TIMEOUT = 30.0
AFTER = 2.0  # seconds watched after an operation ends


class Console:
    """A guest's console pipe, read on a thread: the time each pass marker (`mark`)
    arrived; with `banner`, only those after the first `start` (a guest booting here
    prints a banner first; one that arrives by restore or migration does not)."""

    def __init__(self, stream: object, banner: bool, mark: bytes = b"B",
                 start: bytes = b"\n") -> None:
        self.passes: list[float] = []
        self.text = bytearray()
        self.first = 0.0  # when its first byte came
        self.cond = threading.Condition()
        self._in_banner, self._mark, self._start = banner, mark, start
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: object) -> None:
        fd = stream.fileno()  # type: ignore[attr-defined]
        while chunk := os.read(fd, 65536):
            t = time.monotonic()
            with self.cond:
                if not self.text:
                    self.first = t
                self.text += chunk
                if self._in_banner:  # "A-B start ws=..." has a B of its own
                    at = self.text.find(self._start)
                    if at < 0:
                        continue
                    self._in_banner = False
                    chunk = bytes(self.text[at + len(self._start):])
                self.passes += [t] * chunk.count(self._mark)
                self.cond.notify_all()

    def wait(self, n: int, timeout: float = 120.0) -> float:
        """Until `n` passes have been seen; returns the time of the n-th."""
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.passes) >= n, timeout):
                raise RuntimeError(f"guest made {len(self.passes)} of {n} passes in {timeout}s: "
                                   f"{bytes(self.text[-200:])!r}")
            return self.passes[n - 1]

    def after(self, t: float) -> list[float]:
        with self.cond:
            return [p for p in self.passes if p > t]


def steady_pass(con: Console, skip: int = 3, min_s: float = 0.5) -> float:
    """Mean pass time over at least `min_s` after the first `skip` passes (passes of a
    small working set arrive many to a read, so single intervals say nothing)."""
    t0 = con.wait(skip + 1)
    n = skip + 21
    while True:
        t = con.wait(n)
        if t - t0 >= min_s:
            return (t - t0) / (n - skip - 1)
        n *= 2


def at_steady(passes: list[float], steady: float) -> float | None:
    """When three consecutive pass intervals are within 1.5x the steady pass time."""
    limit = 1.5 * steady + 0.002
    for i in range(len(passes) - 3):
        if all(passes[j + 1] - passes[j] <= limit for j in range(i, i + 3)):
            return passes[i]
    return None


def stall(passes: list[float], start: float, end: float) -> tuple[float, float]:
    """Longest silence of the guest within [start, end] (from its last pass before start),
    and the passes lost: those the guest made in the window against those it made in the
    same time just before it, undisturbed (never clamped: a negative number is a gain)."""
    before = [p for p in passes if p <= start]
    inside = [p for p in passes if start < p <= end]
    points = [before[-1] if before else start, *inside, end]
    width = end - start
    base = [p for p in before if p > start - min(width, 1.0)]  # up to 1 s before, scaled
    undisturbed = len(base) * width / min(width, 1.0)
    return max(b - a for a, b in itertools.pairwise(points)), undisturbed - len(inside)


def no_restart(con: Console) -> None:
    """A restored or received guest continues: its start banner must never appear."""
    if b"A-B start" in con.text:
        raise RuntimeError("the guest started over instead of continuing")


def popen(args: list[str], errlog: str, **kw: object) -> subprocess.Popen:
    """A VMM with its console on a pipe we read, its stderr kept in `errlog`."""
    err = os.open(errlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, **kw)  # type: ignore[call-overload]
    finally:
        os.close(err)


@dataclass
class Vm:
    proc: subprocess.Popen
    con: Console
    t_start: float
    qmp: Qmp | None = None
    name: str = ""
    files: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.qmp:
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Pyhyve:
    label = "pyhyve"

    def __init__(self, kernel: str, ws: int, work: str, cmdline: str | None = None) -> None:
        self.kernel, self.ws, self.work = kernel, ws, work
        self.cmdline = cmdline or f"ws={ws}M"
        self.env = {**os.environ, "PYHYVE_RUNDIR": os.path.join(work, "run")}
        with open(os.path.join(work, "key"), "w") as f:
            f.write(KEY)

    def _spawn(self, name: str, args: list[str], banner: bool) -> Vm:
        t = time.monotonic()
        p = popen([PYHYVE, "run", name, *args, "--console", "stdio"],
                  os.path.join(self.work, f"{name}.err"), env=self.env)
        return Vm(p, Console(p.stdout, banner), t, name=name)

    def boot(self, name: str) -> Vm:
        return self._spawn(name, ["-m", "1G", "-k", self.kernel, "--cmdline", self.cmdline],
                           True)

    def ctl(self, vm: Vm, cmd: str, **args: object) -> dict:
        """A request on the VM's control socket, as pyhyvectl sends it (without the start
        of a pyhyvectl process, which QEMU's side, on an open QMP socket, does not pay)."""
        os.environ["PYHYVE_RUNDIR"] = self.env["PYHYVE_RUNDIR"]
        with ControlClient(vm.name, timeout=120) as c:
            reply = c.call(cmd, **args)
        if not reply.get("ok", True) or reply.get("error"):
            raise RuntimeError(f"{cmd}: {reply.get('error')}")
        return reply

    def checkpoint(self, vm: Vm, path: str) -> None:
        self.ctl(vm, "checkpoint", path=path)

    def suspend(self, vm: Vm, path: str) -> None:
        extra = {"loading_window": LOADING_MS / 1000} if LOADING_MS else {}
        self.ctl(vm, "suspend", path=path, **extra)
        vm.proc.wait(60)

    def restore(self, name: str, path: str, eager: bool = False) -> Vm:
        return self._spawn(name, ["-r", path, "--eager" if eager else "--lazy"], False)

    def listen(self, name: str, port: int, kind: str = "defaults") -> Vm:
        return self._spawn(name, ["-R", f"127.0.0.1,{port}", "--key-file",
                                  os.path.join(self.work, "key")], False)

    def migrate(self, src: Vm, port: int, kind: str) -> dict[str, float]:
        opts: dict[str, object] = {
            "defaults": {}, "matched": {"downtime_ms": 300.0, "compress": "none"},
            "target": {"downtime_ms": 300.0},
            "postcopy": {"postcopy": True, "compress": "none"},
            "postcopy-defaults": {"postcopy": True},
            "compressed": {"downtime_ms": 300.0, "compress": "zstd"}}[kind]
        r = self.ctl(src, "migrate", target=f"127.0.0.1:{port}", live=True,
                     key=load_key_hex(os.path.join(self.work, "key")), **opts)
        if r.get("state") != "completed":
            raise RuntimeError(f"pyhyve migration {r.get('state')}: {r.get('error')}")
        return {"vmm_downtime": float(r["downtime_s"]), "throttle": 100 * float(r["throttle"])}


class Qemu:
    label = "QEMU"

    def __init__(self, qemu: str, kernel: str, ws: int, work: str,
                 cmdline: str | None = None) -> None:
        self.qemu, self.kernel, self.ws, self.work = qemu, kernel, ws, work
        self.cmdline = cmdline or f"ws={ws}M"

    def _spawn(self, name: str, extra: list[str], banner: bool) -> Vm:
        sock = os.path.join(self.work, f"{name}.qmp")
        t = time.monotonic()
        p = popen([*qemu_args(self.qemu, self.kernel, self.cmdline),
                   "-qmp", f"unix:{sock},server=on,wait=off", *extra],
                  os.path.join(self.work, f"{name}.err"))
        return Vm(p, Console(p.stdout, banner), t, Qmp(sock), name=name)

    def boot(self, name: str) -> Vm:
        return self._spawn(name, [], True)

    def _to_file(self, vm: Vm, path: str) -> dict:
        q = vm.qmp
        assert q is not None
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        # QEMU says "completed" before its exec channel has closed: wait for the sync
        q.cmd("migrate", uri=f"exec:cat > {path} && sync {path} && touch {path}.done")
        info = q.wait_migration(QEMU_TIMEOUT)
        if info is None:
            raise TimeoutError(f"QEMU's snapshot did not complete in {QEMU_TIMEOUT:.0f} s")
        deadline = time.monotonic() + QEMU_TIMEOUT
        while not os.path.exists(f"{path}.done"):
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU's snapshot file was never synced")
            time.sleep(0.001)
        return info

    def checkpoint(self, vm: Vm, path: str) -> None:
        self._to_file(vm, path)
        vm.qmp.cmd("cont")  # type: ignore[union-attr]

    def suspend(self, vm: Vm, path: str) -> None:
        vm.qmp.cmd("stop")  # type: ignore[union-attr]
        self._to_file(vm, path)
        vm.close()

    def restore(self, name: str, path: str, eager: bool = False) -> Vm:
        vm = self._spawn(name, ["-incoming", f"exec:cat {path}"], False)
        q = vm.qmp
        assert q is not None
        # saved while stopped: QEMU loads it and waits in "paused" for `cont`
        while (status := q.cmd("query-status")["status"]) != "running":  # type: ignore[index]
            if status == "paused":
                q.cmd("cont")
            time.sleep(0.005)  # not faster: QEMU answers from the loop that loads
        return vm

    def listen(self, name: str, port: int, kind: str = "defaults") -> Vm:
        vm = self._spawn(name, ["-incoming", f"tcp:127.0.0.1:{port}"], False)
        if kind == "compressed":  # multifd (2 channels) with zstd: set before the source
            vm.qmp.cmd("migrate-set-capabilities",  # type: ignore[union-attr]  # connects
                       capabilities=[{"capability": "multifd", "state": True}])
            vm.qmp.cmd("migrate-set-parameters",  # type: ignore[union-attr]
                       **{"multifd-channels": 2, "multifd-compression": "zstd"})
        if kind.startswith("postcopy"):  # both sides must have it before `migrate`
            vm.qmp.cmd("migrate-set-capabilities",  # type: ignore[union-attr]
                       capabilities=[{"capability": "postcopy-ram", "state": True}])
        return vm

    def migrate(self, src: Vm, port: int, kind: str) -> dict[str, float]:
        q = src.qmp
        assert q is not None
        if kind in ("matched", "compressed", "target"):
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "auto-converge", "state": True}])
            q.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30,
                                               "downtime-limit": 300})
        if kind == "compressed":
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "multifd", "state": True}])
            q.cmd("migrate-set-parameters", **{"multifd-channels": 2,
                                               "multifd-compression": "zstd"})
        if kind.startswith("postcopy"):
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "postcopy-ram", "state": True}])
            q.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        if kind.startswith("postcopy"):
            q.cmd("migrate-start-postcopy")
        throttle = 0.0
        deadline = time.monotonic() + QEMU_TIMEOUT
        while True:
            info = q.cmd("query-migrate")
            throttle = max(throttle, float(info.get("cpu-throttle-percentage", 0)))  # type: ignore[union-attr]
            status = info.get("status")  # type: ignore[union-attr]
            if status == "completed":
                return {"vmm_downtime": info["downtime"] / 1e3, "throttle": throttle}  # type: ignore[index]
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {status}")
            if time.monotonic() > deadline:
                q.cmd("migrate_cancel")
                raise TimeoutError(f"did not complete in {QEMU_TIMEOUT:.0f} s")
            time.sleep(0.002)


def load_key_hex(path: str) -> str:
    from pyhyve.migration.security import load_key
    key = load_key(path)
    assert key is not None
    return key.hex()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


Result = dict[str, float]


def rss_mib(vm: Vm) -> float:
    """The VMM process's resident memory (guest RAM it holds, page cache it maps, its own)."""
    with open(f"/proc/{vm.proc.pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def floor_and_snapshots(side: Pyhyve | Qemu, work: str) -> Result:
    """Boot (floor), checkpoint, suspend, then restore from the suspend's files."""
    out: Result = {}
    vm = side.boot("a")
    try:
        out["boot_first_pass"] = vm.con.wait(1) - vm.t_start
        steady = out["steady_pass"] = steady_pass(vm.con)
        out["boot_rss"] = rss_mib(vm)
        time.sleep(1.0)  # an undisturbed second to compare the window with
        t0 = time.monotonic()
        side.checkpoint(vm, os.path.join(work, f"{side.label}-ck"))
        t1 = time.monotonic()
        time.sleep(AFTER)
        out["checkpoint_stall"], out["checkpoint_lost"] = stall(vm.con.passes, t0, t1 + AFTER)
        out["checkpoint_cmd"] = t1 - t0
        snap = os.path.join(work, f"{side.label}-sus")
        t0 = time.monotonic()
        side.suspend(vm, snap)
        out["suspend"] = time.monotonic() - t0
    finally:
        vm.close()
    for eager in ((False, True) if isinstance(side, Pyhyve) else (False,)):
        tag = "restore_eager" if eager else "restore"
        r = side.restore("r", snap, eager)
        try:
            first = r.con.wait(1)
            second = r.con.wait(2)
            r.con.wait(8)
            out[f"{tag}_rss"] = rss_mib(r)
            no_restart(r.con)
            st = at_steady(r.con.passes, steady)
            out[f"{tag}_first_b"] = first - r.t_start
            out[f"{tag}_full_pass"] = second - r.t_start
            out[f"{tag}_steady"] = (st - r.t_start) if st is not None else float("nan")
        finally:
            r.close()
    return out


def migration(side: Pyhyve | Qemu, kind: str) -> Result:
    port = free_port()
    dst = side.listen("dst", port, kind)
    src = side.boot("src")
    try:
        steady_pass(src.con)  # warmed up, then an undisturbed second before the command
        time.sleep(1.0)
        t0 = time.monotonic()
        try:
            vmm = side.migrate(src, port, kind)
        except TimeoutError:  # did not finish: infinitely slow, not left out
            return {"stall": INF, "lost": INF, "total": INF, "dnf": 1.0}
        t1 = time.monotonic()
        dst.con.wait(3, timeout=60)  # the destination guest makes passes, or the run fails
        time.sleep(max(0.0, t1 + AFTER - time.monotonic()))
        no_restart(dst.con)
        passes = sorted(src.con.passes + dst.con.passes)
        gap, lost = stall(passes, t0, t1 + AFTER)
        return {"stall": gap, "lost": lost, "total": t1 - t0, **vmm}
    finally:
        src.close()
        dst.close()


KINDS = {  # migration settings compared, and how each side runs them
    "defaults": "pyhyve 5 ms, auto-converge, compress auto; QEMU 128 MiB/s, 300 ms, no "
                "auto-converge",
    "matched": "both: unlimited bandwidth, 300 ms target, auto-converge, no compression",
    "target": "pyhyve at its defaults but QEMU's 300 ms target (compression auto); QEMU as "
              "in matched",
    "postcopy": "both post-copy from the start: pyhyve --postcopy, QEMU postcopy-ram + "
                "migrate-start-postcopy at once; unlimited bandwidth, no compression",
    "postcopy-defaults": "post-copy from the start, pyhyve at its defaults (compression "
                         "auto); QEMU as in postcopy (7.2 cannot compress post-copy: no "
                         "multifd with postcopy-ram)",
    "compressed": "pre-copy, both: unlimited bandwidth, 300 ms target, auto-converge, zstd "
                  "(QEMU: multifd, 2 channels, multifd-compression zstd)",
}
ERRORS: list[str] = []
LOADING_MS = 0.0  # --loading-set: pyhyve's suspend records a loading set over this long


def attempt(run: Callable[[], Result]) -> Result:
    """One run; a failure is recorded (and printed at the end), not fatal to the rest."""
    try:
        return run()
    except Exception as e:  # a bench run that failed is a finding, reported as such
        ERRORS.append(f"{type(e).__name__}: {e}")
        return {"error": 1.0}


def med(runs: list[Result], key: str) -> float | None:
    """Median over the runs that measured `key` (a run that did not finish counts as
    infinite); None unless most runs measured it."""
    vals = [r[key] for r in runs if key in r and r[key] == r[key]]
    return statistics.median(vals) if vals and len(vals) * 2 > len(runs) else None


def num(x: float | None, fmt: str = "{:.0f}") -> str:
    return "—" if x is None else "DNF" if x == INF else fmt.format(x)


def ms(x: float | None) -> str:
    if x is None:
        return "—"
    if x == INF:
        return "DNF"
    v = x * 1e3
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b or INF in (a, b):
        return "—"
    return f"{a / b:.2f}x"


def run_ws(ws: int, runs: int, kernel: str, qemu: str, only: set[str],
           cold: int = 0) -> list[list[str]]:
    snap: dict[str, list[Result]] = {"pyhyve": [], "QEMU": []}
    mig: dict[tuple[str, str], list[Result]] = {(s, k): [] for s in ("pyhyve", "QEMU")
                                                for k in KINDS}
    for _ in range(runs):
        for label in ("pyhyve", "QEMU"):
            work = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR"))
            try:
                cmdline = f"ws={ws}M" + (f" ro={cold}M roevery=0" if cold else "")
                side = (Pyhyve(kernel, ws, work, cmdline) if label == "pyhyve"
                        else Qemu(qemu, kernel, ws, work, cmdline))
                if "snapshot" in only:
                    snap[label].append(attempt(partial(floor_and_snapshots, side, work)))
                if "migration" in only:
                    for kind in KINDS:
                        mig[(label, kind)].append(attempt(partial(migration, side, kind)))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    rows: list[list[str]] = []
    p, q = snap["pyhyve"], snap["QEMU"]

    def row(what: str, pv: float | None, qv: float | None, note: str = "") -> None:
        label = f"{ws} MiB" + (f" + {cold} MiB cold" if cold else "")
        rows.append([label if not rows else "", what, ms(pv), ms(qv), ratio(pv, qv), note])

    if "snapshot" in only:
        row("floor: boot to first pass", med(p, "boot_first_pass"), med(q, "boot_first_pass"))
        row("floor: steady pass time", med(p, "steady_pass"), med(q, "steady_pass"))
        for k, what in (("first_b", "first B"), ("full_pass", "first full pass"),
                        ("steady", "steady speed")):
            row(f"restore --lazy: start to {what}", med(p, f"restore_{k}"),
                med(q, f"restore_{k}"))
            row(f"restore --eager: start to {what}", med(p, f"restore_eager_{k}"),
                med(q, f"restore_{k}"), "pyhyve's default")
        rows.append(["", "memory after boot (MiB RSS)", num(med(p, "boot_rss")),
                     num(med(q, "boot_rss")), ratio(med(p, "boot_rss"), med(q, "boot_rss")),
                     "the VMM's own + the guest's"])
        for tag, what in (("restore", "--lazy"), ("restore_eager", "--eager")):
            rows.append(["", f"restore {what}: memory after 8 passes (MiB RSS)",
                         num(med(p, f"{tag}_rss")), num(med(q, "restore_rss")),
                         ratio(med(p, f"{tag}_rss"), med(q, "restore_rss")), ""])
        row("checkpoint: longest guest silence", med(p, "checkpoint_stall"),
            med(q, "checkpoint_stall"), "QEMU: migrate to file + cont, 10G")
        rows.append(["", "checkpoint: passes lost", num(med(p, "checkpoint_lost")),
                     num(med(q, "checkpoint_lost")), "", "vs the second before"])
        row("suspend: command to files synced", med(p, "suspend"), med(q, "suspend"),
            "fsync on both")
    if "migration" in only:
        for kind in KINDS:
            mp, mq = mig[("pyhyve", kind)], mig[("QEMU", kind)]
            setting = KINDS[kind]
            dnf = sum("dnf" in r for r in mq) + sum("dnf" in r for r in mp)
            row(f"migration ({kind}): longest guest silence", med(mp, "stall"), med(mq, "stall"),
                setting + (f"; {dnf} run(s) did not finish in {QEMU_TIMEOUT:.0f} s" if dnf
                           else ""))
            rows.append(["", f"migration ({kind}): passes lost", num(med(mp, "lost")),
                         num(med(mq, "lost")), "", "vs the second before"])
            row(f"migration ({kind}): total", med(mp, "total"), med(mq, "total"))
            rows.append(["", f"migration ({kind}): max throttle",
                         num(med(mp, "throttle"), "{:.0f}%"), num(med(mq, "throttle"), "{:.0f}%"),
                         "", "share of guest CPU taken"])
            row(f"migration ({kind}): downtime, VMM-internal", med(mp, "vmm_downtime"),
                med(mq, "vmm_downtime"), "each VMM's own figure")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ws", default="0,64,512", help="working sets in MiB")
    ap.add_argument("--only", default="snapshot,migration")
    ap.add_argument("--cold", type=int, default=0,
                    help="MiB of data the guest writes once and never touches again, "
                         "after its working set (the loading set leaves it in the file)")
    ap.add_argument("--loading-set", type=float, default=0.0, metavar="MS",
                    help="pyhyve's suspend records a loading set over MS ms (its restores "
                         "then copy in only that; the suspend row includes the window)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help="migration settings to compare (" + ", ".join(KINDS) + ")")
    args = ap.parse_args()
    global LOADING_MS
    LOADING_MS = args.loading_set
    for k in set(KINDS) - set(args.kinds.split(",")):
        del KINDS[k]
    kernel = guestkit.build()["ab"]
    qemu = ensure_qemu()
    warm_memory()
    rows: list[list[str]] = []
    for ws in (int(x) for x in args.ws.split(",")):
        rows += run_ws(ws, args.runs, kernel, qemu, set(args.only.split(",")), args.cold)
    print(table(f"what the guest sees, 1 GiB A-B guest, median of {args.runs} (ms) — "
                f"{qemu_version(qemu)}, {time.strftime('%Y-%m-%d')}",
                ["ws", "what", "pyhyve", "QEMU", "pyhyve/QEMU", "note"], rows))
    for e in ERRORS:
        print(f"failed run: {e}")


if __name__ == "__main__":
    main()
