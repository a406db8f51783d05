"""virtio-rng (virtio 1.x, 5.4): the guest's entropy from the host's getrandom."""

from __future__ import annotations

import os

from .queue import Chain, Memory

MAX_REQUEST = 64 << 10  # bytes handed out per request, at most


class Rng:
    device_type = 4
    class_code = 0xFF0000
    queue_sizes: tuple[int, ...] = (256,)

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        pass

    def handle(self, queue: int, chain: Chain, mem: Memory) -> int:
        n = min(chain.out_room, MAX_REQUEST)
        return chain.write(mem, os.getrandom(n)) if n else 0

    def reset(self) -> None:
        pass
