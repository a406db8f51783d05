"""README promises about `pyhyve run NAME -r FILE`: `--eager` copies the memory in (the
guest no longer depends on the file), lazy restore does not grow with RAM size, and
`--memory`/`--cpus` that disagree with the snapshot are refused."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import cli, spawn, suspended, wait_file, wait_socket

pytestmark = pytest.mark.kvm

MB = 1 << 20


def status(name: str) -> dict:
    p = cli("pyhyvectl", "--vm", name, "--status", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run_restored(name: str, base: str, log: str, *extra: str) -> subprocess.Popen:
    proc = spawn("pyhyve", "run", name, "-r", base, "--console", f"file:{log}", *extra,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc


@pytest.mark.parametrize("flag", ["", "--lazy", "--eager"], ids=["default", "lazy", "eager"])
def test_eager_restore_copies_memory_in_and_lazy_keeps_reading_the_file(make_vm, tmp_path,
                                                                        rundir, flag):
    """The default is eager: it reaches full speed soonest (docs/benchmarks.md)."""
    eager = flag != "--lazy"
    base = suspended(make_vm, str(tmp_path / "s"), cmdline="ws=8M", memory=64 * MB)
    log = str(tmp_path / "con.log")
    proc = run_restored("r", base, log, *([flag] if flag else []))
    try:
        wait_socket(rundir, "r")
        wait_file(log, "BB")  # the restored guest makes passes
        st = status("r")
        assert st["state"] == "running"
        assert st["depends_on_snapshot"] is (not eager), st
    finally:
        cli("pyhyvectl", "--vm", "r", "--destroy")
        proc.wait(20)
    assert ("(eager)" if eager else "(lazy)") in proc.stderr.read()


def test_restore_refuses_memory_or_cpus_that_disagree(make_vm, tmp_path, rundir):
    base = suspended(make_vm, str(tmp_path / "s"), memory=32 * MB)
    for flags, needle in ((("-m", "64M"), "--memory 64M disagrees with the snapshot's 32M"),
                          (("-m", "512M"), "--memory 512M disagrees"),  # the boot default too
                          (("--cpus", "2"), "--cpus 2 disagrees with the snapshot's 1")):
        p = cli("pyhyve", "run", "r", "-r", base, "--console", "null", *flags, timeout=20)
        assert p.returncode == 2 or p.returncode == 1, p
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], p.stderr


@pytest.mark.parametrize("flag", ["--lazy", "--eager"], ids=["lazy", "eager"])
def test_restore_does_not_grow_with_ram_size(make_vm, tmp_path, rundir, flag):
    """The same guest (an 8 MiB working set) in 256 MiB and in 4 GiB of RAM: restored,
    the VMM's resident memory differs by far less than the RAM sizes do (only the
    snapshot's data pages are ever read in, never its holes)."""
    rss = {}
    for mem in (256, 4096):
        base = suspended(make_vm, str(tmp_path / f"s{mem}"), cmdline="ws=8M", memory=mem * MB)
        log = str(tmp_path / f"con{mem}.log")
        proc = run_restored(f"r{mem}", base, log, flag)
        try:
            wait_socket(rundir, f"r{mem}")
            wait_file(log, "BBB")  # passes over its whole working set, after the restore
            rss[mem] = rss_kib(status(f"r{mem}")["pid"])
        finally:
            cli("pyhyvectl", "--vm", f"r{mem}", "--destroy")
            proc.wait(20)
    assert rss[4096] - rss[256] < 32 * 1024, rss  # KiB: 15x the RAM, not 15x the memory


def test_receive_refuses_memory_and_cpus(rundir):
    """The source sends the VM's configuration: a destination given sizes says so."""
    for flags in (("-m", "64M"), ("--cpus", "2")):
        p = cli("pyhyve", "run", "d", "-R", "127.0.0.1:7797", "--insecure", *flags, timeout=20)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode != 0 and len(lines) == 1, p.stderr
        assert f"{flags[0].replace('-m', '--memory')} cannot be combined with --receive" in lines[0]
