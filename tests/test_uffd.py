"""Pages that arrive while the guest runs (post-copy's destination side): a missing page
is served from the page source on first touch, the rest pushed in the background, a
never-written page reads as zeros, and the guest -- a vCPU faulting inside KVM_RUN --
goes on as if the memory had always been there."""

from __future__ import annotations

import ctypes as C
import threading
import time

import numpy as np
import pytest

from pyhyve import guestkit
from pyhyve.machine.memory import PAGE, GuestMemory
from pyhyve.machine.uffd import PageServer

MB = 1 << 20


def pattern(first: int, count: int) -> bytes:
    """Page p holds p's number in every 8 bytes."""
    return np.repeat(np.arange(first, first + count, dtype=np.uint64), PAGE // 8).tobytes()


def read_page(addr: int) -> bytes:
    """Through ctypes.memmove, which drops the GIL: the server needs it to serve us."""
    buf = C.create_string_buffer(PAGE)
    C.memmove(buf, addr, PAGE)
    return buf.raw


def test_missing_pages_come_on_first_touch_and_the_rest_by_push() -> None:
    mem = GuestMemory(8 * MB)
    base = mem.regions[0].host_addr
    missing = np.zeros(mem.size // PAGE, dtype=bool)
    missing[:1024] = True                      # 4 MiB to come; the rest never written
    calls = []

    def source(first: int, count: int) -> bytes:
        calls.append((first, count))
        time.sleep(0.1)                        # a slow link: touches outrun the push
        return pattern(first, count)

    mem.regions[0].mm[:1024 * PAGE] = b"\xee" * (1024 * PAGE)  # stale: must be replaced
    server = PageServer(mem, missing, source)
    server.drop_missing()
    server.start()
    got: dict[int, bytes] = {}
    left_at_zero_page: list[int] = []

    def reader() -> None:                      # a zero page, then against the push
        for p in (1500, 1023, 700, 300, 5, 2047):
            got[p] = read_page(base + p * PAGE)
            if p == 1500:                      # served at once, not when all is in
                left_at_zero_page.append(server.left)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        t.join(10)  # about 0.3 s: the source's 0.1 s per call
        assert not t.is_alive() and server.done.wait(10), server.error
        assert server.error is None and server.left == 0
        for p, data in got.items():
            assert data == (pattern(p, 1) if p < 1024 else bytes(PAGE)), p
        assert server.faults_served >= 1 and left_at_zero_page[0] > 0
        assert bytes(mem.regions[0].mm[:1024 * PAGE]) == pattern(0, 1024)
        assert sum(n for _, n in calls) == 1024    # each page fetched once
    finally:
        server.stop()  # closing the userfaultfd wakes a reader still waiting
        t.join(10)
        mem.close()


def test_a_page_source_error_is_reported_not_hidden() -> None:
    mem = GuestMemory(4 * MB)
    missing = np.zeros(mem.size // PAGE, dtype=bool)
    missing[:16] = True
    server = PageServer(mem, missing, lambda first, count: b"short")
    server.drop_missing()
    server.start()
    deadline = time.monotonic() + 10
    while server.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.error is not None and "page source gave 5 bytes" in str(server.error)
    assert not server.done.is_set()
    server.stop()
    mem.close()


@pytest.mark.kvm
def test_a_guest_runs_on_pages_that_arrive_after_it_resumed(make_vm) -> None:
    """The A-B guest's working set is taken away while it is paused and comes back only
    through the server once it runs again: its passes go on, the invariant holds."""
    vm, con = make_vm("ab", "ws=16M", memory=64 * MB)
    con.wait_count(b"B", 3)
    vm.pause()
    ram = vm.memory.regions[0].array
    image = ram.copy()
    before = guestkit.ab_check(image)
    ws = slice(before.ws_start // PAGE, (before.ws_start + before.ws_size) // PAGE)
    missing = np.zeros(vm.memory.size // PAGE, dtype=bool)
    missing[ws] = True
    def source(first: int, count: int) -> memoryview:
        time.sleep(0.01)                       # a link, not memory: the guest gets ahead
        return image[first * PAGE:(first + count) * PAGE].data

    server = PageServer(vm.memory, missing, source)
    server.drop_missing()
    n = con.buf.count(b"B")
    vm.resume()                                # its vCPU faults and waits for the server
    time.sleep(0.05)
    server.start()
    assert server.done.wait(60), server.error
    con.wait_count(b"B", n + 3)
    vm.pause()
    after = guestkit.ab_check(ram)
    assert after.passes >= before.passes + 2
    assert server.error is None
    assert server.faults_served >= 1  # the vCPU itself waited on a page at least once
    server.stop()


RING_SCRIPT = r"""
import struct, sys, time
import numpy as np
from pyhyve.devices.virtio.queue import Virtqueue
from pyhyve.machine.memory import PAGE, GuestMemory
from pyhyve.machine.uffd import PageServer

mem = GuestMemory(16 << 20)
DESC, AVAIL, USED, BUF = 0x100000, 0x101000, 0x102000, 0x200000
q = Virtqueue(max_size=8)
q.ready, q.desc, q.avail, q.used = True, DESC, AVAIL, USED
mem.write(DESC, struct.pack("<QIHH", BUF, 512, 0, 0))      # one request, 512 bytes at BUF
mem.write(AVAIL + 4, struct.pack("<H", 0))
mem.write(AVAIL + 2, struct.pack("<H", 1))
mem.write(BUF, b"payload!" * 64)
q.check_layout(mem)
assert q.pending(mem) == 1     # a look at the rings before post-copy starts: views kept
source = bytes(mem.regions[0].mm)

def slow(first, count):        # the source is far away: nothing is here at once
    time.sleep(0.3)
    return source[first * PAGE:(first + count) * PAGE]

missing = np.zeros(mem.size // PAGE, dtype=bool)
missing[DESC // PAGE:USED // PAGE + 1] = True
missing[BUF // PAGE] = True
ps = PageServer(mem, missing, slow)
ps.drop_missing()
ps.start()
chain = q.pop(mem)             # a device thread, holding Python's lock, reads the rings
data = b"".join(bytes(v) for v in chain.views(mem, False, 0, 512))
print("popped", chain.head, data[:8].decode(), ps.prepared_missing > 0, flush=True)
ps.stop()
"""


def test_a_device_reading_rings_viewed_before_the_switch_waits_for_them(tmp_path):
    """A device that looked at its rings before the switch holds views of them; post-copy
    then drops those pages. A device thread reading its rings right after the switch must
    wait for them without holding Python's lock (the page server needs it): the views are
    taken again, through `prepare`. Run in a child, since the failure this guards against is a process that
    hangs for good."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", RING_SCRIPT], capture_output=True, text=True,
                       timeout=15)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["popped", "0", "payload!", "True"], p.stdout


def test_an_aborted_server_refuses_our_accesses_to_pages_that_never_came():
    """The VM closes with pages still on the source: what waited wakes (the kernel then
    gives zeros), so every access of ours is refused from then on, and no device acts on
    those zeros (a disk write of a buffer that never arrived)."""
    mem = GuestMemory(16 * MB)
    try:
        missing = np.zeros(mem.size // PAGE, dtype=bool)
        missing[256:512] = True
        ps = PageServer(mem, missing)  # remote mode: nobody will bring them
        ps.drop_missing()
        ps.abort()
        with pytest.raises(ValueError, match="never arrived"):
            mem.read(300 * PAGE, 16)
        with pytest.raises(ValueError, match="never arrived"):
            mem.write(5 * PAGE, b"x")  # any access: the VM is closing
    finally:
        mem.close()
