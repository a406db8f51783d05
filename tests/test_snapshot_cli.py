"""bhyve-style save/restore from the command line: pyhyvectl --suspend/--checkpoint,
pyhyve run -r, pyhyve snapshot info/verify."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pyhyve import guestkit

from conftest import cli, spawn, wait_file, wait_socket

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM


def test_suspend_then_restore_from_the_command_line(kit, rundir, tmp_path):
    log1, log2 = tmp_path / "a.log", tmp_path / "b.log"
    proc = spawn("pyhyve", "run", "vm1", "-m", "256M", "-c", "2", "-k", kit["hashchain"],
                 "--cmdline", "cpus=2", "-l", f"com1,file:{log1}",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_socket(rundir, "vm1")
    os.chdir(tmp_path)  # a relative path is the client's, not the VMM's
    wait_file(log1, "H1 10 ")
    ck = cli("pyhyvectl", "--vm", "vm1", "--checkpoint", "cp")
    assert ck.returncode == 0 and "checkpoint to" in ck.stdout and "downtime" in ck.stdout
    assert cli("pyhyvectl", "--vm", "vm1", "--status").stdout.count("running") == 1
    sus = cli("pyhyvectl", "--vm", "vm1", "--suspend", "snap")
    assert sus.returncode == 0 and "suspend to" in sus.stdout, sus.stderr
    assert proc.wait(20) == 0
    assert "suspended to" in proc.stderr.read()
    for f in ("snap.g1", "snap.g1.kern", "snap.meta", "cp.g1", "cp.g1.kern", "cp.meta"):
        assert (tmp_path / f).exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # no temporaries left
    info = cli("pyhyve", "snapshot", "info", "snap")
    assert info.returncode == 0 and "suspend of VM 'vm1'" in info.stdout
    assert "vcpu1" in info.stdout and "uart16550" in info.stdout
    meta = json.loads(cli("pyhyve", "snapshot", "info", "snap", "--json").stdout)
    assert meta["vm"]["cpus"] == 2 and meta["memory"]["regions"][0]["file_offset"] == 0
    ver = cli("pyhyve", "snapshot", "verify", "snap")
    assert ver.returncode == 0 and "OK" in ver.stdout
    # restore with the console overridden (a host path), let it run, stop it
    proc2 = spawn("pyhyve", "run", "vm2", "-r", "snap", "--console", f"file:{log2}",
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_socket(rundir, "vm2")
    before = guestkit.check_hashchain(log1.read_text())
    wait_file(log2, f"H1 {before[1] + 10} ")
    cli("pyhyvectl", "--vm", "vm2", "--pause")
    guestkit.check_hashchain(log1.read_text() + log2.read_text())
    cli("pyhyvectl", "--vm", "vm2", "--destroy")
    assert proc2.wait(20) == 3
    err = proc2.stderr.read()
    assert "restored vm2" in err and "to running" in err


def test_restore_rejects_config_flags(kit, tmp_path, rundir):
    p = cli("pyhyve", "run", "x", "-r", str(tmp_path / "nothing"), "--cmdline", "a")
    assert p.returncode != 0 and "cannot be combined with --restore" in p.stderr


def test_restore_of_missing_snapshot(rundir, tmp_path):
    p = cli("pyhyve", "run", "x", "-r", str(tmp_path / "nothing"))
    assert p.returncode == 1 and "is missing" in p.stderr and "Traceback" not in p.stderr


def test_suspend_to_bad_path_keeps_vm(kit, rundir):
    proc = spawn("pyhyve", "run", "keep", "-m", "64M", "-k", kit["ab"], "--cmdline", "ws=1M",
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "keep")
        p = cli("pyhyvectl", "--vm", "keep", "--suspend", "/nonexistent/dir/snap")
        assert p.returncode == 1 and "does not exist" in p.stderr
        assert "state: running" in cli("pyhyvectl", "--vm", "keep", "--status").stdout
    finally:
        cli("pyhyvectl", "--vm", "keep", "--destroy")
        proc.wait(20)
