"""The three files of a snapshot and the rules for trusting them.

    FILE.gN       guest RAM; byte `file_offset + x` of a region is guest-physical
                  `guest_phys_addr + x`; zero pages are holes. Plain-mmap usable.
    FILE.gN.kern  a 16-byte header, then state sections (vm, vcpuN, dev:NAME, memory-runs,
                  loading-set).
    FILE.meta     JSON: what the snapshot is, its generation N, the VM config, CPUID, host
                  facts, memory regions, every section's offset/length/checksum, the memory
                  checksum, and a checksum of the metadata itself. Renaming it into place
                  commits a save (files.py).

Format 1 (FILE, FILE.kern, no generation) is still read.

Everything read from these files is checked before it is used; a failed check is a
SnapshotError with one sentence that says what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import xxhash

from .. import untrusted
from ..errors import RecordError
from ..machine.memory import PAGE
from ..pipeline.record import validate_record
from ..pipeline.sections import RUNS_SECTION
from .errors import SnapshotError as SnapshotError
from .files import DISK_COPY, MAX_GENERATION
from .loadset import SECTION as LOADING_SECTION

FORMAT = "pyhyve-snapshot"
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)  # 4: no loading set; 3: nor parent (layers); 2: nor VM
# description; 1: nor generations
MAX_CHAIN = 64  # layers over one full snapshot; `snapshot merge` flattens a longer chain
KERN_MAGIC = b"PYHYVE-KERN\0"
KERN_HEADER_SIZE = 16
MAX_META_BYTES = 4 << 20
MAX_SECTIONS = 1024
MAX_STATE_BYTES = 64 << 20  # FILE.kern is read whole: bound it before allocating


def kern_header(version: int = FORMAT_VERSION) -> bytes:
    return KERN_MAGIC + version.to_bytes(4, "little")


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def meta_checksum(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return checksum(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


@dataclass(frozen=True)
class Section:
    name: str
    offset: int
    length: int
    checksum: str


F = untrusted.Fields(lambda what: SnapshotError(f"metadata: {what}"))
_need, _int, _str = F.need, F.integer, F.text


def read_meta(path: str) -> dict[str, Any]:
    """Parse and validate FILE.meta (structure, bounds, its own checksum)."""
    if not os.path.lexists(path):
        raise SnapshotError(f"{path} is missing")
    try:
        raw = untrusted.read_file(path, MAX_META_BYTES, "snapshot metadata")
    except untrusted.BadFile as e:
        raise SnapshotError(str(e)) from None
    try:
        meta = untrusted.loads(raw, max_depth=8)
    except untrusted.BadJson as e:
        raise SnapshotError(f"{path} is not valid metadata: {e} (truncated or corrupt)") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"{path} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a pyhyve snapshot (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise SnapshotError(f"snapshot format version {version!r} is not supported "
                            f"(this pyhyve reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    if meta.get("meta_checksum") != meta_checksum(meta):
        raise SnapshotError(f"{path}: metadata checksum mismatch (corrupt or edited)")
    _validate(meta)
    return meta


def _validate(meta: dict[str, Any]) -> None:
    version = meta["format_version"]
    if version >= 2:
        _int(meta, "generation", 1, MAX_GENERATION)
    else:
        _need("generation" not in meta, "a format-1 snapshot has no generation")
    _need(version < 3 or "description" in meta, "'description' is missing")
    if version >= 4:
        _need("parent" in meta, "'parent' is missing")
        if meta["parent"] is not None:  # an incremental layer over the snapshot it names
            parent = F.obj(meta, "parent")
            path = _str(parent, "path")
            _need(0 < len(path) <= 4096 and path.isprintable() and not path.startswith("/"),
                  "bad parent path (a relative path of printable characters)")
            _need(len(_str(parent, "meta_checksum")) == 32, "bad parent checksum")
            _int(parent, "depth", 1, MAX_CHAIN)
    else:
        _need(meta.get("parent") is None, "a parent needs format version 4")
    try:  # the machine: the same checks a migration's HELLO gets
        validate_record(meta)
    except RecordError as e:
        raise SnapshotError(f"metadata: {e}") from None
    _str(meta["vm"], "console")
    for key in ("kind", "created"):  # shown by `snapshot info` and restore's report
        _str(meta, key)
    size = meta["vm"]["memory"]
    for key in ("checksum", "checksum_algo", "file"):
        _str(meta["memory"], key)
    _int(meta["memory"], "zero_pages", 0, size // PAGE)
    _str(F.obj(meta, "state"), "file")
    _int(meta["memory"], "data_pages", 0, size // PAGE)
    names = _validate_sections(meta)
    cpus = meta["vm"]["cpus"]
    loading = [LOADING_SECTION] if version >= 5 else []
    for need in ["vm", RUNS_SECTION, *loading, *(f"vcpu{i}" for i in range(cpus))]:
        _need(need in names, f"section '{need}' is missing")
    _need(not any(n.startswith("vcpu") and n[4:].isdigit() and int(n[4:]) >= cpus for n in names),
          "more vCPU sections than vCPUs")
    for d in F.array(meta, "devices", MAX_SECTIONS):
        _need(isinstance(d, dict), "bad device entry")
        _need(f"dev:{_str(d, 'name')}" in names, f"device '{d.get('name')}' has no section")
        _str(d, "kind")
        _int(d, "version", 1, 1 << 16)
    if "disk_copies" in meta:  # a checkpoint's copies of its disks (save.py)
        _need(version >= 2, "a format-1 snapshot keeps no disk copies")
        copies = F.obj(meta, "disk_copies")
        _need(len(copies) <= MAX_SECTIONS, "too many disk copies")
        for dev_id in copies:
            _need(DISK_COPY.fullmatch(dev_id) is not None and f"dev:{dev_id}" in names,
                  f"disk copy '{str(dev_id)[:20]}' names no disk of the snapshot")
            ident = F.obj(copies, dev_id)
            _int(ident, "size", 512, 1 << 62)
            _need(len(_str(ident, "sample")) == 32, f"bad identity of the copy of {dev_id}")


def _validate_sections(meta: dict[str, Any]) -> set[str]:
    """The state file's section table: bounded, inside the file, no name twice."""
    state = F.obj(meta, "state")
    kern_size = _int(state, "size", KERN_HEADER_SIZE, MAX_STATE_BYTES)
    table = F.array(state, "sections", MAX_SECTIONS)
    _need(len(table) > 0, "bad section table")
    names: set[str] = set()
    for s in table:
        _need(isinstance(s, dict), "bad section entry")
        name = _str(s, "name")
        off = _int(s, "offset", KERN_HEADER_SIZE, kern_size)
        length = _int(s, "length", 0, kern_size)
        _need(off + length <= kern_size, f"section '{name}' runs past the end of the state file")
        _str(s, "checksum")
        _need(name not in names, f"section '{name}' appears twice")
        names.add(name)
    return names


def sections(meta: dict[str, Any]) -> dict[str, Section]:
    return {s["name"]: Section(s["name"], s["offset"], s["length"], s["checksum"])
            for s in meta["state"]["sections"]}
