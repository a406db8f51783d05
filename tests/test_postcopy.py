"""Post-copy live migration: the guest runs on the destination before its memory is all
there; pages it waits on are fetched first; a connection cut after the switch loses
nothing (the source reconnects and the transfer goes on)."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable

import pytest

from migrate_helpers import KEY, Destination, migrate
from pyhyve import guestkit
from pyhyve.migration.source import Migration, Options

pytestmark = pytest.mark.kvm

MB = 1 << 20


def ab_on(vm) -> guestkit.AbResult:
    vm.pause()
    try:
        return guestkit.ab_check(vm.memory.regions[0].array)
    finally:
        vm.resume()


@pytest.mark.parametrize("after", [0, 1], ids=["at-once", "after-a-round"])
def test_ab_postcopy_keeps_passing(make_vm, after):
    vm, con = make_vm("ab", "ws=32M", memory=128 * MB)
    con.wait_count(b"B", 3, timeout=60, start=con.wait_for("\n") + 1)
    dest = Destination()
    stats = migrate(vm, dest, live=True, postcopy=True, postcopy_after=after,
                    recover_timeout=5.0)
    assert stats.state == "completed", stats.error
    assert stats.phases_ms["postcopy reconnects"] == 0  # DONE arrived on the connection
    assert vm.stopped and "post-copy" in vm.stop_reason
    try:
        dvm = dest.vm
        assert dest.receiver.postcopy is not None
        assert dest.receiver.postcopy.done.wait(30), dest.receiver.postcopy.error
        dest.console.wait_count(b"B", 3, timeout=60)
        res = ab_on(dvm)
        assert res.ws_size == 32 * MB
        assert res.passes >= con.buf.count(b"B") - 1 + dest.console.buf.count(b"B") - 1
        assert b"A-B start" not in dest.console.buf
        assert stats.pages_sent >= 32 * MB // 4096
    finally:
        dest.vm.close()


def test_hashchain_two_vcpus_postcopy_continue_exactly(make_vm):
    vm, con = make_vm("hashchain", "cpus=2", cpus=2, memory=128 * MB)
    con.wait_for("H1 20 ")
    dest = Destination()
    stats = migrate(vm, dest, live=True, postcopy=True, recover_timeout=5.0)
    assert stats.state == "completed", stats.error
    assert stats.phases_ms["postcopy reconnects"] == 0
    try:
        before = guestkit.check_hashchain(con.text)
        dest.console.wait_for(f"H0 {before[0] + 20} ")
        dest.console.wait_for(f"H1 {before[1] + 20} ")
        dest.vm.pause()
        guestkit.check_hashchain(con.text + dest.console.text)
    finally:
        dest.vm.close()


def wait_for_switch(m: Migration, t: threading.Thread,
                    also: Callable[[], bool] = lambda: True) -> None:
    """Until the migration is past its post-copy switch (and `also` holds)."""
    deadline = time.monotonic() + 30
    while m.stats.state != "postcopy" or not also():
        assert time.monotonic() < deadline and t.is_alive(), m.stats.line()
        time.sleep(0.001)


class RelayProxy:
    """Forwards every TCP connection to `port`; cut() breaks the current one (both ways)."""

    def __init__(self, port: int, cut_after: bytes = b"", cut_len: int = 0) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = port
        self.connections = 0
        self._dropping = False
        # the first connection breaks once `cut_len` bytes from the start of `cut_after`
        # went through, and not one byte more
        self._cut_after, self._cut_len, self._seen = cut_after, cut_len, bytearray()
        self._live: list[socket.socket] = []
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                a, _ = server.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            self.connections += 1
            self._live = [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    def _pump(self, x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(65536):
                if self._cut_after and x is self._live[0]:
                    before = len(self._seen)
                    self._seen += data
                    at = self._seen.find(self._cut_after)
                    if at >= 0 and len(self._seen) >= at + self._cut_len:
                        # nothing comes back once those bytes are out (an answer could,
                        # between the send and the break, if this thread lost the GIL)
                        self._dropping = True
                        y.sendall(data[:at + self._cut_len - before])  # exactly that far
                        self._cut_after = b""
                        self._break()
                        self._dropping = False
                        return
                if not self._dropping:
                    y.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            y.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """As a network that fails does: what is in flight for 50 ms is lost, then the
        connection is gone (the sender believed those bytes sent)."""
        self._dropping = True
        time.sleep(0.05)
        self._break()
        self._dropping = False

    def _break(self) -> None:
        for s in self._live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def down_for(self, seconds: float) -> None:
        """Break the connection and refuse new ones for a while (a host that reboots its
        network), then listen on the same port again."""
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._break()
        time.sleep(seconds)
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() (a close alone may not)
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._break()


@pytest.mark.parametrize("seed", range(10))
def test_a_cut_after_the_switch_loses_nothing(make_vm, seed):
    """The connection breaks at a seeded moment of the post-copy phase: the destination's
    guest waits on its missing pages, the source reconnects, the rest arrives, and the
    guest goes on with its memory intact (A-B invariant, or the hash chain)."""
    rnd = random.Random(seed)
    hashchain = seed % 2 == 1
    if hashchain:
        vm, con = make_vm("hashchain", "cpus=2", cpus=2, memory=128 * MB)
        con.wait_for("H1 10 ")
    else:  # 24 MiB written once and never touched again: only the push brings it over
        vm, con = make_vm("ab", "ws=8M ro=24M roevery=1000000", memory=128 * MB)
        con.wait_count(b"B", 3, timeout=60, start=con.wait_for("\n") + 1)
    dest = Destination()
    proxy = RelayProxy(dest.port)
    # about 0.5 s of post-copy for either guest (the hash chain's RAM is a few pages)
    m = Migration(vm, "127.0.0.1", proxy.port, KEY,
                  Options(live=True, postcopy=True, compress="none",
                          bandwidth=MB // 4 if hashchain else 48 * MB, io_timeout=10.0,
                          recover_timeout=8.0))
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    wait_for_switch(m, t)
    time.sleep(rnd.uniform(0.0, 0.3))
    assert m.stats.state == "postcopy", \
        f"the post-copy phase ended before the cut ({m._postcopy and m._postcopy.pages_sent})"
    proxy.cut()
    t.join(10)  # about a second unless something is lost
    proxy.close()
    assert m.stats.state == "completed", m.stats.line() + " " + m.stats.error
    assert m._postcopy is not None and m._postcopy.reconnects >= 1
    dest.join()
    try:
        pc = dest.receiver.postcopy
        assert pc is not None and pc.done.wait(30) and pc.reconnects >= 1, pc and pc.error
        if hashchain:
            before = guestkit.check_hashchain(con.text)
            dest.console.wait_for(f"H0 {before[0] + 10} ")
            dest.console.wait_for(f"H1 {before[1] + 10} ")
            dest.vm.pause()
            guestkit.check_hashchain(con.text + dest.console.text)
        else:
            dest.console.wait_count(b"B", 3, timeout=60)
            res = ab_on(dest.vm)
            assert res.passes >= con.buf.count(b"B") - 1 + dest.console.buf.count(b"B") - 1
            ro = slice(res.ws_start + res.ws_size, res.ws_start + res.ws_size + 24 * MB)
            assert (dest.vm.memory.regions[0].array[ro] == vm.memory.regions[0].array[ro]).all()
    finally:
        dest.vm.close()


def test_no_save_while_pages_are_still_arriving(make_vm, tmp_path):
    """A save of the destination's VM would read pages still on the source: refused
    until post-copy is done, then it works."""
    from pyhyve.snapshot.errors import SnapshotError
    from pyhyve.snapshot.save import save

    vm, con = make_vm("ab", "ws=24M", memory=128 * MB)
    con.wait_count(b"B", 3, timeout=60, start=con.wait_for("\n") + 1)
    dest = Destination()
    m = Migration(vm, "127.0.0.1", dest.port, KEY,
                  Options(live=True, postcopy=True, compress="none", bandwidth=16 * MB,
                          io_timeout=10.0))
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    wait_for_switch(m, t, lambda: dest.vm is not None)
    try:
        with pytest.raises(SnapshotError, match="still arriving by post-copy"):
            save(dest.vm, str(tmp_path / "early"), "checkpoint")
        t.join(60)
        assert m.stats.state == "completed", m.stats.error
        assert dest.receiver.postcopy.done.wait(30)
        save(dest.vm, str(tmp_path / "later"), "checkpoint")
        assert guestkit.ab_check_file(str(tmp_path / "later")).ws_size == 24 * MB
    finally:
        t.join(60)
        dest.vm.close()


def test_a_source_that_gives_up_keeps_its_guest_paused(make_vm):
    """The destination never comes back: at its deadline the source fails, but its VM --
    holding pages the destination's guest lacks -- stays paused, never resumed."""
    vm, con = make_vm("ab", "ws=24M", memory=128 * MB)
    con.wait_count(b"B", 3, timeout=60, start=con.wait_for("\n") + 1)
    dest = Destination()
    proxy = RelayProxy(dest.port)
    m = Migration(vm, "127.0.0.1", proxy.port, KEY,
                  Options(live=True, postcopy=True, compress="none", bandwidth=16 * MB,
                          io_timeout=5.0, recover_timeout=1.0))
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    wait_for_switch(m, t)
    proxy.close()                        # no way back to the destination
    t.join(20)
    try:
        assert m.stats.state == "failed", m.stats.line()
        assert "kept paused" in m.stats.error and "do not destroy it" in m.stats.error
        assert vm.state == "paused" and not vm.stopped
        n = con.buf.count(b"B")
        time.sleep(0.3)
        assert con.buf.count(b"B") == n  # it never ran again here
        # its copy of the guest is stale: nothing may run, save, move or end it
        from pyhyve.control.session import Session, VmError
        session = Session(vm)
        session.migration = m
        for name, args in (("resume", {}), ("pause", {}), ("checkpoint", {"path": "/x"}),
                           ("destroy", {}),
                           ("migrate", {"target": "127.0.0.1:9", "live": True})):
            with pytest.raises(VmError, match="post-copy destination"):
                session.handlers[name](args)
        assert vm.state == "paused" and not vm.stopped and m.recoverable()
    finally:
        dest.join(5)
        if dest.vm is not None:
            dest.vm.close()


def test_a_source_that_gave_up_finishes_on_migrate_recover(make_vm):
    """The destination is away longer than the source's deadline: the source gives up,
    paused, with its pages. Once the network is back, `--migrate-recover` (Migration.
    recover) reconnects with the same session and finishes: every page arrives, the guest
    over there holds the invariant, and only then does this VM end."""
    vm, dest, proxy, m, t = switched_behind_a_proxy(make_vm, bandwidth=16 * MB,
                                                    recover_timeout=1.0)
    back = threading.Thread(target=proxy.down_for, args=(3.0,), daemon=True)
    back.start()
    t.join(20)
    try:
        assert m.stats.state == "failed" and m.recoverable(), m.stats.line()
        assert vm.state == "paused" and not vm.stopped
        back.join(10)
        stats = m.recover(30.0)
        assert stats.state == "completed", stats.line() + " " + stats.error
        assert vm.stopped and not m.recoverable()
        dest.join()
        assert dest.receiver.postcopy.done.wait(30)
        dest.console.wait_count(b"B", 3, timeout=60)
        ab_on(dest.vm)
    finally:
        proxy.close()
        dest.join(5)
        if dest.vm is not None:
            dest.vm.close()


def test_migrate_recover_without_a_failed_postcopy_is_refused(make_vm):
    from pyhyve.migration.source import MigrationError

    vm, con = make_vm("ab", "ws=1M")
    con.wait_for(b"B")
    m = Migration(vm, "127.0.0.1", 9, KEY, Options(live=True))
    assert not m.recoverable()
    with pytest.raises(MigrationError, match="no post-copy migration to recover"):
        m.recover()


def start_postcopy(vm, port: int, **opts: object) -> tuple[Migration, threading.Thread]:
    m = Migration(vm, "127.0.0.1", port, KEY,
                  Options(live=True, postcopy=True, compress="none", io_timeout=5.0,
                          **opts))  # type: ignore[arg-type]
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    return m, t


def switched_behind_a_proxy(make_vm, **opts: object):
    """An A-B guest (8 MiB written, 24 MiB only read) past its post-copy switch to a
    destination reached through a RelayProxy: (vm, dest, proxy, migration, its thread)."""
    vm, con = make_vm("ab", "ws=8M ro=24M roevery=1000000", memory=128 * MB)
    con.wait_count(b"B", 3, timeout=60, start=con.wait_for("\n") + 1)
    dest = Destination()
    proxy = RelayProxy(dest.port)
    m, t = start_postcopy(vm, proxy.port, **opts)
    wait_for_switch(m, t)
    return vm, dest, proxy, m, t


def test_a_destination_away_for_a_while_is_retried_until_it_is_back(make_vm):
    """Connections are refused for 1.5 s after the cut: the source keeps trying (each
    refusal is one failed attempt, not the end) and the transfer completes."""
    _, dest, proxy, m, t = switched_behind_a_proxy(make_vm, bandwidth=32 * MB,
                                                    recover_timeout=30.0)
    proxy.down_for(1.5)
    t.join(30)
    proxy.close()
    assert m.stats.state == "completed", m.stats.line() + " " + m.stats.error
    dest.join()
    try:
        assert dest.receiver.postcopy.done.wait(30)
        dest.console.wait_count(b"B", 3, timeout=60)
        ab_on(dest.vm)
    finally:
        dest.vm.close()


def test_a_cut_right_after_go_continues_as_post_copy(make_vm):
    """The connection breaks just after GO: the destination runs the guest, the source
    never hears RUNNING. It must not resume its own guest nor give up: it reconnects
    and the pages follow."""
    vm, con = make_vm("ab", "ws=16M", memory=128 * MB)
    con.wait_count(b"B", 3, timeout=60, start=con.wait_for("\n") + 1)
    dest = Destination()
    go = b"PHMG" + bytes([15, 0, 0, 0])  # the GO frame's header: with its {} and MAC,
    proxy = RelayProxy(dest.port, cut_after=go, cut_len=16 + 2 + 32)  # 50 bytes
    m, t = start_postcopy(vm, proxy.port, recover_timeout=30.0)
    t.join(40)
    proxy.close()
    assert m.stats.state == "completed", m.stats.line() + " " + m.stats.error
    assert m._postcopy is not None and m._postcopy.reconnects >= 1
    dest.join()
    try:
        assert dest.receiver.postcopy.done.wait(30)
        dest.console.wait_count(b"B", 3, timeout=60)
        res = ab_on(dest.vm)
        assert res.passes >= con.buf.count(b"B") - 1 + dest.console.buf.count(b"B") - 1
    finally:
        dest.vm.close()


def test_no_cancel_and_no_destroy_past_the_switch(make_vm):
    """Past the switch this VM holds pages the destination's guest needs: the control
    socket refuses --migrate-cancel and --destroy until the transfer is done."""
    from pyhyve.control.session import Session, VmError

    vm, con = make_vm("ab", "ws=24M", memory=128 * MB)
    con.wait_count(b"B", 3, timeout=60, start=con.wait_for("\n") + 1)
    dest = Destination()
    session = Session(vm)
    m, t = start_postcopy(vm, dest.port, bandwidth=16 * MB)
    session.migration = m
    wait_for_switch(m, t)
    with pytest.raises(VmError, match="post-copy switch"):
        session.migrate_cancel({})
    with pytest.raises(VmError, match="refusing to destroy"):
        session.destroy({})
    assert not vm.stopped
    t.join(30)
    assert m.stats.state == "completed", m.stats.error
    dest.join()
    dest.vm.close()


def test_a_go_cut_short_gives_the_guest_back_to_the_source(make_vm):
    """The connection breaks inside the GO frame: the destination never starts the guest
    and frees it. The source, not knowing, reconnects; the destination says the guest
    never started there, and the source runs it again (never on two hosts, never lost)."""
    vm, con = make_vm("ab", "ws=16M", memory=128 * MB)
    con.wait_count(b"B", 3, timeout=60, start=con.wait_for("\n") + 1)
    dest = Destination()
    go = b"PHMG" + bytes([15, 0, 0, 0])
    proxy = RelayProxy(dest.port, cut_after=go, cut_len=8)  # half a header
    m, t = start_postcopy(vm, proxy.port, recover_timeout=5.0)
    t.join(20)
    proxy.close()
    assert m.stats.state == "failed" and "never started" in m.stats.error, m.stats.error
    assert vm.state == "running"
    n = con.buf.count(b"B")
    con.wait_count(b"B", n + 3)
    ab_on(vm)
    assert dest.vm is None
    dest.receiver.close()


def test_pyhyvectl_migrate_recover_says_why_it_cannot(kit, rundir):
    import subprocess

    from conftest import cli, spawn, wait_socket

    p = spawn("pyhyve", "run", "rec", "-k", kit["ab"], "--cmdline", "ws=1M", "--console",
              "null", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(rundir, "rec")
        r = cli("pyhyvectl", "--vm", "rec", "--migrate-recover")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "no post-copy migration to recover here" in r.stderr
        assert cli("pyhyvectl", "--vm", "rec", "--destroy").returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
