"""A VMM process's session: one VM, its control socket, and the commands it answers.

Later features (suspend, checkpoint, migration) add commands here; each handler runs in
the control thread and must leave the VM running or stopped, never half-paused.
"""

from __future__ import annotations

import threading

from ..snapshot.format import SnapshotError
from ..vm import VirtualMachine, VmError
from .server import ControlServer, Handler


class Session:
    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm
        self.lock = threading.Lock()  # one state-changing command at a time
        self.handlers: dict[str, Handler] = {
            "status": self.status, "pause": self.pause, "resume": self.resume,
            "destroy": self.destroy, "suspend": self.suspend, "checkpoint": self.checkpoint,
        }
        self.server: ControlServer | None = None

    def listen(self) -> None:
        self.server = ControlServer(self.vm.config.name, self.handlers)
        # numpy costs ~90 ms to import; pay it now, not inside the first save's downtime
        threading.Thread(target=lambda: __import__("numpy"), daemon=True).start()

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

    def _save(self, msg: dict, kind: str) -> dict:
        from ..cli.progress import bar
        from ..snapshot.save import save

        path = msg.get("path")
        if not isinstance(path, str) or not path:
            raise SnapshotError("no snapshot path given")
        with self.lock:
            if self.vm.state not in ("running", "paused"):
                raise VmError(f"VM is {self.vm.state}")
            with bar(f"{kind} {self.vm.config.name}") as progress:
                stats = save(self.vm, path, kind, progress)
            if kind == "suspend":
                self.vm.stop(f"suspended to {stats.path}", 0)
        return {"line": stats.line(), "downtime": stats.downtime, "seconds": stats.seconds,
                "written_bytes": stats.written_bytes, "zero_pages": stats.zero_pages}

    def suspend(self, msg: dict) -> dict:
        """Save, then end the VM (bhyvectl --suspend)."""
        return self._save(msg, "suspend")

    def checkpoint(self, msg: dict) -> dict:
        """Save; the guest keeps running."""
        return self._save(msg, "checkpoint")

    def destroy(self, _msg: dict) -> dict:
        self.vm.stop("destroyed by pyhyvectl", 0)
        return {"state": "stopped"}

    def close(self) -> None:
        if self.server:
            self.server.close()
            self.server = None


__all__ = ["Session", "VmError"]
