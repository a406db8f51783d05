"""`pyhyve snapshot info | verify | merge`: look at, check and flatten snapshots."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .common import fail

PROG = "pyhyve"


def cmd_snapshot(a: argparse.Namespace) -> int:
    from ..snapshot.files import clean, resolve_base
    from ..snapshot.format import SnapshotError
    from ..snapshot.info import describe
    from ..snapshot.restore import check_disk_copies, open_snapshot

    base = resolve_base(a.file)
    try:
        if a.snapcmd == "merge":
            from ..snapshot.merge import merge

            t0 = time.perf_counter()
            files, n, pages = merge(base, a.out)
            print(f"merged {n} layer(s) of {base} into {os.path.dirname(files.meta)}/"
                  f"{os.path.basename(files.meta)[:-5]}: {pages} data pages, "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms")
            return 0
        if a.snapcmd == "verify":
            t0 = time.perf_counter()
            try:
                snap = open_snapshot(base)
            except SnapshotError:
                removed = clean(base)  # at least the dead saves' temporaries
                if removed:
                    print(f"{base}: removed {len(removed)} stale file(s) of interrupted saves: "
                          f"{', '.join(os.path.basename(p) for p in removed)}", file=sys.stderr)
                raise
            try:
                disks = check_disk_copies(snap)
            finally:
                snap.close()
            m = snap.meta
            removed = clean(base)
            gone = (f"; removed {len(removed)} stale file(s) of interrupted or replaced saves: "
                    f"{', '.join(os.path.basename(p) for p in removed)}" if removed else "")
            kept = f", {disks} disk copies" if disks else ""
            print(f"{snap.base}: OK ({len(m['state']['sections'])} state sections, "
                  f"{m['memory']['data_pages']} data pages{kept}, all checksums match, "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms){gone}")
            return 0
        return info(base, a.json, describe)
    except SnapshotError as e:
        fail(PROG, str(e))


def info(base: str, as_json: bool,
         describe: Callable[[dict[str, Any], dict[str, str], list[str]], str]) -> int:
    """Print what is readable; mark corrupt state sections and a missing or changed
    parent instead of printing nothing."""
    from ..snapshot.files import generation_files, meta_path
    from ..snapshot.format import SnapshotError, checksum, read_meta, sections
    from ..snapshot.incremental import parents

    meta = read_meta(meta_path(base))
    if as_json:
        print(json.dumps(meta, indent=2))
        return 0
    files = generation_files(base, meta.get("generation", 0))
    bad = []
    try:
        with open(files.state, "rb") as f:
            kern = f.read(meta["state"]["size"] + 1)
    except OSError as e:
        kern = b""
        bad.append(f"state file {files.state}: {e.strerror}")
    marks = {}
    for name, sec in sections(meta).items():
        ok = len(kern) >= sec.offset + sec.length and \
            checksum(kern[sec.offset:sec.offset + sec.length]) == sec.checksum
        marks[name] = "" if ok else "  CORRUPT"
        if not ok and kern:
            bad.append(f"state section '{name}' is corrupt")
    chain, broken = parents(base, meta)
    bad += broken
    print(describe(meta, marks, chain))
    if bad:
        raise SnapshotError("; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
    return 0
