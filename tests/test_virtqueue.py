"""The split virtqueue against a hostile driver: every malformed ring is a QueueError (the
device then needs a reset), never a crash, a hang or an access outside guest RAM."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhyve.devices.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    QueueError,
    Virtqueue,
)

RAM = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


class FakeRam:
    """Guest RAM of RAM bytes; every access outside it is refused like GuestMemory's, and
    recorded, so a test can prove none happened."""

    def __init__(self) -> None:
        self.b = bytearray(RAM)
        self.epoch = 0
        self.outside: list[int] = []
        self.marked: list[tuple[int, int]] = []

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or gpa + n > RAM:
            self.outside.append(gpa)
            raise ValueError("not RAM")

    def read(self, gpa: int, n: int) -> bytes:
        self._check(gpa, n)
        return bytes(self.b[gpa:gpa + n])

    def write(self, gpa: int, data) -> None:
        self._check(gpa, len(data))
        self.b[gpa:gpa + len(data)] = data

    def span(self, gpa: int, n: int) -> memoryview:
        self._check(gpa, n)
        return memoryview(self.b)[gpa:gpa + n]

    def address(self, gpa: int, n: int) -> int:
        import ctypes

        self._check(gpa, n)
        return ctypes.addressof(ctypes.c_char.from_buffer(self.b)) + gpa

    def mark_written(self, gpa: int, n: int) -> None:
        self.marked.append((gpa, n))


def queue(ram: FakeRam, size: int = 8, event_idx: bool = False) -> Virtqueue:
    q = Virtqueue(max_size=256, size=size, desc=DESC, avail=AVAIL, used=USED, ready=True,
                  event_idx=event_idx)
    q.check_layout(ram)
    return q


def desc(ram: FakeRam, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
         table: int = DESC) -> None:
    struct.pack_into("<QIHH", ram.b, table + 16 * i, addr, length, flags, nxt)


def offer(ram: FakeRam, q: Virtqueue, *heads: int) -> None:
    idx = struct.unpack_from("<H", ram.b, AVAIL + 2)[0]
    for h in heads:
        struct.pack_into("<H", ram.b, AVAIL + 4 + 2 * (idx % q.size), h)
        idx = (idx + 1) & 0xFFFF
    struct.pack_into("<H", ram.b, AVAIL + 2, idx)


def test_a_chain_is_read_and_completed():
    ram = FakeRam()
    q = queue(ram)
    ram.b[0x10000:0x10004] = b"ping"
    desc(ram, 0, 0x10000, 4, DESC_F_NEXT, 3)
    desc(ram, 3, 0x20000, 16, DESC_F_WRITE)
    offer(ram, q, 0)
    c = q.pop(ram)
    assert c.head == 0 and c.read(ram) == b"ping" and c.out_room == 16
    assert c.write(ram, b"pong") == 4 and ram.b[0x20000:0x20004] == b"pong"
    q.push(ram, c.head, 4)
    assert struct.unpack_from("<HHII", ram.b, USED) == (0, 1, 0, 4)
    assert q.pop(ram) is None and q.should_signal(ram) and not q.should_signal(ram)


def test_host_addresses_found_by_the_walk_are_not_used_once_guest_ram_moved(monkeypatch):
    """spans() reuses the addresses the descriptor walk looked up (one lookup a buffer, not
    two), but not after the memory's epoch changed: its mapping may be elsewhere now (a
    disk's AIO into the old address would write host memory that is no longer the
    guest's)."""
    ram = FakeRam()
    q = queue(ram)
    desc(ram, 0, 0x10000, 16, DESC_F_NEXT, 1)
    desc(ram, 1, 0x20000, 4096, DESC_F_WRITE | DESC_F_NEXT, 2)
    desc(ram, 2, 0x30000, 1, DESC_F_WRITE)
    offer(ram, q, 0)
    c = q.pop(ram)
    base = ram.address(0, 1)
    assert c.spans(ram, True, 0, 4096) == [(base + 0x20000, 4096)]
    assert c.spans(ram, False, 8, 8) == [(base + 0x10008, 8)]
    looked: list[int] = []
    monkeypatch.setattr(ram, "address", lambda gpa, n: looked.append(gpa) or 7 << 40)
    assert c.spans(ram, True, 0, 4097) == [(base + 0x20000, 4096), (base + 0x30000, 1)]
    assert looked == []  # the walk's addresses
    ram.epoch += 1  # e.g. post-copy gave some pages back: mappings are taken again
    assert c.spans(ram, True, 0, 4097) == [(7 << 40, 4096), (7 << 40, 1)]
    assert looked == [0x20000, 0x30000]


def test_a_batch_of_completions_publishes_the_used_index_once_past_the_ring_end():
    ram = FakeRam()
    q = queue(ram, size=4)
    q.next_used = 0xFFFE  # the index wraps inside the batch
    ram.marked.clear()
    q.push_many(ram, [(3, 10), (1, 11), (2, 12)])
    entries = [struct.unpack_from("<II", ram.b, USED + 4 + 8 * i) for i in range(4)]
    assert entries[2:] == [(3, 10), (1, 11)] and entries[0] == (2, 12)  # slots 2, 3, then 0
    assert struct.unpack_from("<H", ram.b, USED + 2)[0] == 1 == q.next_used
    assert ram.marked == [(USED, 4 + 8 * 4)]  # one dirty mark for the batch
    assert q.should_signal(ram) and not q.should_signal(ram)  # one interrupt for it


def test_indirect_descriptors():
    ram = FakeRam()
    q = queue(ram)
    table = 0x40000
    desc(ram, 0, 0x10000, 8, DESC_F_NEXT, 1, table=table)
    desc(ram, 1, 0x20000, 8, DESC_F_WRITE, table=table)
    desc(ram, 5, table, 32, DESC_F_INDIRECT)
    offer(ram, q, 5)
    c = q.pop(ram)
    assert c.head == 5 and [s.gpa for s in c.readable + c.writable] == [0x10000, 0x20000]


def test_event_index_asks_for_notifications_and_suppresses_interrupts():
    ram = FakeRam()
    q = queue(ram, event_idx=True)
    for i in range(3):
        desc(ram, i, 0x10000, 4, DESC_F_WRITE)
    assert q.pop(ram) is None
    assert struct.unpack_from("<H", ram.b, USED + 4 + 8 * 8)[0] == 0  # avail_event
    offer(ram, q, 0, 1, 2)
    struct.pack_into("<H", ram.b, AVAIL + 4 + 2 * 8, 2)  # used_event: after the third
    for _ in range(2):
        q.push(ram, q.pop(ram).head, 0)
    assert not q.should_signal(ram)
    q.push(ram, q.pop(ram).head, 0)
    assert q.should_signal(ram)
    assert q.pop(ram) is None and struct.unpack_from("<H", ram.b, USED + 4 + 64)[0] == 3


@pytest.mark.parametrize("case,match", [
    ("loop", "loops"),
    ("next-out-of-table", "outside a table"),
    ("head-out-of-table", "outside a table"),
    ("buffer-outside-ram", "not RAM"),
    ("buffer-ends-outside-ram", "not RAM"),
    ("huge", "more than"),
    ("indirect-nested", "nested"),
    ("indirect-chained", "chained"),
    ("indirect-ragged", "indirect table of"),
    ("indirect-empty", "indirect table of"),
    ("read-after-write", "follows a writable"),
    ("avail-jump", "more than the queue size"),
])
def test_each_hostile_ring_is_a_queue_error(case, match, monkeypatch):
    import pyhyve.devices.virtio.queue as vq

    monkeypatch.setattr(vq, "MAX_CHAIN_BYTES", 4 * RAM)  # so 8 x RAM is too much here
    ram = FakeRam()
    q = queue(ram)
    head = 0
    if case == "loop":
        desc(ram, 0, 0x10000, 4, DESC_F_NEXT, 1)
        desc(ram, 1, 0x10000, 4, DESC_F_NEXT, 0)
    elif case == "next-out-of-table":
        desc(ram, 0, 0x10000, 4, DESC_F_NEXT, 8)
    elif case == "head-out-of-table":
        head = 200
    elif case == "buffer-outside-ram":
        desc(ram, 0, RAM + 0x1000, 4)
    elif case == "buffer-ends-outside-ram":
        desc(ram, 0, RAM - 8, 0xFFFF_FFFF)
    elif case == "huge":
        for i in range(8):
            desc(ram, i, 0, RAM, DESC_F_NEXT if i < 7 else 0, i + 1)
    elif case == "indirect-nested":
        desc(ram, 0, 0x40000, 16, DESC_F_INDIRECT)
        desc(ram, 0, 0x50000, 16, DESC_F_INDIRECT, table=0x40000)
    elif case == "indirect-chained":
        desc(ram, 0, 0x40000, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    elif case == "indirect-ragged":
        desc(ram, 0, 0x40000, 20, DESC_F_INDIRECT)
    elif case == "indirect-empty":
        desc(ram, 0, 0x40000, 0, DESC_F_INDIRECT)
    elif case == "read-after-write":
        desc(ram, 0, 0x10000, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
        desc(ram, 1, 0x10000, 4)
    if case == "avail-jump":
        struct.pack_into("<H", ram.b, AVAIL + 2, 9)
    else:
        offer(ram, q, head)
    with pytest.raises(QueueError, match=match):
        q.pop(ram)
    assert not [a for a in ram.outside if case not in ("buffer-outside-ram",
                                                        "buffer-ends-outside-ram")]


def test_rings_outside_ram_or_misaligned_and_bad_sizes_are_refused():
    ram = FakeRam()
    for kw, match in (({"size": 6}, "power of two"), ({"size": 512}, "power of two"),
                      ({"desc": DESC + 8}, "aligned"), ({"used": RAM - 8}, "not RAM")):
        q = Virtqueue(max_size=256, **{"size": 8, "desc": DESC, "avail": AVAIL, "used": USED,
                                       **kw})
        with pytest.raises(QueueError, match=match):
            q.check_layout(ram)


@settings(max_examples=150, deadline=None)
@given(descs=st.lists(st.tuples(st.integers(0, RAM + 4096), st.integers(0, 1 << 32 - 1),
                                st.integers(0, 7), st.integers(0, 0xFFFF)),
                      min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8),
       avail_idx=st.integers(0, 0xFFFF))
def test_any_ring_contents_give_chains_or_queue_errors(descs, heads, avail_idx):
    """Random descriptor tables and rings: pop returns chains inside RAM or raises a
    QueueError; nothing else escapes and nothing outside RAM is touched."""
    ram = FakeRam()
    q = queue(ram)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        desc(ram, i, addr, length % (1 << 32), flags, nxt)
        if flags & DESC_F_INDIRECT:  # give indirect tables something to point at
            desc(ram, 0, addr % RAM, 16, flags & 3, nxt, table=0x60000)
    for i, h in enumerate(heads):
        struct.pack_into("<H", ram.b, AVAIL + 4 + 2 * i, h)
    struct.pack_into("<H", ram.b, AVAIL + 2, avail_idx)
    for _ in range(10):
        try:
            c = q.pop(ram)
        except QueueError:
            break
        if c is None:
            break
        for s in c.readable + c.writable:
            assert s.gpa >= 0 and s.gpa + s.length <= RAM
        q.push(ram, c.head, 0)


def test_guest_memory_s_inline_window_checks_every_buffer_like_address_does():
    """With real guest RAM the walk checks and translates buffers inline (one window, not
    a lookup per descriptor): a buffer inside gets the address address() gives; one that
    starts past the end, or starts inside and runs past it, is a QueueError all the same;
    while post-copy may have a page missing there is no window (every access prepares)."""
    from pyhyve.machine.memory import GuestMemory

    mem = GuestMemory(RAM, name="pyhyve-test")
    try:
        view = mem.span(0, RAM)
        ram = FakeRam()
        ram.b = view  # the fake's rings, in real guest RAM
        q = queue(ram)
        for last_addr, last_len in ((RAM - 64, 64), (RAM - 64, 65), (RAM, 1)):
            desc(ram, 0, 0x10000, 16, DESC_F_NEXT, 1)
            desc(ram, 1, last_addr, last_len, DESC_F_WRITE)
            offer(ram, q, 0)
            if last_addr + last_len <= RAM:
                c = q.pop(mem)
                assert c.spans(mem, True, 0, last_len) == [(mem.address(last_addr, 64), 64)]
            else:
                with pytest.raises(QueueError):
                    q.pop(mem)
        assert mem.window() is not None
        mem.prepare = lambda gpa, n: None
        assert mem.window() is None
        mem.prepare = None
        view.release()
    finally:
        mem.close()
