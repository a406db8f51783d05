"""How MEM frames carry pages: raw, zstd, lz4, or a zero run. The sender picks an
encoding per chunk; the receiver decodes into exactly the announced size or refuses."""

from __future__ import annotations

import ctypes as C
from collections.abc import Callable

import lz4.block
import zstandard

from ..machine.memory import PAGE
from .protocol import Enc, ProtocolError

Encoder = Callable[[memoryview], tuple[int, bytes | memoryview]]
SAMPLE_PAGES = 4
COMPRESSIONS = ("auto", "none", "zstd", "lz4")


def encoder(kind: str, paused: bool = False) -> Encoder:
    """The chunk encoder for `--compress KIND`; never larger than raw. auto is lz4 while
    the guest is paused (it compresses about three times as fast as zstd-1, which is what
    the guest waits on then) and zstd-1 while it runs (fewer bytes for the same link)."""
    if kind == "lz4" or (kind == "auto" and paused):
        def lz4c(chunk: memoryview) -> tuple[int, bytes | memoryview]:
            c = lz4.block.compress(chunk, store_size=False)
            return (Enc.LZ4, c) if len(c) < len(chunk) else (Enc.RAW, chunk)
        return lz4c
    if kind in ("auto", "zstd"):
        z = zstandard.ZstdCompressor(level=1)

        def zstd(chunk: memoryview) -> tuple[int, bytes | memoryview]:
            if kind == "auto" and not _worth_it(z, chunk):
                return Enc.RAW, chunk
            c = z.compress(chunk)
            return (Enc.ZSTD, c) if len(c) < len(chunk) else (Enc.RAW, chunk)
        return zstd
    return lambda chunk: (Enc.RAW, chunk)


def _worth_it(z: zstandard.ZstdCompressor, chunk: memoryview) -> bool:
    """auto: zstd-1 where a 4-page sample halves or better, so data that does not
    compress costs a sample, not a pass."""
    n = len(chunk) // PAGE
    if n < 2 * SAMPLE_PAGES:
        return True
    step = n // SAMPLE_PAGES
    sample = b"".join(chunk[i * step * PAGE:(i * step + 1) * PAGE] for i in range(SAMPLE_PAGES))
    return len(z.compress(sample)) * 2 <= len(sample)


class Decoder:
    """Decodes MEM bodies. `into` places them straight in memory of the caller's (guest
    RAM, a scratch buffer) through the host's libzstd and liblz4 when it has them: ctypes
    drops the GIL, and no 8 MiB result is allocated and copied per frame (64 MiB of the
    A-B guest's pages: ~15 ms against ~50 ms through the Python modules). Without them,
    the modules decode and the result is copied. Either way a body must decode to exactly
    the announced size, or it is refused."""

    def __init__(self, native: bool = True) -> None:
        self.zd = zstandard.ZstdDecompressor()
        self._lib = _native() if native else None

    def decode(self, enc: int, body: memoryview, size: int) -> memoryview | None:
        return decode(enc, body, size, self.zd)

    def into(self, enc: int, body: memoryview, addr: int, size: int) -> None:
        """Decode to host memory [addr, addr+size); ZERO fills it with zeros."""
        lib = self._lib
        if lib is None or enc not in (Enc.ZSTD, Enc.LZ4) or not len(body):
            data = decode(enc, body, size, self.zd)
            if data is None:
                C.memset(addr, 0, size)
            else:
                src = _buffer(data)  # held until the copy is done
                C.memmove(addr, C.addressof(src), size)
            return
        src = _buffer(body)
        if enc == Enc.ZSTD:
            got = lib.zstd.ZSTD_decompress(addr, size, C.addressof(src), len(body))
            if lib.zstd.ZSTD_isError(got) or got != size:
                raise ProtocolError("corrupt zstd data in MEM frame")
        elif lib.lz4.LZ4_decompress_safe(C.addressof(src), addr, len(body), size) != size:
            raise ProtocolError("corrupt lz4 data in MEM frame")


class _Libs:
    def __init__(self, zstd: C.CDLL, lz4: C.CDLL) -> None:
        self.zstd, self.lz4 = zstd, lz4


def _native() -> _Libs | None:
    """libzstd and liblz4 as the host has them (Debian: libzstd1 is required, liblz4-1
    nearly so); None if either is missing."""
    try:
        zstd, lz4 = C.CDLL("libzstd.so.1"), C.CDLL("liblz4.so.1")
    except OSError:
        return None
    zstd.ZSTD_decompress.restype = C.c_size_t
    zstd.ZSTD_decompress.argtypes = [C.c_void_p, C.c_size_t, C.c_void_p, C.c_size_t]
    zstd.ZSTD_isError.restype = C.c_uint
    zstd.ZSTD_isError.argtypes = [C.c_size_t]
    lz4.LZ4_decompress_safe.restype = C.c_int
    lz4.LZ4_decompress_safe.argtypes = [C.c_void_p, C.c_void_p, C.c_int, C.c_int]
    return _Libs(zstd, lz4)


def _buffer(view: memoryview | bytes) -> C.c_char:
    """A ctypes view of a buffer's bytes, keeping it alive (a read-only one is copied
    first: ctypes maps only writable buffers)."""
    mv = memoryview(view)
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    return C.c_char.from_buffer(mv)


def decode(enc: int, body: memoryview, size: int,
           zd: zstandard.ZstdDecompressor) -> memoryview | None:
    """The `size` bytes a MEM frame's body stands for (None: all zero)."""
    if enc == Enc.RAW:
        data = body
    elif enc == Enc.ZSTD:
        try:
            data = memoryview(zd.decompress(body, max_output_size=size))
        except zstandard.ZstdError:
            raise ProtocolError("corrupt zstd data in MEM frame") from None
    elif enc == Enc.LZ4:
        try:
            data = memoryview(lz4.block.decompress(body, uncompressed_size=size))
        except (lz4.block.LZ4BlockError, ValueError):
            raise ProtocolError("corrupt lz4 data in MEM frame") from None
    elif enc == Enc.ZERO:
        if len(body):
            raise ProtocolError("ZERO MEM frame carries data")
        return None
    else:
        raise ProtocolError(f"unknown MEM encoding {enc}")
    if len(data) != size:
        raise ProtocolError("MEM frame length does not match its page count")
    return data
