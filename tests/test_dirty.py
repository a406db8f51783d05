"""One owner of the dirty log, independent consumers: each sees every page written since
its own last fetch, whoever else reads; the VMM's own writes are merged in; stopping one
leaves the others working."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from migrate_helpers import Destination, migrate
from pyhyve import guestkit

pytestmark = pytest.mark.kvm  # every test here runs a guest or talks to KVM

MB = 1 << 20
PAGE = 4096


def ws_pages(vm) -> range:
    vm.pause()
    r = guestkit.ab_check(vm.memory.regions[0].array)
    vm.resume()
    return range(r.ws_start // PAGE, (r.ws_start + r.ws_size) // PAGE)


def test_two_consumers_each_see_every_dirty_page(make_vm):
    vm, con = make_vm("ab", "ws=8M", memory=64 * MB)
    con.wait_count(b"B", 2)
    ws = ws_pages(vm)
    a = vm.dirty.consumer("a")
    b = vm.dirty.consumer("b")
    n = con.buf.count(b"B")
    con.wait_count(b"B", n + 2)  # two whole passes: every working-set page written
    got_a = a.fetch()
    assert got_a[ws.start:ws.stop].all()
    con.wait_count(b"B", con.buf.count(b"B") + 2)
    got_b = b.fetch()  # a's fetches took nothing away from b
    assert got_b[ws.start:ws.stop].all()
    a.stop()  # the other consumer goes on, and logging stays on for it
    con.wait_count(b"B", con.buf.count(b"B") + 2)
    assert b.fetch()[ws.start:ws.stop].all()
    with pytest.raises(ValueError, match="stopped"):
        a.fetch()
    b.stop()
    assert not vm.dirty.active


def test_vmm_writes_are_merged_in(make_vm):
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    c = vm.dirty.consumer("c")
    c.fetch()
    page = 20 * MB // PAGE  # far from anything the guest writes
    vm.memory.write(page * PAGE + 10, b"device wrote this")
    vm.memory.fill((page + 5) * PAGE, 2 * PAGE + 1, 0x55)
    got = c.fetch()
    assert got[page] and got[page + 5] and got[page + 6] and got[page + 7]
    assert not got[page + 1] and not got[page + 8]
    c.stop()


def test_a_consumer_sees_nothing_from_before_it_began(make_vm):
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    first = vm.dirty.consumer("first")
    vm.memory.write(24 * MB, b"x")
    second = vm.dirty.consumer("second")
    assert first.fetch()[24 * MB // PAGE]
    assert not second.fetch()[24 * MB // PAGE]
    first.stop()
    second.stop()


def test_a_migration_and_another_consumer_at_once(make_vm):
    """An incremental-snapshot style consumer runs through a cancelled and then a completed
    live migration: it loses nothing to the migration's reads, and the cancel leaves it
    (and the dirty log) working."""
    from pyhyve.migration.source import Migration, Options

    vm, con = make_vm("ab", "ws=16M", memory=128 * MB)
    con.wait_count(b"B", 2)
    ws = ws_pages(vm)
    other = vm.dirty.consumer("incremental")
    dest = Destination()
    m = Migration(vm, "127.0.0.1", dest.port, b"k" * 32,
                  Options(live=True, bandwidth=4 * MB, compress="none", auto_converge=False))
    t = threading.Thread(target=m.run)
    t.start()
    while m.stats.rounds < 1 and t.is_alive():
        t.join(0.05)
    m.cancel()
    t.join(20)
    assert m.stats.state == "cancelled" and vm.state == "running"
    dest.join()
    assert vm.dirty.active  # still logging for the other consumer
    con.wait_count(b"B", con.buf.count(b"B") + 2)
    assert other.fetch()[ws.start:ws.stop].all()
    # every page written again before the migration reads the log: however fast it
    # goes, the other consumer must still get them all (and what comes during it)
    con.wait_count(b"B", con.buf.count(b"B") + 2)
    dest = Destination()
    stats = migrate(vm, dest, live=True)
    assert stats.state == "completed", stats.error
    try:
        got = other.fetch()  # nothing the guest wrote is lost to the migration's reads
        assert got[ws.start:ws.stop].all()
        assert np.count_nonzero(got) >= len(ws)
    finally:
        dest.vm.close()


def test_logging_is_off_when_no_one_consumes(make_vm):
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    c = vm.dirty.consumer("c")
    c.stop()
    assert not vm.dirty.active
    # KVM refuses GET_DIRTY_LOG on a slot without logging: proof the flag is off
    with pytest.raises(OSError):
        vm.vm.get_dirty_log(0, np.zeros(8192, dtype=np.uint64).ctypes.data)


def needs_manual_protect(vm) -> None:
    c = vm.dirty.consumer("probe")
    c.stop()
    if not vm.dirty.manual:  # an older KVM: deferred protection cannot exist there
        pytest.skip("KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET")


def test_a_deferred_consumer_sees_the_pages_it_armed(make_vm):
    """Deferred: logging starts with no page protected; a page is logged once armed, and
    an unarmed page is the consumer's to send, never reported."""
    vm, con = make_vm("ab", "ws=8M", memory=64 * MB)
    con.wait_count(b"B", 2)
    needs_manual_protect(vm)
    ws = ws_pages(vm)
    half = ws.start + len(ws) // 2
    c = vm.dirty.consumer("migration", deferred=True)
    try:
        assert c.deferred
        con.wait_count(b"B", con.buf.count(b"B") + 2)
        assert not c.fetch().any()  # written, but nothing was armed
        c.arm(ws.start, half - ws.start)
        con.wait_count(b"B", con.buf.count(b"B") + 2)
        got = c.fetch()  # handed out unprotected again: armed again before the next read
        assert got[ws.start:half].all() and not got[half:ws.stop].any()
        con.wait_count(b"B", con.buf.count(b"B") + 2)
        assert not c.fetch().any()
        every = np.zeros(vm.dirty.pages, dtype=bool)
        every[ws.start:] = True
        c.arm_mask(every)
        con.wait_count(b"B", con.buf.count(b"B") + 2)
        assert c.fetch()[ws.start:ws.stop].all()
    finally:
        c.stop()
    assert not vm.dirty.active


def test_a_second_consumer_ends_deferral_and_nothing_is_lost(make_vm):
    """Another consumer needs the whole log: every page gets protected, and the pages the
    deferred one had not armed (written unseen, maybe) become its pending pages."""
    vm, con = make_vm("ab", "ws=8M", memory=64 * MB)
    con.wait_count(b"B", 2)
    needs_manual_protect(vm)
    ws = ws_pages(vm)
    half = ws.start + len(ws) // 2
    c = vm.dirty.consumer("migration", deferred=True)
    c.arm(ws.start, half - ws.start)
    c.fetch()
    other = vm.dirty.consumer("incremental")
    try:
        assert not c.deferred
        got = c.fetch()
        assert got[half:ws.stop].all()  # never armed: counted as written
        con.wait_count(b"B", con.buf.count(b"B") + 2)
        assert c.fetch()[ws.start:ws.stop].all()
        assert other.fetch()[ws.start:ws.stop].all()
    finally:
        c.stop()
        other.stop()


def test_round_zero_logs_a_page_written_after_its_scan(make_vm):
    """A migration arms everything outside round 0's pages at once; a page the guest made
    non-zero after the scan that chose them, before that, goes in round 1."""
    from pyhyve.migration.source import Migration, Options
    from pyhyve.pipeline.pages import guest_runs

    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 2 ")
    needs_manual_protect(vm)
    m = Migration(vm, "127.0.0.1", 1, None, Options())
    m.dirty = vm.dirty.consumer("migration", deferred=True)
    try:
        runs = guest_runs(vm.memory)
        page = 24 * MB // PAGE  # a zero page far from the guest's, so outside `runs`
        assert not any(p <= page < p + n for p, n in runs)
        vm.memory.regions[0].array[page * PAGE + 100] = 7  # a write KVM does not log
        m._arm_the_rest(runs)
        assert m.dirty.fetch()[page]
    finally:
        m.dirty.stop()
