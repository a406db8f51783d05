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
        assert list(data_chunks(fd, SIZE)) == [1, 0, 0, 1, 1, 0, 0, 0, 1]  # 64 KiB each
    finally:
        os.close(fd)


def test_a_copy_that_fails_ends_and_writes_go_through(tmp_path, monkeypatch):
    fd = image(str(tmp_path / "d"), [0, 2 * CHUNK])
    out = os.open(tmp_path / "c", os.O_RDWR | os.O_CREAT, 0o600)

    def full(*_a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(diskcopy, "pwrite_all", full)
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


def test_a_big_stale_file_is_emptied_in_steps_unless_someone_has_it_open(tmp_path,
                                                                        monkeypatch):
    """An old generation's disk copy goes a step at a time (one long journal commit would
    stall a running guest's disk). One that a VM has open as its disk stays, whole: gone
    by name, the VM's writes would be lost when it exits. One with another name (a hard
    link: a backup) is only unlinked, its content whole under that name."""
    from pyhyve.snapshot import files

    monkeypatch.setattr(files, "TRUNCATE_STEP", 1 << 20)
    free, used, linked = (tmp_path / f"{n}.g1.disk0" for n in "abc")
    for p in (free, used, linked):
        p.write_bytes(b"\x42" * (4 << 20))
    os.link(linked, tmp_path / "backup.img")
    held = os.open(used, os.O_RDWR)  # a VM bound to it
    steps: list[int] = []
    real = os.ftruncate

    def step(fd: int, size: int) -> None:
        steps.append(size)
        real(fd, size)
    monkeypatch.setattr(os, "ftruncate", step)
    try:
        assert files.remove([str(free), str(used), str(linked)]) == [str(free), str(linked)]
        assert not free.exists() and used.exists() and not linked.exists()
        assert steps == [3 << 20, 2 << 20, 1 << 20]  # the free one's, none of the others'
        assert os.pread(held, 5 << 20, 0) == b"\x42" * (4 << 20)
        assert (tmp_path / "backup.img").read_bytes() == b"\x42" * (4 << 20)
    finally:
        os.close(held)


def test_a_chunk_written_while_the_copier_reads_it_keeps_its_old_data(tmp_path, monkeypatch):
    """The copier has taken a run of chunks to read; before its read the device copies
    one of them itself and writes it. What the copier then reads of that chunk is new
    data and must not reach the copy."""
    fd = image(str(tmp_path / "d"), [0, 64 << 10])
    out = os.open(tmp_path / "c", os.O_RDWR | os.O_CREAT, 0o600)
    before = os.pread(fd, SIZE, 0)
    reading, written = threading.Event(), threading.Event()
    real = diskcopy._read_all

    def read(f: int, length: int, offset: int) -> bytes:
        if threading.current_thread().name == "disk-copy":
            reading.set()
            written.wait(10)
        return real(f, length, offset)
    monkeypatch.setattr(diskcopy, "_read_all", read)
    copy = DiskCopy(fd, out, SIZE)
    try:
        copy.start()
        assert reading.wait(10)
        copy.before(CHUNK, 4096)  # chunk 1, inside the run the copier is about to read
        os.pwrite(fd, b"\xee" * 4096, CHUNK)
        written.set()
        copy.finish()
        assert os.pread(out, SIZE + 1, 0) == before
    finally:
        written.set()
        copy.cancel()
        copy.close()
        os.close(fd)
        os.close(out)
