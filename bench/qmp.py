"""A minimal QMP client, enough to drive QEMU's migration from the benchmarks."""

from __future__ import annotations

import json
import socket
import time


class Qmp:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args: object) -> object:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply.get("return")

    def wait_migration(self, timeout: float) -> dict | None:
        """query-migrate until completed (the info), failed (raise) or timeout (None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.cmd("query-migrate")
            status = info.get("status")  # type: ignore[union-attr]
            if status == "completed":
                return info  # type: ignore[return-value]
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {status}: {info}")
            time.sleep(0.002)
        return None

    def close(self) -> None:
        self.sock.close()
