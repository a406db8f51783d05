"""Migration between two hosts: network namespaces joined by a veth pair, each running its
own pyhyve process, driven by the command line exactly as a user would."""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from pyhyve import guestkit

from conftest import BIN, cli, in_ns, wait_file, wait_socket

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

def kill_all(*procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def run_pair(hosts, kit, tmp_path, rundir, guest_args, extra_dst=(), extra_src=()):
    (ns_a, _ip_a), (ns_b, ip_b) = hosts["a"], hosts["b"]
    src_log, dst_log = tmp_path / "src.log", tmp_path / "dst.log"
    src = in_ns(ns_a, "pyhyve", "run", "src", "-k", kit[guest_args[0]], "--cmdline",
                guest_args[1], "-m", guest_args[2], "-c", guest_args[3],
                "--console", f"file:{src_log}")
    dst = in_ns(ns_b, "pyhyve", "run", "dst", "-R", f"{ip_b},7797", "--console",
                f"file:{dst_log}", *extra_dst)
    ready, _, _ = select.select([dst.stderr], [], [], 20)
    line = dst.stderr.readline() if ready else ""
    assert "waiting for a migration" in line, line  # the destination listens
    wait_socket(rundir, "src")
    wait_file(src_log, "\n")
    return src, dst, src_log, dst_log, ip_b


@pytest.mark.parametrize("mode", ["--migrate", "--migrate-live",
                                  "--migrate-live --postcopy-after 1"])
@pytest.mark.parametrize("ws", [0, 64, 512])
def test_ab_between_namespaces(hosts, kit, tmp_path, rundir, keyfile, mode, ws):
    """Warm, live, and one pre-copy round then post-copy: the destination's RAM, saved
    afterwards, holds the invariant and the passes of both sides add up."""
    src, dst, src_log, dst_log, ip_b = run_pair(
        hosts, kit, tmp_path, rundir, ("ab", f"ws={ws}M", "1G", "1"), ("--key-file", keyfile))
    try:
        wait_file(src_log, "BBB")
        how, *more = mode.split()
        p = cli("pyhyvectl", "--vm", "src", how, f"{ip_b}:7797", "--key-file", keyfile, *more)
        assert p.returncode == 0, p.stderr
        assert "completed: total" in p.stdout and "downtime" in p.stdout
        assert src.wait(20) == 0 and "migrated to" in src.stderr.read()
        wait_socket(rundir, "dst")
        wait_file(dst_log, "BBB")  # the destination guest makes passes
        snap = str(tmp_path / "dst-snap")
        s = cli("pyhyvectl", "--vm", "dst", "--suspend", snap)
        assert s.returncode == 0, s.stderr
        assert dst.wait(20) == 0
        res = guestkit.ab_check_file(snap)
        source_passes = Path(src_log).read_bytes().count(b"B")
        dest_out = Path(dst_log).read_bytes()
        # it continued: the passes of both sides add up (the source's B count includes its
        # banner's), and no second start banner
        assert res.ws_size == ws << 20 and source_passes >= 3 and dest_out.count(b"B") >= 3
        assert res.passes >= source_passes - 1 + dest_out.count(b"B")
        assert b"A-B start" not in dest_out
    finally:
        kill_all(src, dst)


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_hashchain_over_tls(hosts, kit, tmp_path, rundir, keyfile, postcopy):
    """2 vCPUs over TLS, pre-copy or post-copy (the guest runs on the destination at
    once): their hash chains go on without a lost or repeated step."""
    certs = str(tmp_path / "certs")
    c = cli("pyhyve", "migration-certs", certs)
    assert c.returncode == 0, c.stderr
    src, dst, src_log, dst_log, ip_b = run_pair(
        hosts, kit, tmp_path, rundir, ("hashchain", "cpus=2", "128M", "2"),
        ("--key-file", keyfile, "--tls-dir", certs))
    try:
        wait_file(src_log, "H1 10 ")
        p = cli("pyhyvectl", "--vm", "src", "--migrate-live", f"{ip_b}:7797", "--key-file",
                keyfile, "--tls-dir", certs, *(["--postcopy"] if postcopy else []))
        assert p.returncode == 0, p.stderr
        assert src.wait(20) == 0
        if postcopy:
            assert "post-copy pages to go 0" in p.stdout, p.stdout
            assert "post-copy" in src.stderr.read()
        before = guestkit.check_hashchain(src_log.read_text())
        wait_file(dst_log, f"H1 {before[1] + 10} ")
        cli("pyhyvectl", "--vm", "dst", "--pause")
        guestkit.check_hashchain(src_log.read_text() + dst_log.read_text())
        cli("pyhyvectl", "--vm", "dst", "--destroy")
        assert dst.wait(20) == 3
    finally:
        kill_all(src, dst)


def test_status_and_cancel_from_the_command_line(hosts, kit, tmp_path, rundir, keyfile):
    src, dst, src_log, _dst_log, ip_b = run_pair(
        hosts, kit, tmp_path, rundir, ("ab", "ws=64M", "256M", "1"), ("--key-file", keyfile))
    try:
        wait_file(src_log, "BBB")
        mig = subprocess.Popen([os.path.join(BIN, "pyhyvectl"), "--vm", "src", "--migrate-live",
                                f"{ip_b}:7797", "--key-file", keyfile, "--bandwidth", "4M",
                                "--compress", "none", "--no-auto-converge"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(200):
            st = cli("pyhyvectl", "--vm", "src", "--migrate-status")
            if "src: active:" in st.stdout and "rounds" in st.stdout:
                break
        assert "src: active:" in st.stdout
        for busy in (["--pause"], ["--resume"], ["--checkpoint", str(tmp_path / "no")]):
            r = cli("pyhyvectl", "--vm", "src", *busy)
            assert r.returncode == 1 and "migration is in progress" in r.stderr
        assert cli("pyhyvectl", "--vm", "src", "--migrate-cancel").returncode == 0
        _out, err = mig.communicate(timeout=30)
        assert mig.returncode == 1 and "cancelled" in err and "keeps running here" in err
        assert "state: running" in cli("pyhyvectl", "--vm", "src", "--status").stdout
        # the cancelled attempt does not use up the destination: it says so and waits on
        ready, _, _ = select.select([dst.stderr], [], [], 20)
        line = dst.stderr.readline() if ready else ""
        assert "migration failed" in line and "still waiting" in line, line
        assert dst.poll() is None
        n = src_log.read_text().count("B")
        deadline = time.monotonic() + 20
        while src_log.read_text().count("B") < n + 3:  # the source guest goes on
            assert time.monotonic() < deadline, "the source guest stopped"
            time.sleep(0.02)
        again = cli("pyhyvectl", "--vm", "src", "--migrate-live", f"{ip_b}:7797", "--key-file",
                    keyfile)
        assert again.returncode == 0 and "completed: total" in again.stdout, again.stderr
        assert src.wait(20) == 0
    finally:
        cli("pyhyvectl", "--vm", "src", "--destroy")
        kill_all(src, dst)


def test_destination_refuses_to_listen_without_a_key(rundir, monkeypatch):
    monkeypatch.delenv("PYHYVE_MIGRATION_KEY", raising=False)
    p = cli("pyhyve", "run", "d", "-R", "127.0.0.1,7797")
    assert p.returncode == 1 and "without a migration key" in p.stderr
    p = cli("pyhyve", "run", "d", "-R", "127.0.0.1:7797", "-k", "x")
    assert p.returncode == 1 and "cannot be combined with --receive" in p.stderr


def test_migrate_to_nowhere_keeps_the_guest(kit, rundir, keyfile):
    proc = subprocess.Popen([os.path.join(BIN, "pyhyve"), "run", "lone", "-m", "64M", "-k",
                             kit["ab"], "--cmdline", "ws=1M", "--console", "null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "lone")
        p = cli("pyhyvectl", "--vm", "lone", "--migrate-live", "127.0.0.1:1", "--key-file", keyfile)
        assert p.returncode == 1 and "cannot connect" in p.stderr
        assert "state: running" in cli("pyhyvectl", "--vm", "lone", "--status").stdout
    finally:
        cli("pyhyvectl", "--vm", "lone", "--destroy")
        proc.wait(20)



@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_device_guest_busy_on_every_device_between_namespaces(hosts, kit, tmp_path, rundir,
                                                              keyfile, postcopy):
    """The kit's device guest with every virtio device busy (blocks written and read back,
    frames through net0's loop, a numbered stream to vconsole0, entropy from rng0, vsock
    round trips to a host echo) is live-migrated from one namespace to the other from the
    command line; the image is shared, every other backend is bound anew on the
    destination. Nothing is lost, repeated or corrupted: the rounds run on, every block on
    the image is whole, every frame came back, the console stream has no gap, and vsock's
    reset reaches the guest, which connects again."""
    import re

    from test_virtio import BLOCKS, EchoHost, vcon_lines

    (ns_a, _), (ns_b, ip_b) = hosts["a"], hosts["b"]
    disk = str(tmp_path / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    hosts_uds = [str(tmp_path / "a.v"), str(tmp_path / "b.v")]
    echo = [EchoHost(u) for u in hosts_uds]  # AF_UNIX paths: one file system, any netns
    src_log, dst_log = tmp_path / "src.log", tmp_path / "dst.log"
    port_a, port_b = tmp_path / "port-a.log", tmp_path / "port-b.log"
    frames = 8
    src = in_ns(ns_a, "pyhyve", "run", "src", "-k", kit["virtio"], "--cmdline",
                f"blocks={BLOCKS} frames={frames}", "-m", "64M", "--console", f"file:{src_log}",
                "--disk", f"{disk},serial=kit-disk", "--rng", "--net", "loop",
                "--vconsole", f"file:{port_a}", "--vsock", f"cid=7,uds={hosts_uds[0]}")
    dst = in_ns(ns_b, "pyhyve", "run", "dst", "-R", f"{ip_b},7797", "--console",
                f"file:{dst_log}", "--key-file", keyfile,
                "--bind", f"disk0={disk},serial=kit-disk", "--bind", "net0=loop",
                "--bind", f"vconsole0=file:{port_b}", "--bind", f"vsock0=cid=7,uds={hosts_uds[1]}")
    try:
        wait_socket(rundir, "src")
        wait_file(src_log, "V3 ")  # three rounds on every device
        more = ["--postcopy"] if postcopy else []
        p = cli("pyhyvectl", "--vm", "src", "--migrate-live", f"{ip_b}:7797",
                "--key-file", keyfile, *more, timeout=120)
        assert p.returncode == 0, p.stderr
        assert src.wait(30) == 0 and "migrated to" in src.stderr.read()
        wait_socket(rundir, "dst")
        before = Path(src_log).read_bytes()
        deadline = time.monotonic() + 60
        while len(re.findall(rb"V\d+ ", Path(dst_log).read_bytes())) < 3:
            assert time.monotonic() < deadline, Path(dst_log).read_bytes()[-300:]
            time.sleep(0.05)
        assert cli("pyhyvectl", "--vm", "dst", "--pause").returncode == 0
        out = before + Path(dst_log).read_bytes()
        assert b"VIRTIO ERROR" not in out, out[-400:]
        got = [int(m.group(1)) for m in re.finditer(rb"V(\d+) \d+ \d+\r?\n", out)]
        assert got == list(range(1, len(got) + 1)) and len(got) >= 6, got
        nets = re.findall(rb"net (\d+) (\d+)\r?\n", out)
        assert nets and all(int(n) == int(r) * frames for r, n in nets), nets[-3:]
        guestkit.check_blocks(disk, BLOCKS)
        lines = vcon_lines(port_a) + vcon_lines(port_b)
        assert lines == list(range(1, len(lines) + 1)) and len(lines) >= 6, lines
        dst_out = Path(dst_log).read_bytes()
        assert b"vsock reset" in dst_out and re.search(rb"vsock \d+ ok", dst_out)
        assert b"virtio ready" not in dst_out  # it never restarted
    finally:
        kill_all(src, dst)
        for e in echo:
            e.close()


CAPTURE = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
s.bind((sys.argv[1], 0))
print("ready", flush=True)
while True:
    f = s.recv(2048)
    print(time.monotonic(), f[6:12].hex(), flush=True)  # when it came, and from whom
"""


def test_the_mac_is_announced_on_the_destination_tap_between_namespaces(hosts, kit,
                                                                        tmp_path, rundir,
                                                                        keyfile):
    """The device guest moves from namespace A (its NIC on the loop) to B, where net0 is a
    tap: B's tap sees the guest's MAC (RARP) after the migration began and within 100 ms
    of the guest's first console byte there (the switch-over is before that byte). One
    clock: CLOCK_MONOTONIC is the host's in every network namespace."""
    import subprocess
    import sys
    import threading

    (ns_a, _), (ns_b, ip_b) = hosts["a"], hosts["b"]
    tap = f"pyht{os.getpid() % 100000}"
    subprocess.run(["ip", "-n", ns_b, "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "-n", ns_b, "link", "set", tap, "up"], check=True)
    disk = str(tmp_path / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    cap = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", CAPTURE, tap],
                           stdout=subprocess.PIPE, text=True)
    src = in_ns(ns_a, "pyhyve", "run", "src", "-k", kit["virtio"], "--cmdline",
                "blocks=4 frames=0", "-m", "64M", "--console", f"file:{tmp_path / 's.log'}",
                "--disk", disk, "--net", "loop,mac=02:00:00:00:00:79")
    dst = subprocess.Popen(["ip", "netns", "exec", ns_b, os.path.join(BIN, "pyhyve"), "run",
                            "dst", "-R", f"{ip_b},7798", "--key-file", keyfile, "--console",
                            "stdio", "--bind", f"disk0={disk}", "--bind", f"net0=tap:{tap}"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first: list[float] = []

    def first_byte() -> None:
        if dst.stdout is not None and dst.stdout.read(1):
            first.append(time.monotonic())
    reader = threading.Thread(target=first_byte, daemon=True)
    reader.start()
    try:
        assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
        wait_socket(rundir, "src")
        wait_file(tmp_path / "s.log", "V2 ")
        t_begin = time.monotonic()
        p = cli("pyhyvectl", "--vm", "src", "--migrate-live", f"{ip_b}:7798", "--key-file",
                keyfile, timeout=120)
        assert p.returncode == 0, p.stderr
        reader.join(30)
        assert first, "the destination's guest printed nothing"
        cap.terminate()
        rarps = [float(t) for t, mac in (line.split() for line in cap.stdout)
                 if mac == "020000000079"]
        assert rarps, "no frame from the guest's MAC on the destination's tap"
        assert t_begin < rarps[0] < first[0] + 0.1, (t_begin, rarps[0], first[0])
    finally:
        kill_all(src, dst, cap)
        subprocess.run(["ip", "-n", ns_b, "link", "del", tap], capture_output=True)
