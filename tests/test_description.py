"""The VM description and the binding rule: the machine travels with the snapshot and the
stream; host backends come only from --bind (or --reuse-paths), the console defaults to
stdout, and an unbound host backend is refused by device id."""

from __future__ import annotations

import subprocess

import pytest

from pyhyve.description import (
    DescriptionError,
    DeviceDesc,
    VmDescription,
    bind,
    default_description,
    parse_bindings,
)

MB = 1 << 20


def test_round_trip_and_validation():
    d = default_description("file:/x")
    assert VmDescription.from_dict(d.to_dict()) == d
    for bad, needle in (({"version": 1, "devices": [{"id": "Bad!"}]}, "bad or repeated"),
                        ({"version": 9, "devices": []}, "version 9"),
                        ({"version": 1, "devices": [{**d.to_dict()["devices"][0],
                                                     "kind": "gpu"}]}, "can build"),
                        ({"version": 1, "devices": [d.to_dict()["devices"][0]] * 2},
                         "repeated")):
        with pytest.raises(DescriptionError, match=needle):
            VmDescription.from_dict(bad)


def test_a_pci_device_cannot_take_a_platform_irq():
    """The MP table hands a PCI device's pin over to level-triggered PCI routing: on
    COM1's, the RTC's or the SCI's pin that would break the platform device."""
    dev = {"id": "rng0", "kind": "virtio-rng", "bus": "pci", "base": 3, "length": 0x8000}
    for irq in (0, 4, 8, 9):
        with pytest.raises(DescriptionError, match=f"irq {irq} is a platform"):
            VmDescription.from_dict({"version": 1, "devices": [{**dev, "irq": irq}]})
    ok = VmDescription.from_dict({"version": 1, "devices": [{**dev, "irq": 11}]})
    assert ok.devices[0].irq == 11


def test_the_binding_rule():
    rec = VmDescription((*default_description("unix:/recorded.sock").devices,
                         DeviceDesc("disk0", "post", "pio", 0x90, 1, None, "/srv/img.raw")))
    with pytest.raises(DescriptionError, match=r"device disk0 had the backend '/srv/img\.raw'"):
        bind(rec, {}, False)  # a host path nobody bound: refused, by id
    got = bind(rec, {"disk0": "/new.img"}, False)
    assert got.device("com1").backend == "stdio"  # the console defaults to stdout
    assert got.device("disk0").backend == "/new.img"
    assert bind(rec, {}, True).device("com1").backend == "unix:/recorded.sock"  # reused
    with pytest.raises(DescriptionError, match="names no device"):
        bind(rec, {"net0": "tap:x"}, False)
    assert parse_bindings(["com1=file:/a", "disk0=/b"]) == {"com1": "file:/a", "disk0": "/b"}
    for bad in (["com1"], ["com1=file:/a", "com1=file:/b"], ["Com1=x"]):
        with pytest.raises(DescriptionError):
            parse_bindings(bad)


@pytest.mark.kvm
def test_the_snapshot_records_the_machine(make_vm, tmp_path):
    from pyhyve.snapshot.restore import open_snapshot
    from pyhyve.snapshot.save import save
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    save(vm, str(tmp_path / "s"), "checkpoint")
    snap = open_snapshot(str(tmp_path / "s"))
    snap.close()
    assert snap.meta["format_version"] == 5
    desc = VmDescription.from_dict(snap.meta["description"])
    assert [d.id for d in desc.devices] == ["com1", "i8042", "post", "pci", "genid", "ecam",
                                          "acpi-pm", "rtc"]


@pytest.mark.kvm
@pytest.mark.parametrize("how", ["bind", "reuse"])
def test_restore_with_a_bound_or_reused_console(kit, tmp_path, rundir, how):
    from conftest import cli, spawn, wait_file, wait_socket
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    p = spawn("pyhyve", "run", "b1", "-m", "32M", "-k", kit["hashchain"], "--bind",
              f"com1=file:{first}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(rundir, "b1")
    wait_file(first, "H0 3 ")
    assert cli("pyhyvectl", "--vm", "b1", "--suspend", str(tmp_path / "s")).returncode == 0
    p.wait(20)
    n = first.read_text().count("H0 ")
    args = ["--bind", f"com1=file:{second}"] if how == "bind" else ["--reuse-paths"]
    q = spawn("pyhyve", "run", "b2", "-r", str(tmp_path / "s"), *args,
              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "b2")
        log = second if how == "bind" else first
        wait_file(log, f"H0 {n + 3} " if how == "reuse" else "H0 ")
    finally:
        cli("pyhyvectl", "--vm", "b2", "--destroy")
        q.wait(20)
    assert b"H0" not in q.stdout.read()  # not on stdout: the console went where it was bound


@pytest.mark.kvm
def test_receive_binds_its_own_backends(make_vm, tmp_path):
    from migrate_helpers import Destination, migrate
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    log = tmp_path / "dst.log"
    dest = Destination(bindings={"com1": f"file:{log}"})
    dest.receiver.console = None  # let com1 open what --bind says
    dest.receiver.opts.console = None
    stats = migrate(vm, dest, live=True)
    assert stats.state == "completed", stats.error
    try:
        from conftest import wait_file
        wait_file(log, "H0 ")
        assert dest.vm.description.device("com1").backend == f"file:{log}"
    finally:
        dest.vm.close()
