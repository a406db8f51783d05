"""The hand-over at the end of a migration, cut at every step that matters (issue 13,
finding 6) and tampered with (finding 8). The destination starts the guest only after the
source's GO; so a connection lost before GO leaves the guest running on the source alone,
and one lost after GO leaves the source guest paused, never running on two hosts."""

from __future__ import annotations

import pytest

from migrate_helpers import Destination, FrameProxy, migrate
from pyhyve import guestkit
from pyhyve.migration.protocol import T

pytestmark = pytest.mark.kvm

MB = 1 << 20


def hashchain_vm(make_vm):
    vm, con = make_vm("hashchain", "", memory=32 * MB)
    con.wait_for("H0 5 ")
    return vm, con


def through(vm, rule, action: str, **opts):
    """Migrate `vm` live through a FrameProxy acting on the frame `rule` names."""
    dest = Destination()
    proxy = FrameProxy(dest.port, lambda d, t, n: action if rule(d, t, n) else None)
    stats = migrate(vm, dest, port=proxy.port, live=True, **opts)
    assert proxy.acted == action
    return dest, stats


def continues(vm, con, steps: int = 5) -> None:
    """The guest makes progress from where it was, without a lost or repeated step."""
    n = guestkit.check_hashchain(con.text)[0]
    con.wait_for(f"H0 {n + steps} ")
    vm.pause()
    guestkit.check_hashchain(con.text)
    vm.resume()


@pytest.mark.parametrize("where", [("S", T.STATE, 0), ("S", T.COMPLETE, 0), ("D", T.READY, 0)],
                         ids=["first-state", "complete", "ready"])
def test_cut_before_go_leaves_the_guest_running_on_the_source_only(make_vm, where):
    vm, con = hashchain_vm(make_vm)
    dest, stats = through(vm, lambda d, t, n: (d, t, n) == where, "cut")
    assert stats.state == "failed" and "stays paused" not in stats.error, stats.error
    assert vm.state == "running" and dest.vm is None
    continues(vm, con)


def test_go_lost_keeps_the_source_paused_and_the_destination_never_starts(make_vm):
    vm, con = hashchain_vm(make_vm)
    dest, stats = through(vm, lambda d, t, n: (d, t) == ("S", T.GO), "drop")
    assert stats.state == "failed" and "stays paused" in stats.error, stats.error
    assert vm.state == "paused" and vm.user_paused  # nothing resumes it behind the user
    assert dest.vm is None  # no GO: the destination freed its copy
    vm.resume()  # the user checked the destination and takes the guest back
    continues(vm, con)


def test_running_lost_keeps_the_source_paused_while_the_destination_runs(make_vm):
    vm, con = hashchain_vm(make_vm)
    dest, stats = through(vm, lambda d, t, n: (d, t) == ("D", T.RUNNING), "drop")
    assert stats.state == "failed" and "stays paused" in stats.error, stats.error
    assert vm.state == "paused"
    assert dest.vm is not None and dest.vm.state == "running"
    try:  # exactly one copy runs, and it continues the source's chain
        n = guestkit.check_hashchain(con.text)[0]
        dest.console.wait_for(f"H0 {n + 5} ")
        dest.vm.pause()
        guestkit.check_hashchain(con.text + dest.console.text)
        assert vm.state == "paused"
    finally:
        dest.vm.close()


def test_a_flipped_byte_in_raw_guest_memory_is_refused(make_vm):
    """RAW MEM frames are read straight into the destination's guest RAM before their MAC
    is checked: a tampered one must still end the migration before that guest runs."""
    vm, con = make_vm("ab", "ws=8M", memory=64 * MB)
    con.wait_count(b"B", 2)
    dest, stats = through(vm, lambda d, t, n: (d, t, n) == ("S", T.MEM, 2), "flip",
                          compress="none")
    assert stats.state == "failed", stats.error  # the source may only see the connection go
    assert dest.vm is None and "authentication failed" in str(dest.error), dest.error
    assert vm.state == "running"
    n = con.buf.count(b"B")
    con.wait_count(b"B", n + 2)
    vm.pause()
    guestkit.ab_check(vm.memory.regions[0].array)
