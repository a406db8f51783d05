"""Bulk copies on every core (pipeline/spread.py) and the eager loader built on them."""

from __future__ import annotations

import os
import threading

import pytest

from pyhyve.machine.memory import PAGE, GuestMemory
from pyhyve.pipeline.spread import spread
from pyhyve.snapshot.memfile import load_eager

MB = 1 << 20


def test_every_item_is_worked_once_and_on_more_than_one_thread_when_there_are_cores():
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def work(part):
        for x in part:
            with lock:
                seen.append((x, threading.current_thread().name))
    spread(work, list(range(100)))
    assert sorted(x for x, _ in seen) == list(range(100))
    if (os.cpu_count() or 1) > 1:
        assert len({name for _, name in seen}) > 1


def test_a_share_that_fails_is_raised_on_the_callers_thread_after_all_ended():
    done: list[int] = []

    def work(part):
        if 1 in part:
            raise ValueError("share failed")
        done.extend(part)
    with pytest.raises(ValueError, match="share failed"):
        spread(work, list(range(8)))
    if (os.cpu_count() or 1) == 1:
        assert done == []


def test_load_eager_copies_the_runs_and_leaves_the_rest_zero(tmp_path):
    size = 32 * MB
    path = tmp_path / "mem"
    data = bytearray(size)
    for page in (0, 1, 700, 4095, 5000):  # runs across several 8 MiB pieces
        data[page * PAGE:(page + 1) * PAGE] = bytes([page % 251 + 1]) * PAGE
    data[3000 * PAGE:3000 * PAGE + 9 * MB] = b"\x07" * (9 * MB)
    path.write_bytes(data)
    runs = [(0, 2), (700, 1), (3000, 9 * MB // PAGE), (5000, 1)]
    mem = GuestMemory(size, name="pyhyve-test")
    fd = os.open(path, os.O_RDONLY)
    try:
        load_eager(mem, fd, runs)
        got = mem.read(0, size)
    finally:
        os.close(fd)
        mem.close()
    want = bytearray(size)
    for p, n in runs:
        want[p * PAGE:(p + n) * PAGE] = data[p * PAGE:(p + n) * PAGE]
    assert got == want  # page 4095 holds data in the file, but no run names it


def test_load_eager_from_a_file_cut_short_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "mem"
    path.write_bytes(b"\x01" * (4 * MB))  # the runs reach 16 MiB
    mem = GuestMemory(32 * MB, name="pyhyve-test")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="ends inside its data"):
            load_eager(mem, fd, [(0, 16 * MB // PAGE)])
    finally:
        os.close(fd)
        mem.close()
