"""The three files of a snapshot and the rules for trusting them.

    FILE.gN       guest RAM; byte `file_offset + x` of a region is guest-physical
                  `guest_phys_addr + x`; zero pages are holes. Plain-mmap usable.
    FILE.gN.kern  a 16-byte header, then state sections (vm, vcpuN, dev:NAME, memory-runs).
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
from ..description import DescriptionError, VmDescription
from ..machine.memory import PAGE, ram_layout
from .errors import SnapshotError
from .files import MAX_GENERATION

FORMAT = "pyhyve-snapshot"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 2: no VM description; 1: no generations either
KERN_MAGIC = b"PYHYVE-KERN\0"
KERN_HEADER_SIZE = 16
MAX_META_BYTES = 4 << 20
MAX_SECTIONS = 1024
MAX_MEMORY = 1 << 40
MAX_CPUS = 64
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


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise SnapshotError(f"metadata: {what}")


def _int(d: dict, key: str, lo: int = 0, hi: int = 1 << 63) -> int:
    v = d.get(key)
    _need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
          f"'{key}' is missing or out of range")
    return v  # type: ignore[return-value]


def _str(d: dict, key: str) -> str:
    v = d.get(key)
    _need(isinstance(v, str), f"'{key}' is missing or not a string")
    return v  # type: ignore[return-value]


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
    _need(isinstance(meta, dict), "not a JSON object")
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
    if meta["format_version"] >= 2:
        _int(meta, "generation", 1, MAX_GENERATION)
    else:
        _need("generation" not in meta, "a format-1 snapshot has no generation")
    if meta["format_version"] >= 3:
        try:
            VmDescription.from_dict(meta.get("description"))
        except DescriptionError as e:
            raise SnapshotError(f"metadata: {e}") from None
    vm = meta.get("vm")
    _need(isinstance(vm, dict), "'vm' is missing")
    size = _int(vm, "memory", PAGE, MAX_MEMORY)
    _need(size % PAGE == 0, "memory size is not page-aligned")
    cpus = _int(vm, "cpus", 1, MAX_CPUS)
    _str(vm, "name")
    _str(vm, "cmdline")
    _str(vm, "console")
    hidden = vm.get("cpuid_hidden")
    _need(isinstance(hidden, list) and all(isinstance(x, str) for x in hidden), "bad cpuid_hidden")
    mem = meta.get("memory")
    _need(isinstance(mem, dict), "'memory' is missing")
    _need(_int(mem, "size", PAGE, MAX_MEMORY) == size, "memory size disagrees with the VM config")
    regions = mem.get("regions")
    _need(isinstance(regions, list), "'memory.regions' is missing")
    want = [{"guest_phys_addr": r.guest_phys_addr, "size": r.size, "file_offset": r.file_offset}
            for r in ram_layout(size)]
    _need(regions == want, "memory regions do not match the memory size")
    _str(mem, "checksum")
    _int(mem, "data_pages", 0, size // PAGE)
    state = meta.get("state")
    _need(isinstance(state, dict), "'state' is missing")
    kern_size = _int(state, "size", KERN_HEADER_SIZE, MAX_STATE_BYTES)
    sections = state.get("sections")
    _need(isinstance(sections, list) and 0 < len(sections) <= MAX_SECTIONS, "bad section table")
    names = set()
    for s in sections:
        _need(isinstance(s, dict), "bad section entry")
        name = _str(s, "name")
        off = _int(s, "offset", KERN_HEADER_SIZE, kern_size)
        length = _int(s, "length", 0, kern_size)
        _need(off + length <= kern_size, f"section '{name}' runs past the end of the state file")
        _str(s, "checksum")
        _need(name not in names, f"section '{name}' appears twice")
        names.add(name)
    for need in ["vm", "memory-runs", *(f"vcpu{i}" for i in range(cpus))]:
        _need(need in names, f"section '{need}' is missing")
    _need(not any(n.startswith("vcpu") and n[4:].isdigit() and int(n[4:]) >= cpus for n in names),
          "more vCPU sections than vCPUs")
    devices = meta.get("devices")
    _need(isinstance(devices, list), "'devices' is missing")
    for d in devices:
        _need(isinstance(d, dict), "bad device entry")
        _need(f"dev:{_str(d, 'name')}" in names, f"device '{d.get('name')}' has no section")
        _str(d, "kind")
        _int(d, "version", 1, 1 << 16)
    cpuid = meta.get("cpuid")
    _need(isinstance(cpuid, list) and len(cpuid) <= 4096, "'cpuid' is missing")
    host = meta.get("host")
    _need(isinstance(host, dict), "'host' is missing")
    _int(host, "tsc_khz", 0, 1 << 32)


def sections(meta: dict[str, Any]) -> dict[str, Section]:
    return {s["name"]: Section(s["name"], s["offset"], s["length"], s["checksum"])
            for s in meta["state"]["sections"]}
