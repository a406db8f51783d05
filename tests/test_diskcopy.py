"""A checkpoint's copy of a disk (devices/virtio/diskcopy.py): whatever the device writes
after the pause, and whenever the copier gets there, the copy is the disk at the pause."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhyve.devices.virtio import diskcopy
from pyhyve.devices.virtio.diskcopy import CHUNK, DiskCopy, data_chunks
from pyhyve.devices.virtio.image import zero_range

SIZE = 8 * CHUNK + 4096  # a ragged last chunk

writes = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * CHUNK),
                            st.booleans()), max_size=12)


def image(path: str, data_at: list[int]) -> int:
    """A sparse image with 64 KiB of data at each offset; returns an O_RDWR fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, SIZE)
    for off in data_at:
        os.pwrite(fd, os.urandom(64 << 10)[:SIZE - off], off)
    return fd


@settings(max_examples=40, deadline=None)
@given(data_at=st.lists(st.integers(0, SIZE - 1), max_size=5), changes=writes,
       copier_first=st.integers(0, 12))
def test_the_copy_is_the_disk_at_the_pause_whatever_is_written_after(tmp_path_factory, data_at,
                                                                     changes, copier_first):
    d = tmp_path_factory.mktemp("dc")
    fd = image(str(d / "disk"), data_at)
    out = os.open(d / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    before = os.pread(fd, SIZE, 0)
    holes = data_chunks(fd, SIZE)
    gate = threading.Event()
    run = DiskCopy._run

    copy = DiskCopy(fd, out, SIZE)
    copy._run = lambda: (gate.wait(), run(copy))  # type: ignore[method-assign]
    copy.start()
    try:
        for i, (off, n, discard) in enumerate(changes):
            if i == copier_first:
                gate.set()  # the copier runs alongside the rest
            n = min(n, SIZE - off)
            copy.before(off, n)
            if discard:
                zero_range(fd, off, n)
            else:
                os.pwrite(fd, bytes([i + 1]) * n, off)
        gate.set()
        copy.finish()
        assert os.pread(out, SIZE + 1, 0) == before
        got = data_chunks(out, SIZE)  # a hole at the pause is a hole of the copy
        assert all(h or not g for h, g in zip(holes, got, strict=True))
    finally:
        gate.set()
        copy.cancel()
        copy.close()
        os.close(fd)
        os.close(out)


def test_data_chunks_finds_the_holes(tmp_path):
    fd = image(str(tmp_path / "d"), [0, 3 * CHUNK + 8192 + 10, 8 * CHUNK])
    try:
        assert list(data_chunks(fd, SIZE)) == [1, 0, 0, 1, 0, 0, 0, 0, 1]
    finally:
        os.close(fd)


def test_a_copy_that_fails_ends_and_writes_go_through(tmp_path, monkeypatch):
    fd = image(str(tmp_path / "d"), [0, 2 * CHUNK])
    out = os.open(tmp_path / "c", os.O_RDWR | os.O_CREAT, 0o600)

    def full(*_a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(diskcopy, "_copy_range", full)
    copy = DiskCopy(fd, out, SIZE)
    try:
        copy.before(0, 4096)  # the write that met the full disk goes on, and the next
        copy.before(2 * CHUNK, 4096)
        assert copy.left == 0 and not any(copy.pending)
        copy.start()
        with pytest.raises(OSError, match="No space"):
            copy.finish()
    finally:
        copy.close()
        os.close(fd)
        os.close(out)
