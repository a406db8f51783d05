"""Host side of the Linux lane (guests/linux, docs/linux.md): build the kernel and
initramfs, the kernel command line for this host, and checks of the workload's output.

The workload prints `tick SEQ pass P sum C up MONO_MS wall REAL_MS [disk D] [net N]` once
a second (guests/linux/workload.c); `check_ticks` proves from those lines that no guest time
was lost or replayed, memory survived (the guest checks its buffer; C chains every pass),
the monotonic clock never went back and the wall clock stayed near the host's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

from .errors import PyhyveError
from .guestkit import REPO
from .kvm.api import backend_is_pvm

LANE_DIR = os.path.join(REPO, "guests", "linux")
READY = "PYHYVE-READY"
MASK64 = (1 << 64) - 1
# The command line every lane boot uses; quiet keeps the emulated 8250 writes few.
BASE_CMDLINE = "console=ttyS0 nokaslr no_timer_check mitigations=off quiet"
# kvm_pvm only (docs/linux.md): CPUID leaves 1 and 7 are the host's whatever the VMM says,
# and the host cannot emulate xrstor, popcnt, clac or lsl at CPL0 (with FSGSBASE, every NMI
# entry reads the CPU number with lsl: an NMI, an RCU stall's backtrace included, killed it)
PVM_CMDLINE = "clearcpuid=smap,xsave,popcnt tsc=reliable nofsgsbase"
TICK = re.compile(rb"tick (\d+) pass (\d+) sum ([0-9a-f]+) up (\d+) wall (\d+)"
                  rb"(?: disk (\d+))?(?: net (\d+))?(?: vsock (\d+))?")


class LaneError(PyhyveError, RuntimeError):
    pass


def cmdline(acpi: bool = True, extra: str = "") -> str:
    """The lane's kernel command line on this host: the kvm_pvm measures only there."""
    parts = [BASE_CMDLINE]
    if backend_is_pvm():
        parts.append(PVM_CMDLINE)
    if not acpi:
        parts.append("acpi=off")      # the MP table then describes the machine
    if extra:
        parts.append(extra)
    return " ".join(parts)


def build(timeout: float = 1800) -> dict[str, str]:
    """Kernel and initramfs paths (vmlinux, bzImage, initramfs, config, source), built or
    taken from the cache by guests/linux/build.py."""
    p = subprocess.Popen([sys.executable, os.path.join(LANE_DIR, "build.py"), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except BaseException:       # a timeout, or pytest's: no make left running on the cores
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    if p.returncode != 0:
        raise LaneError(f"the Linux lane build failed: {stderr.strip()}")
    out: dict[str, str] = json.loads(stdout)
    return out


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class SumChain:
    """C(P) = mix(C(P - 1) ^ P), C(0) = 0, computed forward and remembered."""

    def __init__(self) -> None:
        self.p, self.c = 0, 0

    def at(self, p: int) -> int:
        if p < self.p:
            self.p, self.c = 0, 0
        while self.p < p:
            self.p += 1
            self.c = _mix(self.c ^ self.p)
        return self.c


@dataclass(frozen=True)
class Tick:
    seq: int
    passes: int
    sum: int
    up_ms: int
    wall_ms: int
    disk: int | None
    net: int | None    # frames that came back so far (a virtio NIC)
    at: int            # offset of the line in the console output
    vsock: int | None = None  # vsock rounds to the host that came back so far


def ticks(output: bytes) -> list[Tick]:
    return [Tick(int(m[1]), int(m[2]), int(m[3], 16), int(m[4]), int(m[5]),
                 int(m[6]) if m[6] is not None else None,
                 int(m[7]) if m[7] is not None else None, m.start(),
                 int(m[8]) if m[8] is not None else None)
            for m in TICK.finditer(output)]


def check_ticks(output: bytes, chain: SumChain | None = None) -> list[Tick]:
    """Every tick line in `output` follows from the one before: SEQ one more, passes
    more, the pass checksum right, the monotonic clock not behind. Raises LaneError with
    the first line that does not; returns the ticks."""
    if b"CORRUPT" in output:
        i = output.index(b"CORRUPT")
        raise LaneError(output[i:i + 60].split(b"\n")[0].decode(errors="replace"))
    chain = chain or SumChain()
    ts = ticks(output)
    for prev, t in zip([None, *ts], ts, strict=False):
        if chain.at(t.passes) != t.sum:
            raise LaneError(f"tick {t.seq}: pass {t.passes} checksum {t.sum:x} is wrong "
                            f"(expected {chain.at(t.passes):x})")
        if prev is None:
            continue
        if t.seq != prev.seq + 1:
            raise LaneError(f"tick {t.seq} follows tick {prev.seq}: "
                            f"{'a gap' if t.seq > prev.seq else 'a repeat'}")
        if t.passes <= prev.passes:
            raise LaneError(f"tick {t.seq}: pass {t.passes} after pass {prev.passes}")
        if t.net is not None and prev.net is not None and t.net < prev.net:
            raise LaneError(f"tick {t.seq}: the frame count went back ({prev.net} -> {t.net})")
        if t.up_ms < prev.up_ms:
            raise LaneError(f"tick {t.seq}: monotonic clock went back "
                            f"({prev.up_ms} -> {t.up_ms} ms)")
    return ts


REC_MAGIC = 0x4C494E5552454331      # "LINUREC1"
REC_SIZE = 512


def check_disk_records(path: str, blocks: int) -> int:
    """The workload's disk records on the image at `path`: every block is either never
    written (zeros) or whole and right for its sequence number (magic, SEQ, SEQ % blocks,
    61 words derived from SEQ). Returns the highest SEQ found (0: none)."""
    with open(path, "rb") as f:
        data = f.read(blocks * REC_SIZE)
    top = 0
    for i in range(blocks):
        rec = data[i * REC_SIZE:(i + 1) * REC_SIZE]
        if len(rec) < REC_SIZE or not any(rec):
            continue
        words = [int.from_bytes(rec[w * 8:w * 8 + 8], "little") for w in range(64)]
        magic, seq, index = words[:3]
        if magic != REC_MAGIC or index != i or seq % blocks != i:
            raise LaneError(f"disk record {i}: bad header (magic {magic:#x}, seq {seq}, "
                            f"index {index})")
        bad = next((w for w in range(3, 64) if words[w] != _mix((seq * 64 + w) & MASK64)), None)
        if bad is not None:
            raise LaneError(f"disk record {i} (seq {seq}): word {bad} is wrong")
        top = max(top, seq)
    return top
