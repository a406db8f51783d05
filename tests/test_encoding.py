"""MEM frame bodies decoded into memory (migration/encoding.py): through the host's libzstd
and liblz4 and through the Python modules, the same bytes or the same refusal."""

from __future__ import annotations

import contextlib
import ctypes as C
import os

import lz4.block
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhyve.migration.encoding import Decoder, _native
from pyhyve.migration.protocol import Enc, ProtocolError

SIZE = 64 * 4096
DATA = (b"\x01" + bytes(4095)) * 48 + os.urandom(16 * 4096)
BODIES = {Enc.ZSTD: zstandard.ZstdCompressor(level=1).compress(DATA),
          Enc.LZ4: lz4.block.compress(DATA, store_size=False)}
DECODERS = [pytest.param(True, id="libraries"), pytest.param(False, id="modules")]


def test_the_host_has_the_libraries():
    """Our hosts have libzstd and liblz4: if this fails, migration silently takes the
    slower path everywhere."""
    assert _native() is not None


def _into(decoder: Decoder, enc: int, body: bytes, size: int = SIZE) -> bytes:
    out = bytearray(b"\xee" * size)  # a stale page must not show through
    decoder.into(enc, memoryview(bytearray(body)), C.addressof(C.c_char.from_buffer(out)), size)
    return bytes(out)


@pytest.mark.parametrize("native", DECODERS)
@pytest.mark.parametrize("enc", [Enc.ZSTD, Enc.LZ4])
def test_a_compressed_body_decodes_to_its_pages(native, enc):
    assert _into(Decoder(native), enc, BODIES[enc]) == DATA


@pytest.mark.parametrize("native", DECODERS)
def test_raw_and_zero_bodies(native):
    d = Decoder(native)
    assert _into(d, Enc.RAW, DATA) == DATA
    assert _into(d, Enc.ZERO, b"") == bytes(SIZE)


@pytest.mark.parametrize("native", DECODERS)
@pytest.mark.parametrize("enc", [Enc.ZSTD, Enc.LZ4])
def test_a_body_that_decodes_to_another_size_is_refused(native, enc):
    with pytest.raises(ProtocolError):  # larger than announced: never past the buffer
        _into(Decoder(native), enc, BODIES[enc], SIZE - 4096)
    short = {Enc.ZSTD: zstandard.ZstdCompressor(level=1).compress(DATA[:-4096]),
             Enc.LZ4: lz4.block.compress(DATA[:-4096], store_size=False)}[enc]
    with pytest.raises(ProtocolError):
        _into(Decoder(native), enc, short)


@settings(max_examples=200, deadline=None)
@given(enc=st.sampled_from([Enc.ZSTD, Enc.LZ4]), junk=st.binary(min_size=1, max_size=600),
       cut=st.integers(min_value=1, max_value=40))
def test_corrupt_bodies_are_refused_and_never_write_past_the_pages(enc, junk, cut):
    body = BODIES[enc][:cut] + junk
    for native in (True, False):
        guard = bytearray(b"\xab" * (SIZE + 8192))
        base = C.addressof(C.c_char.from_buffer(guard))
        with contextlib.suppress(ProtocolError):
            Decoder(native).into(enc, memoryview(bytearray(body)), base + 4096, SIZE)
        assert guard[:4096] == b"\xab" * 4096 and guard[-4096:] == b"\xab" * 4096


def test_auto_is_lz4_in_the_pause_and_zstd_while_the_guest_runs():
    """The guest waits on the encoder only while paused: there auto takes the faster lz4.
    Either way data that does not compress goes raw, never larger."""
    from pyhyve.migration.encoding import encoder

    chunk = memoryview(DATA[:48 * 4096])
    assert encoder("auto", paused=True)(chunk)[0] == Enc.LZ4
    assert encoder("auto")(chunk)[0] == Enc.ZSTD
    noise = memoryview(os.urandom(16 * 4096))
    for paused in (False, True):
        enc, body = encoder("auto", paused=paused)(noise)
        assert enc == Enc.RAW and bytes(body) == bytes(noise)
    assert encoder("zstd", paused=True)(chunk)[0] == Enc.ZSTD  # an explicit choice stays
