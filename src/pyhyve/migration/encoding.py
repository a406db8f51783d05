"""How MEM frames carry pages: raw, zstd, lz4, or a zero run. The sender picks an
encoding per chunk; the receiver decodes into exactly the announced size or refuses."""

from __future__ import annotations

from collections.abc import Callable

import lz4.block
import zstandard

from ..machine.memory import PAGE
from .protocol import Enc, ProtocolError

Encoder = Callable[[memoryview], tuple[int, bytes | memoryview]]
SAMPLE_PAGES = 4
COMPRESSIONS = ("auto", "none", "zstd", "lz4")


def encoder(kind: str) -> Encoder:
    """The chunk encoder for `--compress KIND`; never larger than raw."""
    if kind in ("auto", "zstd"):
        z = zstandard.ZstdCompressor(level=1)

        def zstd(chunk: memoryview) -> tuple[int, bytes | memoryview]:
            if kind == "auto" and not _worth_it(z, chunk):
                return Enc.RAW, chunk
            c = z.compress(chunk)
            return (Enc.ZSTD, c) if len(c) < len(chunk) else (Enc.RAW, chunk)
        return zstd
    if kind == "lz4":
        def lz4c(chunk: memoryview) -> tuple[int, bytes | memoryview]:
            c = lz4.block.compress(chunk, store_size=False)
            return (Enc.LZ4, c) if len(c) < len(chunk) else (Enc.RAW, chunk)
        return lz4c
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
