"""A VMM process's session: one VM, its control socket, and the commands it answers.

Later features (suspend, checkpoint, migration) add commands here; each handler runs in
the control thread and must leave the VM running or stopped, never half-paused.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..snapshot.format import SnapshotError
from ..vm import EXIT_DESTROYED, VirtualMachine, VmError
from .server import ControlServer, Handler

if TYPE_CHECKING:
    from ..migration.source import Migration


WARM_DELAY_S = 1.0


def _warm_imports() -> None:
    """Import what a save or a migration needs (a no-op once done)."""
    import importlib

    for name in ("numpy", "zstandard", "pyhyve.snapshot.save", "pyhyve.migration.source"):
        importlib.import_module(name)


class Session:
    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm
        self.lock = threading.Lock()  # one state-changing command at a time
        self.handlers: dict[str, Handler] = {
            "status": self.status, "pause": self.pause, "resume": self.resume,
            "powerdown": self.powerdown, "nmi": self.nmi, "destroy": self.destroy,
            "suspend": self.suspend,
            "checkpoint": self.checkpoint,
            "migrate": self.migrate, "migrate-status": self.migrate_status,
            "migrate-cancel": self.migrate_cancel, "migrate-recover": self.migrate_recover,
        }
        self.migration: Migration | None = None
        self.server: ControlServer | None = None

    def listen(self) -> None:
        self.server = ControlServer(self.vm.config.name, self.handlers)
        # numpy and the migration code cost ~120 ms to import: pay it in the background,
        # not inside the first save's downtime or a migration's setup (the handlers below
        # also import them before they pause anything). Not at once: parts of an import
        # hold the GIL for ~20 ms at a time (loading numpy's extension), stalling every vCPU
        # exit meanwhile; a restored guest's first second is when a user waits on it (a
        # restored Linux's shell answered in 0.34-0.39 s instead of 0.57-0.81 s).
        warm = threading.Timer(WARM_DELAY_S, _warm_imports)
        warm.daemon = True
        warm.start()

    def status(self, _msg: dict[str, Any]) -> dict[str, Any]:
        from ..snapshot.incremental import status

        return {**self.vm.status(), **status(self.vm)}

    def _no_migration(self) -> None:
        """A migration owns the VM's run state until it ends: no pause, resume or save;
        nor after a post-copy gave up with the guest running on the destination (this
        VM's copy is stale: it must not run, be saved or be sent anywhere else)."""
        if self.migration is not None and not self.migration.done.is_set():
            raise VmError("a migration is in progress (use --migrate-cancel first)")
        if self.migration is not None and self.migration.recoverable():
            raise VmError("the guest runs on the post-copy destination, which still needs "
                          "pages from this VM: finish with --migrate-recover")

    def pause(self, _msg: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self._no_migration()
            self.vm.pause()
        return {"state": self.vm.state}

    def powerdown(self, _msg: dict[str, Any]) -> dict[str, Any]:
        """Press the ACPI power button; the guest decides. Returns at once: the caller
        waits for the process to end."""
        with self.lock:
            self._no_migration()
            if self.vm.state != "running":
                raise VmError(f"VM is {self.vm.state}: a guest acts on the power button only "
                              "while it runs (--resume first)")
            self.vm.press_power_button()
        return {"line": "power button pressed", "state": self.vm.state, "pid": os.getpid()}

    def nmi(self, _msg: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self._no_migration()
            now = self.vm.inject_nmi()
        n = len(self.vm.vcpus)
        return {"line": f"NMI sent to {n} vCPU(s)" if now else
                f"NMI queued for {n} vCPU(s): delivered when the VM resumes",
                "state": self.vm.state}

    def resume(self, _msg: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self._no_migration()
            self.vm.resume()
        return {"state": self.vm.state}

    def _save(self, msg: dict[str, Any], kind: str) -> dict[str, Any]:
        from ..cli.progress import bar
        from ..snapshot.save import save

        _warm_imports()  # before any pause
        path = msg.get("path")
        if not isinstance(path, str) or not path:
            raise SnapshotError("no snapshot path given")
        window = msg.get("loading_window") or 0.0
        if not isinstance(window, (int, float)) or isinstance(window, bool) \
                or not 0 <= window <= 10:
            raise SnapshotError("the loading-set window must be 0 to 10000 ms")
        with self.lock:
            self._no_migration()
            if self.vm.state not in ("running", "paused"):
                raise VmError(f"VM is {self.vm.state}")
            with bar(f"{kind} {self.vm.config.name}") as progress:
                stats = save(self.vm, path, kind, progress,
                             incremental=msg.get("incremental") is True,
                             loading_window=float(window),
                             disk_copies=msg.get("disk_copy") is not False)
            if kind == "suspend":
                self.vm.stop(f"suspended to {stats.path}", 0)
        return {"line": stats.line(), "downtime": stats.downtime, "seconds": stats.seconds,
                "written_bytes": stats.written_bytes, "zero_pages": stats.zero_pages,
                "parent": stats.parent}

    def suspend(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Save, then end the VM (bhyvectl --suspend)."""
        return self._save(msg, "suspend")

    def checkpoint(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Save; the guest keeps running."""
        return self._save(msg, "checkpoint")

    def migrate(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Run a migration to msg["target"]; the reply comes when it has ended."""
        from ..migration import DEFAULT_PORT
        from ..migration.source import Migration, MigrationError, Options, parse_target

        _warm_imports()  # before any pause
        target = msg.get("target")
        if not isinstance(target, str):
            raise MigrationError("no destination given")
        host, port = parse_target(target, DEFAULT_PORT)
        key_hex = msg.get("key")
        try:
            key = bytes.fromhex(key_hex) if isinstance(key_hex, str) and key_hex else None
        except ValueError:
            raise MigrationError("malformed key") from None
        opts = Options()
        for name, typ in (("live", bool), ("downtime_ms", (int, float)),
                          ("bandwidth", (int, float)), ("compress", str),
                          ("auto_converge", bool), ("tls_dir", str), ("insecure", bool),
                          ("postcopy", bool), ("postcopy_after", int),
                          ("recover_timeout", (int, float))):
            if name in msg and msg[name] is not None:
                if not isinstance(msg[name], typ):
                    raise MigrationError(f"bad option {name}")
                setattr(opts, name, msg[name])
        if opts.compress not in ("auto", "none", "zstd", "lz4"):
            raise MigrationError(f"unknown compression '{opts.compress}' (auto, none, zstd, lz4)")
        if opts.downtime_ms <= 0:
            raise MigrationError("the downtime target must be positive")
        if opts.postcopy_after < 0 or isinstance(opts.postcopy_after, bool) \
                or opts.recover_timeout <= 0:
            raise MigrationError("bad post-copy option")
        if opts.postcopy and not opts.live:
            raise MigrationError("post-copy is a live migration (--migrate-live)")
        with self.lock:
            if self.migration is not None and not self.migration.done.is_set():
                raise MigrationError("a migration is already running")
            self._no_migration()
            if self.vm.state not in ("running", "paused"):
                raise VmError(f"VM is {self.vm.state}")
            mig = self.migration = Migration(self.vm, host, port, key, opts)
        stats = mig.run()
        out = asdict(stats)
        out["line"] = stats.line()
        return out

    def migrate_recover(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A post-copy that gave up after its switch: reconnect and finish it; the reply
        comes when it has ended."""
        from ..migration.source import MigrationError

        timeout = msg.get("recover_timeout")
        if timeout is not None and (not isinstance(timeout, (int, float))
                                    or isinstance(timeout, bool) or timeout <= 0):
            raise MigrationError("bad option recover_timeout")
        with self.lock:
            mig = self.migration
            if mig is None:
                raise MigrationError("no post-copy migration to recover here (only one that "
                                     "gave up after its switch, cut off, can be)")
            mig.claim_recovery()
        stats = mig.recover(float(timeout) if timeout is not None else None)
        out = asdict(stats)
        out["line"] = stats.line()
        return out

    def migrate_status(self, _msg: dict[str, Any]) -> dict[str, Any]:
        mig = self.migration
        if mig is None:
            return {"state": "none", "line": "no migration has run"}
        return {**asdict(mig.stats), "line": mig.status_line()}

    def migrate_cancel(self, _msg: dict[str, Any]) -> dict[str, Any]:
        mig = self.migration
        if mig is None or mig.done.is_set():
            raise VmError("no migration is running")
        if mig.past_switch:
            raise VmError("the migration is past its post-copy switch: the guest runs on the "
                          "destination, and this VM holds the pages it still needs")
        mig.cancel()
        mig.done.wait(30)
        return {"state": mig.stats.state}

    def destroy(self, _msg: dict[str, Any]) -> dict[str, Any]:
        mig = self.migration
        if mig is not None and mig.past_switch:
            raise VmError("refusing to destroy: post-copy is still sending this VM's pages to "
                          "the guest that runs on the destination (see --migrate-status)")
        if mig is not None and mig.recoverable():
            raise VmError("refusing to destroy: the guest on the post-copy destination still "
                          "needs pages only this VM has (--migrate-recover finishes; a "
                          "signal still ends this process)")
        self.vm.stop("destroyed by pyhyvectl", EXIT_DESTROYED)
        return {"state": "stopped", "pid": os.getpid()}

    def close(self) -> None:
        if self.server:
            self.server.close()
            self.server = None


__all__ = ["Session", "VmError"]
