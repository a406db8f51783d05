#!/usr/bin/env python3
"""Build (or take from the cache) the Linux lane's guest: a tinyconfig kernel from Debian's
linux-source-6.1 with pyhyve's config fragment and patch series, and a small initramfs of
busybox-static plus the workload. Prints the paths as JSON.

    guests/linux/build.py [--cache DIR] [--jobs N] [--quiet]

The kernel is cached under $PYHYVE_CACHE (default /var/cache/pyhyve) keyed by a hash of
the installed source package's version, the fragment, the patches and this file's
RECIPE, so a rebuild happens only when one of them changes (about 4 minutes on 2 cores). See
docs/linux.md for each change and why.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_PKG = "linux-source-6.1"
SOURCE_TAR = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX = Path("/bin/busybox")
APT_PACKAGES = (SOURCE_PKG, "busybox-static", "flex", "bison", "bc", "libelf-dev", "gcc",
                "make", "xz-utils", "patch", "libc6-dev")
# applets the init script and a test's commands use; links in the initramfs, not
# `busybox --install` at boot (each system call is slow here)
APPLETS = ("sh", "mount", "mknod", "cat", "echo", "poweroff", "reboot", "sleep", "date", "od",
           "uptime", "ls", "dd", "sync", "nproc", "head", "grep", "true", "seq")


class BuildError(Exception):
    pass


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"linux-lane: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path | None = None, quiet: bool = False) -> None:
    out = subprocess.DEVNULL if quiet else sys.stderr
    r = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-20:])
        raise BuildError(f"{' '.join(cmd[:3])} failed ({r.returncode}):\n{tail}")


def package_version(pkg: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", pkg],
                       capture_output=True, text=True)
    parts = r.stdout.split()
    return parts[-1] if r.returncode == 0 and "installed" in parts else None


def ensure_packages(quiet: bool) -> None:
    missing = [p for p in APT_PACKAGES if package_version(p) is None]
    if not missing:
        return
    log(f"installing {' '.join(missing)}", quiet)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", *missing]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no message"])[-1]
            raise BuildError(f"{' '.join(cmd[:1] + cmd[3:5])} failed: {last}")


# bump when build_kernel() changes what it produces (the key covers the rest)
RECIPE = "1"
KEEP = 3        # cached kernels kept (the newest), so a cache does not grow without end


def kernel_key() -> str:
    h = hashlib.sha256()
    h.update(f"{SOURCE_PKG} {package_version(SOURCE_PKG)} recipe {RECIPE}\n".encode())
    for f in [HERE / "pyhyve.config", *sorted((HERE / "patches").glob("*.patch"))]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def prune(cache: Path, keep: Path) -> None:
    """Remove all but the newest KEEP kernels (and initramfs images)."""
    for pattern in ("kernel-*", "initramfs-*.cpio"):
        entries = sorted(cache.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP:]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def fragment_settings() -> dict[str, str]:
    """CONFIG_X -> value ('n' for `=n`) as the fragment asks."""
    out = {}
    for raw in (HERE / "pyhyve.config").read_text().splitlines():
        line = raw.strip()
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def check_config(config: Path) -> None:
    """Every option the fragment sets must have taken effect (Kconfig drops an option
    whose dependencies are unmet without a word)."""
    have = {}
    for line in config.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            have[k] = v
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            have[line[2:-len(" is not set")]] = "n"
    wrong = [f"{k}={v} (got {have.get(k, 'n')})" for k, v in fragment_settings().items()
             if have.get(k, "n") != v]
    if wrong:
        raise BuildError("config fragment not applied: " + ", ".join(wrong))


def build_kernel(out: Path, jobs: int, quiet: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=out.parent) as tmp:
        work = Path(tmp)
        log(f"unpacking {SOURCE_TAR.name}", quiet)
        run(["tar", "xf", str(SOURCE_TAR), "-C", str(work)], quiet=quiet)
        src = work / "linux-source-6.1"
        for p in sorted((HERE / "patches").glob("*.patch")):
            log(f"patch {p.name}", quiet)
            run(["patch", "-p1", "-s", "--no-backup-if-mismatch", "-i", str(p)], cwd=src,
                quiet=quiet)
        make = ["make", "-s", f"-j{jobs}"]
        run([*make, "tinyconfig"], cwd=src, quiet=True)
        run(["scripts/kconfig/merge_config.sh", "-m", ".config",
             str(HERE / "pyhyve.config")], cwd=src, quiet=True)
        run([*make, "olddefconfig"], cwd=src, quiet=True)
        check_config(src / ".config")
        log(f"building vmlinux and bzImage with {jobs} jobs (about 4 minutes on 2 cores)", quiet)
        run([*make, "vmlinux", "bzImage"], cwd=src, quiet=quiet)
        stage = work / "out"
        stage.mkdir()
        shutil.copy(src / "vmlinux", stage / "vmlinux")
        shutil.copy(src / "arch/x86/boot/bzImage", stage / "bzImage")
        shutil.copy(src / ".config", stage / "config")
        shutil.copy(src / "System.map", stage / "System.map")
        os.rename(stage, out)      # atomic: a cache entry is whole or absent


# --- initramfs ---------------------------------------------------------------------------

def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
                ino: int = 0) -> bytes:
    """One 'newc' (070701) record, as the kernel's initramfs unpacker reads it."""
    nb = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + nb
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def initramfs(init: bytes, workload: bytes, busybox: bytes) -> bytes:
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        entries.append((d, stat.S_IFDIR | 0o755, b"", (0, 0)))
    for name, major, minor in (("console", 5, 1), ("ttyS0", 4, 64), ("null", 1, 3)):
        entries.append((f"dev/{name}", stat.S_IFCHR | 0o600, b"", (major, minor)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox, (0, 0)))
    for a in APPLETS:
        entries.append((f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox", (0, 0)))
    entries.append(("init", stat.S_IFREG | 0o755, init, (0, 0)))
    entries.append(("workload", stat.S_IFREG | 0o755, workload, (0, 0)))
    blob = b"".join(_cpio_entry(n, m, d, r, ino=i + 1) for i, (n, m, d, r) in enumerate(entries))
    return blob + _cpio_entry("TRAILER!!!", 0)


def build_workload(out: Path) -> None:
    run(["gcc", "-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector",
         "-fno-pie", "-no-pie", "-O2", "-Wall", "-Werror", "-o", str(out),
         str(HERE / "workload.c")])


def build_initramfs(cache: Path, quiet: bool) -> Path:
    busybox = BUSYBOX.read_bytes()
    h = hashlib.sha256()
    for f in (HERE / "init", HERE / "workload.c", Path(__file__).resolve()):
        h.update(f.read_bytes())
    h.update(busybox)
    out = cache / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    log("building the initramfs", quiet)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wl = Path(tmp) / "workload"
        build_workload(wl)
        img = Path(tmp) / "initramfs.cpio"
        img.write_bytes(initramfs((HERE / "init").read_bytes(), wl.read_bytes(), busybox))
        os.rename(img, out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.environ.get("PYHYVE_CACHE", "/var/cache/pyhyve"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    cache = Path(a.cache) / "linux"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)     # one build at a time; others wait for it
            ensure_packages(a.quiet)
            for stale in cache.glob("build-*"):  # a killed build's tree
                shutil.rmtree(stale, ignore_errors=True)
            kdir = cache / f"kernel-{kernel_key()}"
            if not (kdir / "vmlinux").exists():
                shutil.rmtree(kdir, ignore_errors=True)  # a half-removed entry
                build_kernel(kdir, a.jobs, a.quiet)
            os.utime(kdir)
            rd = build_initramfs(cache, a.quiet)
            os.utime(rd)
            prune(cache, kdir)
    except (BuildError, OSError) as e:
        print(f"linux-lane: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"vmlinux": str(kdir / "vmlinux"), "bzImage": str(kdir / "bzImage"),
                      "config": str(kdir / "config"), "initramfs": str(rd),
                      "source": f"{SOURCE_PKG} {package_version(SOURCE_PKG)}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
