"""Shared by the benchmarks: QEMU 7.2 as the peer, medians, a table with ratios."""

from __future__ import annotations

import compileall
import os
import shutil
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYHYVE = os.path.join(os.path.dirname(sys.executable), "pyhyve")
PYHYVECTL = os.path.join(os.path.dirname(sys.executable), "pyhyvectl")
QEMU_CPU = "host,-arch-capabilities"  # plain `host` fails on MSR 0x10a on kvm_pvm

# pyhyve's bytecode, as an installed package has it: with PYTHONDONTWRITEBYTECODE set (as
# here) a module edited since scripts/setup.sh would be compiled again by every VMM start
compileall.compile_dir(os.path.join(REPO, "src"), quiet=1)


def ensure_qemu() -> str:
    """qemu-system-x86_64 (Debian's QEMU 7.2), installed with apt-get when missing."""
    path = shutil.which("qemu-system-x86_64")
    if path:
        return path
    print("bench: installing qemu-system-x86 with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    path = shutil.which("qemu-system-x86_64")
    if not path:
        raise SystemExit("bench: qemu-system-x86_64 is still missing after apt-get")
    return path


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def qemu_args(qemu: str, kernel: str, cmdline: str, memory: str = "1G") -> list[str]:
    return [qemu, "-M", "microvm,isa-serial=on,rtc=off", "-enable-kvm", "-cpu", QEMU_CPU,
            "-m", memory, "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-kernel", kernel, "-append", cmdline]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [title, line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def warm_memory() -> None:
    """Touch and free 6 GiB once: on these hosts the first touch of machine memory is slow
    (~0.4 GB/s), whoever pays it; this keeps that cost out of both sides' numbers."""
    import numpy as np
    a = np.ones(6 << 30, dtype=np.uint8)
    del a
