"""Human-readable description of a snapshot's metadata (`pyhyve snapshot info`)."""

from __future__ import annotations

from typing import Any


def describe(meta: dict[str, Any], marks: dict[str, str] | None = None,
             chain: list[str] | None = None) -> str:
    """`marks`: text to append to a state section's line (e.g. CORRUPT); `chain`: a
    layer's parents, one line each, nearest first."""
    marks = marks or {}
    vm, mem, host = meta["vm"], meta["memory"], meta["host"]
    data = mem["data_pages"] * 4096
    lines = [
        f"snapshot      {meta['kind']} of VM '{vm['name']}', {meta['created']}",
        f"format        {meta['format']} v{meta['format_version']} "
        f"(pyhyve {meta.get('pyhyve_version', '?')}), generation {meta.get('generation', '-')}",
        f"vm            {vm['memory'] >> 20} MiB RAM, {vm['cpus']} vCPU(s), "
        f"console at save {vm['console']} (never reused: restore binds its own)",
        f"kernel        {vm.get('kernel') or '-'}  cmdline '{vm['cmdline']}'",
        f"cpuid hidden  {', '.join(vm['cpuid_hidden']) or '-'} ({len(meta['cpuid'])} leaves)",
        f"host          TSC {host['tsc_khz']} kHz, kernel {host.get('kernel', '?')}",
        f"memory        {mem['file']}: {data / (1 << 20):.1f} MiB data, {mem['zero_pages']} "
        f"zero pages as holes, {mem['checksum_algo']} {mem['checksum']}"
        if not meta.get("parent") else
        f"memory        {mem['file']}: {mem['data_pages']} pages written since the parent "
        f"({data / (1 << 20):.1f} MiB), {mem['checksum_algo']} {mem['checksum']}",
    ]
    if meta.get("parent"):
        lines.append(f"layer         {meta['parent']['depth']} over a full snapshot; "
                     "restore stacks the chain:")
        lines += [f"  parent      {c}" for c in chain or []]
    for r in mem["regions"]:
        lines.append(f"  region      gpa {r['guest_phys_addr']:#x} size {r['size']:#x} "
                     f"file offset {r['file_offset']:#x}")
    st = meta["state"]
    lines.append(f"state         {st['file']}: {st['size']} bytes, {len(st['sections'])} sections")
    for s in st["sections"]:
        lines.append(f"  {s['name']:<12}{s['length']:>8} bytes at {s['offset']:<8} {s['checksum']}"
                     f"{marks.get(s['name'], '')}")
    for d in meta["devices"]:
        lines.append(f"device        {d['name']}: {d['kind']} v{d['version']}")
    mem_file = mem["file"]
    for dev_id, ident in sorted((meta.get("disk_copies") or {}).items()):
        lines.append(f"disk copy     {dev_id}: {mem_file}.{dev_id}, {ident['size']} bytes as at "
                     f"the pause (bind a copy of it to restore)")
    return "\n".join(lines)
