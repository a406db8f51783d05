"""The contract between the virtio transport (pci.py) and a device type (blk, rng,
console): what a device type provides, and the transport's saved state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..base import DeviceState
from .layout import NO_VECTOR
from .queue import Chain, Memory

WAIT = -2  # Backend.handle: not yet (a receive buffer with no input): put it back
ASYNC = -3  # Backend.handle: started; the backend's reap() hands it back when done (a
            # backend that returns it has `completion_fd`, readable when reap() has work)


class Backend(Protocol):
    """What a device type (blk, rng, ...) gives the transport."""

    device_type: int
    class_code: int
    queue_sizes: tuple[int, ...]

    def features(self) -> int: ...
    def config(self) -> bytes: ...
    def config_write(self, offset: int, data: bytes) -> None: ...
    def handle(self, queue: int, chain: Chain, mem: Memory) -> int: ...
    def reset(self) -> None: ...


@dataclass(frozen=True)
class VirtioState(DeviceState):
    """The transport's state; a device type's own state rides in `device` (its encoded
    dataclass, or b"")."""

    NAME: ClassVar[str] = "VirtioPciState"
    device_features_sel: int = 0
    driver_features_sel: int = 0
    driver_features: int = 0
    status: int = 0
    config_generation: int = 0
    config_vector: int = NO_VECTOR
    queue_sel: int = 0
    # per queue: size, ready, desc, avail, used, vector, last_avail, next_used, signalled
    queues: tuple[tuple[int, ...], ...] = ()
    msix_table: bytes = b""
    msix_pending: int = 0
    isr: int = 0
    device: bytes = b""
