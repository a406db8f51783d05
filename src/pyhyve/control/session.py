"""A VMM process's session: one VM, its control socket, and the commands it answers.

Later features (suspend, checkpoint, migration) add commands here; each handler runs in
the control thread and must leave the VM running or stopped, never half-paused.
"""

from __future__ import annotations

import threading

from ..vm import VirtualMachine, VmError
from .server import ControlServer, Handler


class Session:
    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm
        self.lock = threading.Lock()  # one state-changing command at a time
        self.handlers: dict[str, Handler] = {
            "status": self.status, "pause": self.pause, "resume": self.resume,
            "destroy": self.destroy,
        }
        self.server: ControlServer | None = None

    def listen(self) -> None:
        self.server = ControlServer(self.vm.config.name, self.handlers)

    def status(self, _msg: dict) -> dict:
        return self.vm.status()

    def pause(self, _msg: dict) -> dict:
        with self.lock:
            self.vm.pause()
        return {"state": self.vm.state}

    def resume(self, _msg: dict) -> dict:
        with self.lock:
            self.vm.resume()
        return {"state": self.vm.state}

    def destroy(self, _msg: dict) -> dict:
        self.vm.stop("destroyed by pyhyvectl", 0)
        return {"state": "stopped"}

    def close(self) -> None:
        if self.server:
            self.server.close()
            self.server = None


__all__ = ["Session", "VmError"]
