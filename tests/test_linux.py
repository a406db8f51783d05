"""The Linux lane (guests/linux, docs/linux.md): a small Linux built from Debian's sources
boots to a shell, and is suspended, restored, checkpointed, cloned, live-migrated between
two network namespaces and powered down through ACPI, with its memory, clocks, console
and disk intact.

Each machine (1 vCPU found through the MP table; 2 vCPUs through ACPI's MADT, with a
virtio disk, NIC, console, rng and vsock, each driven by Linux's own drivers) boots once
per run and is suspended at its ready marker: the booted
snapshot every other test starts from (what `guests/linux` offers users as the fast way to
a shell). The workload's ticks prove continuity (pyhyve.linuxguest.check_ticks).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyhyve import linuxguest
from pyhyve.description import default_description, with_virtio
from pyhyve.linuxguest import READY, SumChain, check_disk_records, check_ticks, ticks
from pyhyve.snapshot.restore import open_snapshot, restore
from pyhyve.snapshot.save import save
from pyhyve.vm import VirtualMachine, VmConfig

from conftest import CaptureConsole, cli, in_ns, wait_file, wait_socket

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

MB = 1 << 20
MEMORY = 128 * MB
BLOCKS = 64
BOOT_TIMEOUT = 300           # a cold boot takes 30-40 s here; CI hosts are shared
VSOCK_PORT = 5000            # the host port the workload's vsock rounds connect to
RNG_LINE = re.compile(rb"((?: [0-9a-f]{2}){16})\r?\n")  # od -An -tx1 -N16


class VsockEcho:
    """The host service behind the guest's vsock rounds (the device connects a guest's
    stream to CID 2 port P to the UNIX socket UDS_P): echoes each line back."""

    def __init__(self, uds: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(f"{uds}_{VSOCK_PORT}")
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                data = b""
                try:
                    while not data.endswith(b"\n") and (chunk := c.recv(64)):
                        data += chunk
                    c.sendall(data)
                except OSError:
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class TimedConsole(CaptureConsole):
    """Guest output with the host's wall clock at each write (for the guest-clock check)."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[int, float]] = []

    def write(self, data: bytes) -> None:
        with self.cond:
            self.stamps.append((len(self.buf) + len(data), time.time()))
        super().write(data)

    def host_time_at(self, offset: int) -> float:
        return next(t for end, t in self.stamps if end > offset)

    def type(self, line: str) -> None:
        assert self.on_input is not None
        self.on_input(line.encode() + b"\n")


@pytest.fixture(scope="session")
def lane() -> dict[str, str]:
    return linuxguest.build()


@dataclass(frozen=True)
class Booted:
    snapshot: str
    output: bytes
    cpus: int
    disk: str | None          # the image as of the snapshot (copy it before writing)


def irq_kinds(con: TimedConsole) -> tuple[int, int]:
    """How many of the guest's interrupt lines are virtio INTx routed level-triggered
    (IO-APIC fasteoi: routing found in the MP table or _PRT; without it Linux falls back
    to an edge-triggered guess), and how many are virtio MSI-X vectors."""
    con.type("echo IRQS $(grep -c -E 'fasteoi +virtio' /proc/interrupts) "
             "$(grep -c -E 'MSI.*virtio' /proc/interrupts) $((40+2))-DONE")
    start = con.wait_for("42-DONE", timeout=60)
    m = re.search(rb"IRQS (\d+) (\d+) 42-DONE", bytes(con.buf[max(0, start - 40):start + 7]))
    assert m, bytes(con.buf[-300:])
    return int(m[1]), int(m[2])


def boot(lane: dict[str, str], where: Path, cpus: int, acpi: bool, disk: bool,
         nomsi: bool = False) -> Booted:
    """With `disk`, the machine has every virtio device: a disk, a NIC (loop), a console
    (the workload copies its lines there), an rng and a vsock (a round every tick).
    `nomsi`: Linux may not use MSI-X (`pci=nomsi`), so every device interrupts by INTx."""
    image = None
    disks = []
    if disk:
        image = str(where / "disk.img")
        with open(image, "wb") as f:
            f.truncate(BLOCKS * 512 * 16)
        disks = [image]
    devices = devices_at(where) if disk else {}
    desc = with_virtio(default_description("null"), disks, disk,   # acpi2 has the devices
                       nets=["loop"] if disk else None,
                       vconsoles=[devices["vconsole0"]] if disk else None,
                       vsocks=[devices["vsock0"]] if disk else None)
    extra = (f"pyhyve.vsock={VSOCK_PORT}" if disk else "") + (" pci=nomsi" if nomsi else "")
    echo = VsockEcho(str(where / "v.sock")) if disk else None
    con = TimedConsole()
    vm = VirtualMachine.create(VmConfig(f"lx{cpus}", MEMORY, cpus, kernel=lane["vmlinux"],
                                        initrd=lane["initramfs"],
                                        cmdline=linuxguest.cmdline(acpi, extra),
                                        description=desc), console=con)
    try:
        vm.start()
        con.wait_for(READY, timeout=BOOT_TIMEOUT)
        con.wait_for("tick 2 ", timeout=60)
        ready = con.text[con.text.index(READY):].split("\n")[0]
        assert f"cpus={cpus}" in ready and ("disk=vda" in ready) == disk, ready
        assert ("net=eth0" in ready) == disk, ready
        assert ("hvc=hvc0 rng=hwrng" in ready) == disk, ready
        con.type("echo hi-$((6*7))")
        con.wait_for("hi-42", timeout=60)
        if disk:
            level, msix = irq_kinds(con)
            assert (level, msix > 0) == ((5, False) if nomsi else (0, True)), (level, msix)
            rng_reads(con)
            wait_ticks(con, 3)
            assert vsock_rounds(bytes(con.buf))[-1] > 0, con.text[-300:]
            hvc_ticks(where / "hvc.log", 3)
        base = str(where / "booted")
        save(vm, base, "suspend")
    finally:
        vm.close()
        if echo is not None:
            echo.close()
    check_ticks(bytes(con.buf))
    if disk:
        hvc_continues(where / "hvc.log", bytes(con.buf))
    return Booted(base, bytes(con.buf), cpus, image)


def devices_at(where: Path) -> dict[str, str]:
    """Backends of the console and vsock of a machine whose files live in `where`."""
    return {"vconsole0": f"file:{where / 'hvc.log'}",
            "vsock0": f"cid=3,uds={where / 'v.sock'}"}


def rng_reads(con: TimedConsole) -> None:
    """The guest reads 16 bytes from /dev/hwrng (virtio-rng through Linux's driver)."""
    start = len(con.buf)
    con.type("od -An -tx1 -N16 /dev/hwrng")
    deadline = time.monotonic() + 60
    while not (m := RNG_LINE.search(bytes(con.buf), start)):
        assert time.monotonic() < deadline, con.text[-300:]
        time.sleep(0.05)
    assert m[1].replace(b" ", b"") != b"0" * 32


def vsock_rounds(output: bytes) -> list[int]:
    return [t.vsock for t in ticks(output) if t.vsock is not None]


def hvc_ticks(path: Path, n: int, timeout: float = 60) -> None:
    """Wait until hvc0's copy has `n` ticks: it trails the serial console by up to a tick,
    the write that follows the console's on a loaded host."""
    deadline = time.monotonic() + timeout
    while len(ticks(path.read_bytes())) < n:
        assert time.monotonic() < deadline, path.read_bytes()[-300:]
        time.sleep(0.05)


def hvc_continues(path: Path, console: bytes) -> None:
    """The lines the workload copied to hvc0 (virtio-console) are its console's ticks: no
    gap, no repeat, and the last ones all there."""
    seqs = [t.seq for t in ticks(path.read_bytes())]
    assert len(seqs) >= 3 and seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert seqs[-1] >= ticks(console)[-1].seq - 1, (seqs[-3:], ticks(console)[-1].seq)


@pytest.fixture(scope="session")
def mp1(lane, tmp_path_factory) -> Booted:
    """1 vCPU, `acpi=off` and `pci=nomsi`: Linux finds the machine, and every virtio
    device's INTx line, through the MP table."""
    return boot(lane, tmp_path_factory.mktemp("mp1"), 1, False, True, nomsi=True)


@pytest.fixture(scope="session")
def acpi2(lane, tmp_path_factory) -> Booted:
    """2 vCPUs through ACPI (MADT), every virtio device, interrupting by MSI-X."""
    return boot(lane, tmp_path_factory.mktemp("acpi2"), 2, True, True)


@pytest.fixture(params=["mp1", "acpi2"])
def booted(request) -> Booted:
    return request.getfixturevalue(request.param)


def own_disk(b: Booted, tmp_path: Path) -> dict[str, str]:
    """Bindings for a restore of `b`: a copy of its disk as of the snapshot, the NIC's
    loop backend, and a console file and vsock socket in `tmp_path`."""
    if b.disk is None:
        return {}
    mine = str(tmp_path / "disk.img")
    shutil.copy(b.disk, mine)
    return {"disk0": mine, "net0": "loop", **devices_at(tmp_path)}


def vsock_pass(output: bytes) -> None:
    """With a vsock, the workload's rounds to the host keep coming back (new connections
    after the transport reset a restore or migration sends)."""
    rounds = vsock_rounds(output)
    if rounds:
        assert rounds[-1] > rounds[0], rounds


def frames_pass(output: bytes) -> None:
    """With a NIC, the frames the workload sends keep coming back (loop backend)."""
    ts = [t for t in ticks(output) if t.net is not None]
    if ts:
        assert ts[-1].net > ts[0].net, [t.net for t in ts]


def resumed(path: str, bindings: dict[str, str], **kw) -> tuple[VirtualMachine, TimedConsole]:
    snap = open_snapshot(path)
    con = TimedConsole()
    try:
        vm = restore(snap, console=con, bindings=bindings, **kw)
    finally:
        snap.close()
    vm.start()
    return vm, con


def wait_ticks(con: TimedConsole, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(ticks(bytes(con.buf))) < n:
        assert b"CORRUPT" not in con.buf and b"Kernel panic" not in con.buf, con.text[-500:]
        assert time.monotonic() < deadline, f"{n} ticks not seen in {timeout}s: {con.text[-500:]}"
        time.sleep(0.05)


def shell_answers(con: TimedConsole) -> None:
    start = len(con.buf)
    con.type("echo ok-$((40+2))")
    con.wait_for("ok-42", timeout=60, start=start)


def wall_clock_ok(stamped: list[tuple[int, float]], output: bytes, skip: int = 1) -> None:
    """The guest's wall clock is within a second of the host's: over the ticks (all but
    the first `skip`, which may carry times read before a save), no tick is a second
    ahead of the host's time at its arrival, and at least one arrived within a second of
    its time (arrival comes later than the print: console latency on a loaded host only
    makes the guest look behind, so the closest one is the fair measure)."""
    ts = ticks(output)[skip:]
    assert ts, output[-300:]
    arrival = [next(t for end, t in stamped if end > tk.at) * 1000 for tk in ts]
    ahead = max(tk.wall_ms - a for tk, a in zip(ts, arrival, strict=True))
    behind = min(a - tk.wall_ms for tk, a in zip(ts, arrival, strict=True))
    assert ahead < 1000 and behind < 1000, (ahead, behind)


def test_suspend_and_restore_continue(booted: Booted, tmp_path: Path) -> None:
    binds = own_disk(booted, tmp_path)
    echo = VsockEcho(str(tmp_path / "v.sock")) if binds else None
    vm, con = resumed(booted.snapshot, binds)
    try:
        wait_ticks(con, 2)
        shell_answers(con)
        save(vm, str(tmp_path / "s"), "suspend")
    finally:
        vm.close()
    time.sleep(2.0)                      # time away, which the guest's clocks must see
    vm2, con2 = resumed(str(tmp_path / "s"), binds)
    try:
        wait_ticks(con2, 3)
        shell_answers(con2)
        vm2.pause()
        chain = SumChain()
        before = check_ticks(booted.output + bytes(con.buf), chain)
        after = check_ticks(booted.output + bytes(con.buf) + bytes(con2.buf), chain)
        assert len(after) >= len(before) + 3
        # the monotonic clock jumped over the 2 s away (at the first or second tick after
        # the restore: a tick may have read its clock just before the save)
        around = after[len(before) - 1:len(before) + 2]
        steps = [b.up_ms - a.up_ms for a, b in itertools.pairwise(around)]
        assert max(steps) >= 2000, f"the guest's monotonic clock never jumped: {steps}"
        # its wall clock within a second of the host's (RTC at boot, advanced kvmclock
        # and TSC after the restore)
        wall_clock_ok(con2.stamps, bytes(con2.buf))
        frames_pass(bytes(con2.buf))
        if booted.disk is not None:
            top = check_disk_records(binds["disk0"], BLOCKS)
            assert top >= after[-1].seq - 1   # every tick's record is on disk (fsync)
            vsock_pass(bytes(con2.buf))
            hvc_continues(tmp_path / "hvc.log", bytes(con2.buf))
            vm2.resume()
            rng_reads(con2)
    finally:
        vm2.close()
        if echo is not None:
            echo.close()


def test_checkpoint_and_continue(booted: Booted, tmp_path: Path) -> None:
    binds = own_disk(booted, tmp_path)
    vm, con = resumed(booted.snapshot, binds)
    at_checkpoint = dict(binds)
    try:
        wait_ticks(con, 2)
        if binds:
            # a checkpoint does not copy disks (the guest goes on writing them): pause,
            # checkpoint, copy the image, resume -- what a user does today (devices.md)
            vm.pause()
            save(vm, str(tmp_path / "c"), "checkpoint")
            at_checkpoint["disk0"] = str(tmp_path / "disk-at-checkpoint.img")
            shutil.copy(binds["disk0"], at_checkpoint["disk0"])
            vm.resume()
        else:
            save(vm, str(tmp_path / "c"), "checkpoint")
        n = len(ticks(bytes(con.buf)))
        wait_ticks(con, n + 2)               # it kept running
        shell_answers(con)
        check_ticks(booted.output + bytes(con.buf))
    finally:
        vm.close()
    vm2, con2 = resumed(str(tmp_path / "c"), at_checkpoint)
    try:
        wait_ticks(con2, 3)
        vm2.pause()
        wall_clock_ok(con2.stamps, bytes(con2.buf))
        mine = ticks(bytes(con2.buf))
        # the checkpoint's guest goes on from the moment of the checkpoint: its first
        # tick follows one the running guest printed before it, with the same history
        first = mine[0].seq
        earlier = [t for t in ticks(booted.output + bytes(con.buf)) if t.seq < first]
        joined = b"".join(f"tick {t.seq} pass {t.passes} sum {t.sum:x} up {t.up_ms} wall "
                          f"{t.wall_ms}\n".encode() for t in earlier)
        check_ticks(joined + bytes(con2.buf))
    finally:
        vm2.close()


def test_clones_run_side_by_side(acpi2: Booted, tmp_path: Path) -> None:
    base = Path(acpi2.disk or "").read_bytes()
    clones = []
    try:
        for i in range(2):
            (tmp_path / str(i)).mkdir()
            clones.append(resumed(acpi2.snapshot, {"disk0": acpi2.disk or "", "net0": "loop",
                                                   **devices_at(tmp_path / str(i))},
                                  clone=True, clone_dir=str(tmp_path / str(i))))
        ids = set()
        for vm, con in clones:
            wait_ticks(con, 3)
            shell_answers(con)
            check_ticks(acpi2.output + bytes(con.buf))
            ids.add(vm.status()["generation_id"])
        assert len(ids) == 2
        for vm, _ in clones:  # (writes a clone's guest has in flight land, or not, here)
            vm.pause()
        assert Path(acpi2.disk or "").read_bytes() == base  # the clones wrote their own
    finally:
        for vm, _ in clones:
            vm.close()


def test_nmi_then_acpi_power_button_shuts_down_cleanly(acpi2: Booted, tmp_path: Path,
                                                        rundir: str) -> None:
    """`pyhyvectl --nmi` reaches each vCPU's kernel, which carries on (on kvm_pvm only with
    `nofsgsbase`: the NMI entry's `lsl` stopped the VM); then the power button."""
    binds = own_disk(acpi2, tmp_path)
    disk = binds["disk0"]
    log, err = tmp_path / "con.log", tmp_path / "vmm.err"
    p = subprocess_run("pyhyve", "run", "pd", "-r", acpi2.snapshot,
                       *(f"--bind={k}={v}" for k, v in binds.items()),
                       "--console", f"file:{log}", stderr=err)
    try:
        wait_socket(rundir, "pd")
        wait_file(log, "tick ", timeout=60)
        r = cli("pyhyvectl", "--vm", "pd", "--nmi")
        assert r.returncode == 0 and "NMI sent to 2 vCPU(s)" in r.stdout, r.stderr
        deadline = time.monotonic() + 60

        def nmis_seen(n: int) -> None:
            while len(re.findall(rb"NMI received for unknown reason \w+ on CPU \d",
                                 log.read_bytes())) < n:
                assert p.poll() is None and time.monotonic() < deadline, \
                    (err.read_text()[-500:], log.read_bytes()[-500:])
                time.sleep(0.1)

        nmis_seen(acpi2.cpus)
        assert cli("pyhyvectl", "--vm", "pd", "--pause").returncode == 0
        r = cli("pyhyvectl", "--vm", "pd", "--nmi")  # paused: queued, delivered on resume
        assert r.returncode == 0 and "NMI queued for 2 vCPU(s)" in r.stdout, r.stderr
        assert cli("pyhyvectl", "--vm", "pd", "--resume").returncode == 0
        nmis_seen(2 * acpi2.cpus)
        seen = ticks(log.read_bytes())[-1].seq
        while ticks(log.read_bytes())[-1].seq < seen + 2:  # and goes on working
            assert p.poll() is None and time.monotonic() < deadline, err.read_text()[-500:]
            time.sleep(0.1)
        r = cli("pyhyvectl", "--vm", "pd", "--powerdown", "--timeout", "60")
        assert r.returncode == 0, r.stderr
        assert "power button pressed" in r.stdout and "the VM has exited" in r.stdout
        assert p.wait(10) == 0                       # a clean power-off is a 0 exit
        out = log.read_bytes()
        assert b"PYHYVE-POWERDOWN" in out and b"reboot: Power down" in out
        check_ticks(acpi2.output + out)
        assert check_disk_records(disk, BLOCKS) >= ticks(out)[-1].seq
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def subprocess_run(*args: str, stderr: Path | None = None):
    from conftest import spawn

    return spawn(*args, stdout=open(os.devnull, "w"),
                 stderr=open(stderr or os.devnull, "w"))


def console_client(path: str, timeout: float = 20) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.settimeout(30)
            return s
        except OSError:
            s.close()
            assert time.monotonic() < deadline, f"no console socket at {path}"
            time.sleep(0.05)


@pytest.mark.parametrize("name,postcopy", [("mp1", False), ("acpi2", False), ("acpi2", True)],
                         ids=["mp1", "acpi2", "acpi2-postcopy"])
def test_live_migration_between_namespaces(name, postcopy, request, hosts, keyfile, tmp_path,
                                           rundir) -> None:
    """Stock Linux driving virtio disk, net, console, rng and vsock moves to another
    "host"; with post-copy its drivers and our devices run on the destination while its
    memory is still arriving."""
    b: Booted = request.getfixturevalue(name)
    (ns_a, _), (ns_b, ip_b) = hosts["a"], hosts["b"]
    binds = own_disk(b, tmp_path)            # one image, shared by both "hosts"
    bind = [f"--bind=disk0={binds['disk0']}", "--bind=net0=loop"] if binds else []
    sides: dict[str, list[str]] = {"src": [], "dst": []}
    echoes = []
    for side in sides if binds else ():  # each host: its own console file and vsock socket
        (tmp_path / side).mkdir()
        sides[side] = [f"--bind={k}={v}" for k, v in devices_at(tmp_path / side).items()]
        echoes.append(VsockEcho(str(tmp_path / side / "v.sock")))
    src_log, dst_sock = tmp_path / "src.log", str(tmp_path / "dst.sock")
    src = in_ns(ns_a, "pyhyve", "run", "src", "-r", b.snapshot, *bind, *sides["src"],
                "--console", f"file:{src_log}")
    dst = in_ns(ns_b, "pyhyve", "run", "dst", "-R", f"{ip_b},7798", "--key-file", keyfile,
                *bind, *sides["dst"], "--console", f"unix:{dst_sock}")
    try:
        wait_socket(rundir, "src")
        wait_file(src_log, "tick ", timeout=60)
        r = cli("pyhyvectl", "--vm", "src", "--migrate-live", f"{ip_b}:7798", "--key-file",
                keyfile, *(["--postcopy"] if postcopy else []), timeout=300)
        assert r.returncode == 0, r.stderr
        if postcopy:
            assert "post-copy pages to go 0" in r.stdout, r.stdout
        assert src.wait(30) == 0
        # the destination's console socket exists once the guest arrived; it keeps what
        # the guest printed before a client connects
        client = console_client(dst_sock)
        out, stamps = b"", []
        deadline = time.monotonic() + 60

        def more() -> bytes:
            assert time.monotonic() < deadline, out[-500:]
            chunk = client.recv(65536)
            stamps.append((len(out) + len(chunk), time.time()))
            return chunk
        while len(ticks(out)) < 4:
            out += more()
        client.sendall(b"echo mig-$((40+2))\n")      # the console works both ways
        while b"mig-42" not in out:
            out += more()
        # the wall clock stays right across the move (ticks printed before this client
        # connected arrive late and only look behind)
        wall_clock_ok(stamps, out)
        frames_pass(out)
        vsock_pass(out)
        cli("pyhyvectl", "--vm", "dst", "--pause")
        check_ticks(b.output + src_log.read_bytes() + out)
        if binds:
            assert check_disk_records(binds["disk0"], BLOCKS) >= ticks(out)[-1].seq - 1
            hvc = tmp_path / "hvc.log"   # the console port's stream, both hosts' parts
            hvc.write_bytes((tmp_path / "src" / "hvc.log").read_bytes() +
                            (tmp_path / "dst" / "hvc.log").read_bytes())
            hvc_continues(hvc, out)
        cli("pyhyvectl", "--vm", "dst", "--destroy")
        client.close()
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
                p.wait()
        for e in echoes:
            e.close()
