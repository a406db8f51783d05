"""Small legacy devices: the i8042 reset line and the POST/debug port."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .base import Device, DeviceState


@dataclass(frozen=True)
class PostState(DeviceState):
    NAME: ClassVar[str] = "PostState"
    last: int = 0


class I8042(Device):
    """Just enough of the PS/2 controller for the guest's reset command (0xFE to port 0x64).

    pyhyve answers a reset by stopping the VM (as Firecracker does): rebooting is the
    orchestrator's decision. Status reads say "no data, input buffer empty".
    """

    kind = "i8042"
    BASE = 0x60  # 0x60 data, 0x64 command/status; registered as 0x60..0x64
    CMD_RESET = 0xFE

    def __init__(self, on_reset: Callable[[], None]) -> None:
        super().__init__()
        self.on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 4 and value & 0xFF == self.CMD_RESET:
            self.on_reset()


class PostPort(Device):
    """Port 0x80: BIOS POST codes and I/O delays. The last code is kept for diagnostics."""

    kind = "post"
    state_class = PostState

    def __init__(self) -> None:
        super().__init__()
        self.last = 0

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF

    def save(self) -> PostState:
        return PostState(self.last)

    def load_state(self, state: DeviceState) -> None:
        if not isinstance(state, PostState):
            raise ValueError("post: wrong state type")
        self.last = state.last & 0xFF
