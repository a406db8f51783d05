"""virtio-blk and virtio-net throughput and latency, pyhyve against QEMU 7.2, on the kit's
device guest.

The guest (guests/virtio.c, `bench=blk`) keeps `qd` requests of `bs` bytes in flight on its
virtio-blk disk for a second, reads or writes, sequential or at random bs-aligned places in
the first 512 MiB of a 1 GiB image filled with random data, and prints "BENCH go" before
the first request and "BENCH end ops=N" after the last completion. This script times those
two lines as they reach it (the guest's clock is not trusted): throughput is ops / that
time, and at queue depth 1 the mean latency is its inverse.

Both sides bypass the host's page cache: pyhyve `--disk IMG,direct` (O_DIRECT, native AIO),
QEMU `cache=none` with `aio=threads` (its default) and `aio=native`; each row takes QEMU's
better of the two, and says which. QEMU runs the guest as `-M pc` (SeaBIOS assigns the
BARs; the guest finds its device's registers through the virtio capabilities, in whatever
BAR they are), pyhyve as its default machine. Each case runs twice (--completions): with
interrupts, the guest routes the queue's MSI-X vector to its xAPIC and sleeps in `hlt`
(kernel mode, entered through a #UD gate: guests/entry.S) until one arrives, then reaps the
used ring; polled, it spins on the used ring and asks for no interrupts
(VIRTQ_AVAIL_F_NO_INTERRUPT). On the project's hosts the interrupt path's kernel-mode
instructions are emulated (about 1 us each) for both VMMs alike; polling shows the VMM's
own per-request cost without them. Medians of --runs runs, pyhyve and QEMU interleaved.

virtio-net (`bench=net`): the guest keeps `qd` frames in flight on the transmit queue for a
second, to a tap device the script creates (pyhyve `--net tap:NAME`, QEMU `-netdev tap`
without vhost, its default), and counts the frames sent. Receive (`bench=netrx`): a small
C sender (bench/netsend.c, built here with cc) floods the tap from the host with 64-byte
frames, up to about 1.6 million a second, sleeping 20 us per batch of 32 to leave CPU time
to the VMM; the guest keeps 72 buffers posted and counts what arrives in a second. On a
2-core host the sender, the VMM and the guest's polling vCPU share two cores: both VMMs
are measured under that same contention.

    .venv/bin/python bench/devices.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from common import PYHYVE, QEMU_CPU, REPO, ensure_qemu, median, qemu_version, table

KERNEL = os.path.join(REPO, "guests", "build", "virtio.elf")
IMAGE_SIZE = 1 << 30
SPAN = 512 << 20
CASES = [  # (name, bs, qd, random, write)
    ("rand read 4 KiB", 4096, 1, True, False),
    ("rand read 4 KiB", 4096, 32, True, False),
    ("rand write 4 KiB", 4096, 1, True, True),
    ("rand write 4 KiB", 4096, 32, True, True),
    ("seq read 1 MiB", 1 << 20, 1, False, False),
    ("seq read 1 MiB", 1 << 20, 32, False, False),
    ("seq write 1 MiB", 1 << 20, 1, False, True),
    ("seq write 1 MiB", 1 << 20, 32, False, True),
]
END = re.compile(rb"BENCH end ops=(\d+) bytes=")
TAP = "pyhbench0"
NET_CASES = [("tx 64 B frames", 64, 1), ("tx 64 B frames", 64, 32),
             ("tx 1514 B frames", 1514, 32)]
RX_SIZE = 64


def make_image(work: str) -> str:
    """1 GiB of random data, written through to the disk: reads must reach the device."""
    path = os.path.join(work, "disk.img")
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(IMAGE_SIZE >> 20):
            f.write(block[i % 251:] + block[:i % 251])
        f.flush()
        os.fsync(f.fileno())
    return path


def timed_run(args: list[str], timeout: float = 60.0) -> tuple[float, int]:
    """Start a VMM, time "BENCH go" to "BENCH end" on its console: (seconds, ops)."""
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    marks: dict[str, float] = {}
    ops = [0]
    tail = bytearray()

    def read() -> None:
        assert p.stdout is not None
        buf = b""
        while chunk := os.read(p.stdout.fileno(), 65536):
            now = time.monotonic()
            buf += chunk
            tail.extend(chunk)
            del tail[:-2000]
            if "go" not in marks and b"BENCH go" in buf:
                marks["go"] = now
            if (m := END.search(buf)) and "end" not in marks:
                marks["end"], ops[0] = now, int(m[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while "end" not in marks and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if p.poll() is None:
        p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    reader.join(5)
    if "end" not in marks or "go" not in marks or b"VIRTIO ERROR" in tail:
        err = p.stderr.read().decode(errors="replace")[-500:] if p.stderr else ""
        raise SystemExit(f"bench: no result from {args[0]}: "
                         f"{tail.decode(errors='replace')[-300:]} {err}")
    return marks["end"] - marks["go"], ops[0]


def guest_cmdline(bs: int, qd: int, rand: bool, write: bool, irq: bool = False) -> str:
    return (f"bench=blk bs={bs} qd={qd} ms=1000 span={SPAN}"
            + (" rand" if rand else "") + (" write" if write else "") + (" irq" if irq else ""))


def pyhyve_args(image: str, cmdline: str) -> list[str]:
    return [PYHYVE, "run", "bench-blk", "--memory", "1G", "--kernel", KERNEL,
            "--cmdline", cmdline, "--disk", f"{image},direct"]


def qemu_args(qemu: str, image: str, cmdline: str, aio: str) -> list[str]:
    return [qemu, "-M", "pc", "-no-reboot", "-enable-kvm", "-cpu", QEMU_CPU, "-m", "1G",
            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", KERNEL, "-append", cmdline,
            "-drive", f"file={image},if=none,id=d0,format=raw,cache=none,aio={aio}",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]


def net_args(qemu: str | None, cmdline: str) -> list[str]:
    if qemu is None:
        return [PYHYVE, "run", "bench-net", "--memory", "256M", "--kernel", KERNEL,
                "--cmdline", cmdline, "--net", f"tap:{TAP}"]
    return [qemu, "-M", "pc", "-no-reboot", "-enable-kvm", "-cpu", QEMU_CPU, "-m", "256M",
            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", KERNEL, "-append", cmdline,
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,disable-legacy=on"]


def net_rows(qemu: str, runs: int) -> list[list[str]]:
    subprocess.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap"], check=False,
                   capture_output=True)
    subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
    rows = []
    try:
        for name, size, qd in NET_CASES:
            cmd = f"bench=net qd={qd} size={size} ms=1000"
            got: dict[str, list[float]] = {"pyhyve": [], "qemu": []}
            for _ in range(runs):
                for side, args in (("pyhyve", net_args(None, cmd)), ("qemu", net_args(qemu, cmd))):
                    secs, ops = timed_run(args)
                    got[side].append(ops / secs)
            p, q = median(got["pyhyve"]), median(got["qemu"])
            rows.append([name, str(qd), f"{p:.0f} frames/s", f"{q:.0f} frames/s",
                         f"{p / q:.2f}x", f"{1e6 / p:.0f} / {1e6 / q:.0f} us" if qd == 1 else "",
                         "tap"])
            print(f"bench: {name} qd{qd}: pyhyve {p:.0f}/s, QEMU {q:.0f}/s", file=sys.stderr)
        rows.append(rx_row(qemu, runs))
    finally:
        subprocess.run(["ip", "link", "del", TAP], check=False, capture_output=True)
    return rows


def netsend() -> str:
    """bench/netsend.c, built into a temporary directory."""
    out = os.path.join(tempfile.mkdtemp(prefix="pyhyve-netsend-"), "netsend")
    subprocess.run(["cc", "-O2", "-o", out, os.path.join(REPO, "bench", "netsend.c")],
                   check=True)
    return out


def rx_row(qemu: str, runs: int) -> list[str]:
    """Frames received a second while the host floods the tap (module docstring)."""
    sender = netsend()
    cmd = "bench=netrx ms=1000"
    got: dict[str, list[float]] = {"pyhyve": [], "qemu": []}
    try:
        for _ in range(runs):
            for side, args in (("pyhyve", net_args(None, cmd)), ("qemu", net_args(qemu, cmd))):
                flood = subprocess.Popen([sender, TAP, str(RX_SIZE), "30"],
                                         stdout=subprocess.DEVNULL)
                try:
                    secs, frames = timed_run(args)
                finally:
                    flood.terminate()
                    flood.wait()
                got[side].append(frames / secs)
    finally:
        shutil.rmtree(os.path.dirname(sender), ignore_errors=True)
    p, q = median(got["pyhyve"]), median(got["qemu"])
    print(f"bench: rx {RX_SIZE} B frames: pyhyve {p:.0f}/s, QEMU {q:.0f}/s", file=sys.stderr)
    return [f"rx {RX_SIZE} B frames", "72 bufs", f"{p:.0f} frames/s", f"{q:.0f} frames/s",
            f"{p / q:.2f}x", "", "tap, host flood"]


def fmt_rate(ops_s: float, bs: int) -> str:
    return f"{ops_s:.0f} IOPS" if bs < (1 << 20) else f"{ops_s * bs / 1e6:.0f} MB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=["blk", "net"], help="one device type")
    ap.add_argument("--work", default="/var/tmp", help="a directory on a disk-backed file "
                    "system (O_DIRECT); the 1 GiB image is made there and removed")
    ap.add_argument("--completions", choices=["irq", "poll", "both"], default="both",
                    help="how the guest learns of a finished request: an MSI-X interrupt "
                    "(it sleeps in hlt until one comes), polling the used ring, or both")
    a = ap.parse_args()
    if not os.path.exists(KERNEL):
        subprocess.run(["make", "-s", "-C", os.path.join(REPO, "guests")], check=True)
    qemu = ensure_qemu()
    work = tempfile.mkdtemp(prefix="pyhyve-bench-", dir=a.work)
    try:
        image = make_image(work) if a.only != "net" else ""
        rows = []
        modes = [m == "irq" for m in ("irq", "poll") if a.completions in (m, "both")]
        cases = [(c, irq) for irq in modes for c in CASES] if a.only != "net" else []
        for (name, bs, qd, rand, write), irq in cases:
            cmd = guest_cmdline(bs, qd, rand, write, irq)
            name += ", interrupts" if irq else ", polled"
            got: dict[str, list[float]] = {"pyhyve": [], "threads": [], "native": []}
            for _ in range(a.runs):
                for side, args in (("pyhyve", pyhyve_args(image, cmd)),
                                   ("threads", qemu_args(qemu, image, cmd, "threads")),
                                   ("native", qemu_args(qemu, image, cmd, "native"))):
                    secs, ops = timed_run(args)
                    got[side].append(ops / secs)
            p = median(got["pyhyve"])
            best = max(("threads", "native"), key=lambda k: median(got[k]))
            q = median(got[best])
            lat = (f"{1e6 / p:.0f} / {1e6 / q:.0f} us" if qd == 1 else "")
            rows.append([name, str(qd), fmt_rate(p, bs), fmt_rate(q, bs), f"{p / q:.2f}x",
                         lat, f"aio={best}"])
            print(f"bench: {name} qd{qd}: pyhyve {fmt_rate(p, bs)}, QEMU {fmt_rate(q, bs)}",
                  file=sys.stderr)
        if a.only != "blk":
            rows += net_rows(qemu, a.runs)
        print(table(f"virtio-blk (O_DIRECT both sides) and virtio-net (tap), medians of "
                    f"{a.runs} ({qemu_version(qemu)})",
                    ["what", "qd", "pyhyve", "QEMU", "pyhyve/QEMU", "latency (p/Q)", "QEMU"],
                    rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
