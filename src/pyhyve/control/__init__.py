"""The per-VM control socket (UNIX, 0600) and its client."""

import os

DEFAULT_RUNDIR = "/run/pyhyve"


def rundir() -> str:
    return os.environ.get("PYHYVE_RUNDIR") or DEFAULT_RUNDIR


def socket_path(name: str) -> str:
    return os.path.join(rundir(), f"{name}.sock")
