"""Hot pages (migration/hot.py): regions whose sampled pages change between reads are hot,
all of their data pages and nothing else; a big guest gets bigger regions, never more than
MAX_SAMPLES pages read. No KVM: the memory is a stand-in the test writes to."""

from __future__ import annotations

import threading

import numpy as np

from pyhyve.machine.memory import PAGE
from pyhyve.migration import hot


class Pages:
    """Guest memory as sparse pages, with a writer that bumps some of them meanwhile."""

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.reads = 0

    def file_view(self, off: int, n: int) -> bytes:
        assert n == PAGE and off % PAGE == 0
        self.reads += 1
        return self.pages.get(off // PAGE, bytes(PAGE))

    def rewrite(self, pages: list[int], stop: threading.Event) -> None:
        v = 0
        while not stop.wait(0.001):
            v = (v + 1) % 256
            for p in pages:
                self.pages[p] = bytes([v]) + bytes(PAGE - 1)


def run(mem: Pages, data: np.ndarray, rewritten: list[int]):
    stop = threading.Event()
    t = threading.Thread(target=mem.rewrite, args=(rewritten, stop))
    t.start()
    try:
        return hot.find_hot(mem, data)  # type: ignore[arg-type]
    finally:
        stop.set()
        t.join()


def test_the_regions_of_rewritten_pages_are_hot_and_only_their_data_pages():
    n = 64 * hot.REGION
    data = np.zeros(n, dtype=bool)
    data[: 10 * hot.REGION] = True         # ten regions of data
    data[20 * hot.REGION + 7] = True       # and a lone page, in region 20
    mem = Pages()
    # a page of region 3 that is sampled (the first of its data pages), and the lone page
    got, sample = run(mem, data, [3 * hot.REGION, 20 * hot.REGION + 7])
    assert got is not None
    want = np.zeros(n, dtype=bool)
    want[3 * hot.REGION:4 * hot.REGION] = True
    want[20 * hot.REGION + 7] = True
    assert (got == want).all()
    assert len(sample) == 2 * PAGE  # the changed samples, to gauge their encoding
    assert mem.reads == (hot.WINDOWS + 1) * (10 * hot.PER_REGION + 1)


def test_nothing_rewritten_is_nothing_hot():
    data = np.ones(8 * hot.REGION, dtype=bool)
    assert hot.find_hot(Pages(), data) == (None, b"")  # type: ignore[arg-type]
    assert hot.find_hot(Pages(), np.zeros(8, dtype=bool)) == (None, b"")  # type: ignore[arg-type]


def test_a_big_guest_gets_bigger_regions_and_a_bounded_sample():
    n = (64 << 30) // PAGE  # 64 GiB, all of it data
    data = np.ones(n, dtype=bool)
    mem = Pages()
    got, _ = run(mem, data, [0])  # the first data page of region 0 is always sampled
    assert mem.reads <= (hot.WINDOWS + 1) * hot.MAX_SAMPLES
    region = n * hot.PER_REGION // hot.MAX_SAMPLES  # doubled until the sample fits
    assert got is not None and int(got.sum()) == region and got[:region].all()
