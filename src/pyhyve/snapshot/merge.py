"""`pyhyve snapshot merge FILE OUT`: flatten a chain of layers into one full snapshot.

The chain is opened and checked like a restore's; the pages are stacked (newest layer wins)
into memory of our own (refused up front when the host has not that much available),
and OUT is written exactly as a full save of that guest would be:
the same non-zero pages, run table and memory checksum, the newest layer's state. OUT is
committed like any save (a new generation, the metadata renamed last), so the last good
snapshot at OUT survives a failure; OUT may not be a snapshot of the chain itself.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
from typing import Any

from .. import __version__
from ..machine.memory import PAGE, GuestMemory
from ..pipeline.pages import encode_runs, guest_runs
from ..pipeline.sections import RUNS_SECTION
from ..vmtypes import meminfo
from .chain import layers, stack
from .files import SnapshotFiles, commit, write_all
from .format import SnapshotError, checksum, kern_header, meta_checksum
from .memfile import load_eager, write_memory
from .restore import open_snapshot
from .save import _target, _Temps


def merge(src: str, out: str) -> tuple[SnapshotFiles, int, int]:
    """Returns OUT's files, the number of layers merged and OUT's data pages."""
    out = _target(out)
    snap = open_snapshot(src)
    try:
        chain = layers(snap)
        if len(chain) == 1:
            raise SnapshotError(f"{snap.base} is a full snapshot: there is nothing to merge")
        if os.path.realpath(out) in {os.path.realpath(s.base) for s in chain}:
            raise SnapshotError(f"cannot merge into {out}: it is part of the chain")
        size = snap.meta["memory"]["size"]
        need = sum(n for s in chain for _, n in s.runs) * PAGE
        if need > meminfo("MemAvailable"):
            raise SnapshotError(f"cannot merge {snap.base}: its {need >> 20} MiB of pages "
                                "are more than the host's available memory")
        memory = GuestMemory(size, name="pyhyve-merge")
        try:
            load_eager(memory, chain[0].mem_fd, chain[0].runs)
            stack(memory, snap)
            runs = guest_runs(memory)
            with _Temps(out) as temps:
                fd, tmp = temps.create(".mem")
                os.ftruncate(fd, size)
                stats = write_memory(memory, fd, runs)
                os.fsync(fd)
                names = [s["name"] for s in snap.meta["state"]["sections"]]
                blobs = [(n, encode_runs(runs) if n == RUNS_SECTION else snap.blobs[n])
                         for n in names]
                table, off = [], len(kern_header(snap.meta["format_version"]))
                for n, blob in blobs:
                    table.append({"name": n, "offset": off, "length": len(blob),
                                  "checksum": checksum(blob)})
                    off += len(blob)
                kfd, ktmp = temps.create(".kern")
                write_all(kfd, kern_header(snap.meta["format_version"])
                          + b"".join(b for _, b in blobs))
                os.fsync(kfd)

                def make_meta(files: SnapshotFiles) -> bytes:
                    meta: dict[str, Any] = copy.deepcopy(snap.meta)
                    now = datetime.datetime.now(datetime.UTC)
                    meta.update(parent=None, generation=files.generation,
                                pyhyve_version=__version__,
                                created=now.isoformat(timespec="milliseconds"))
                    meta["memory"].update(file=os.path.basename(files.memory),
                                          checksum=stats.checksum, data_pages=stats.data_pages,
                                          zero_pages=stats.zero_pages)
                    meta["state"].update(file=os.path.basename(files.state), size=off,
                                         sections=table)
                    meta["meta_checksum"] = meta_checksum(meta)
                    return json.dumps(meta, indent=1).encode() + b"\n"

                files, _ = commit(out, tmp, ktmp, make_meta)
        finally:
            memory.close()
        return files, len(chain) - 1, sum(n for _, n in runs)
    except OSError as e:
        raise SnapshotError(f"cannot merge into {out}: {e.strerror or e}") from None
    finally:
        snap.close()


__all__ = ["merge"]
