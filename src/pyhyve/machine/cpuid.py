"""The CPUID table a guest sees: KVM_GET_SUPPORTED_CPUID, minus what the user hides.

Hiding matters on our kvm_pvm hosts (platform.md): CPL0 code cannot run
`lock cmpxchg16b`, so a guest must be told there is no CX16; XSAVE/AVX likewise.
The same table is recorded in snapshots and checked on restore and migration.
"""

from __future__ import annotations

from ..errors import BootFailed
from ..kvm.api import backend_is_pvm
from ..kvm.structs import KvmCpuidEntry2

# name -> (leaf, subleaf, register, bit)
FEATURES: dict[str, tuple[int, int, str, int]] = {
    "sse3": (1, 0, "ecx", 0), "pclmulqdq": (1, 0, "ecx", 1), "ssse3": (1, 0, "ecx", 9),
    "fma": (1, 0, "ecx", 12), "cx16": (1, 0, "ecx", 13), "pcid": (1, 0, "ecx", 17),
    "sse4_1": (1, 0, "ecx", 19), "sse4_2": (1, 0, "ecx", 20), "x2apic": (1, 0, "ecx", 21),
    "movbe": (1, 0, "ecx", 22), "popcnt": (1, 0, "ecx", 23), "tsc_deadline": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25), "xsave": (1, 0, "ecx", 26), "osxsave": (1, 0, "ecx", 27),
    "avx": (1, 0, "ecx", 28), "f16c": (1, 0, "ecx", 29), "rdrand": (1, 0, "ecx", 30),
    "hypervisor": (1, 0, "ecx", 31), "sse": (1, 0, "edx", 25), "sse2": (1, 0, "edx", 26),
    "fsgsbase": (7, 0, "ebx", 0), "bmi1": (7, 0, "ebx", 3), "avx2": (7, 0, "ebx", 5),
    "smep": (7, 0, "ebx", 7), "bmi2": (7, 0, "ebx", 8), "erms": (7, 0, "ebx", 9),
    "invpcid": (7, 0, "ebx", 10), "avx512f": (7, 0, "ebx", 16), "rdseed": (7, 0, "ebx", 18),
    "smap": (7, 0, "ebx", 20), "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3),
    "la57": (7, 0, "ecx", 16), "rdpid": (7, 0, "ecx", 22), "pdpe1gb": (0x80000001, 0, "edx", 26),
    "rdtscp": (0x80000001, 0, "edx", 27), "lm": (0x80000001, 0, "edx", 29),
    # KVM's paravirtual features (leaf 0x40000001 EAX) that a guest uses by hypercall
    "kvm-pv-unhalt": (0x40000001, 0, "eax", 7), "kvm-pv-send-ipi": (0x40000001, 0, "eax", 11),
    "kvm-pv-sched-yield": (0x40000001, 0, "eax", 13),
}
# Hidden by default: these cannot work at CPL0 on the software back end we run on, and a
# guest that believes in them dies (platform.md). On other hosts --cpuid-clear '' undoes it.
# On a kvm_pvm host also the hypercall-based PV features: a `vmcall` there never returns
# (measured 2026-11-29: Linux's second vCPU hung in its first PV IPI, KVM_HC_SEND_IPI,
# holding a lock the first one spun on). Hidden only on such a host; on VMX/SVM they work.
PVM_HIDDEN = ("kvm-pv-unhalt", "kvm-pv-send-ipi", "kvm-pv-sched-yield")
DEFAULT_HIDDEN = ("cx16", "xsave", "osxsave", "avx", "avx2") + \
    (PVM_HIDDEN if backend_is_pvm() else ())


class CpuidError(BootFailed, ValueError):
    pass


def parse_feature_list(spec: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in spec.split(",") if n.strip()))
    for n in names:
        if n not in FEATURES:
            raise CpuidError(f"unknown CPUID feature '{n}' (known: {', '.join(sorted(FEATURES))})")
    return names


def _find(entries: list[KvmCpuidEntry2], leaf: int, sub: int) -> KvmCpuidEntry2 | None:
    for e in entries:
        if e.function == leaf and (e.index == sub or not e.flags & 1):
            return e
    return None


def build_cpuid(supported: list[KvmCpuidEntry2], hidden: tuple[str, ...]) -> list[KvmCpuidEntry2]:
    """A copy of `supported` with the named features cleared (shared by every vCPU)."""
    table = [KvmCpuidEntry2.from_buffer_copy(e) for e in supported]
    for name in hidden:
        leaf, sub, reg, bit = FEATURES[name]
        e = _find(table, leaf, sub)
        if e is not None:
            setattr(e, reg, getattr(e, reg) & ~(1 << bit))
    if "xsave" in hidden:
        table = [e for e in table if e.function != 0xD]
    return table


def for_vcpu(table: list[KvmCpuidEntry2], index: int, ncpus: int) -> list[KvmCpuidEntry2]:
    """Per-vCPU copy: APIC IDs in leaves 1, 0xB and 0x1F, logical CPU count in leaf 1."""
    out = [KvmCpuidEntry2.from_buffer_copy(e) for e in table]
    for e in out:
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (index << 24) | (min(ncpus, 255) << 16)
            if ncpus > 1:
                e.edx |= 1 << 28  # HTT: the logical-count field is valid
        elif e.function in (0xB, 0x1F):
            e.edx = index
    return out


def cpuid_to_list(table: list[KvmCpuidEntry2]) -> list[list[int]]:
    """Plain form for snapshot metadata: [function, index, flags, eax, ebx, ecx, edx]."""
    return [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in table]


def cpuid_from_list(rows: list[list[int]]) -> list[KvmCpuidEntry2]:
    out = []
    for r in rows:
        if not isinstance(r, list) or len(r) != 7 or \
                not all(isinstance(x, int) and 0 <= x < 2**32 for x in r):
            raise CpuidError("malformed CPUID entry")
        e = KvmCpuidEntry2()
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = r
        out.append(e)
    return out


def missing_features(needed: list[KvmCpuidEntry2], available: list[KvmCpuidEntry2]) -> list[str]:
    """Named features the guest was given that this host cannot give."""
    missing = []
    for name, (leaf, sub, reg, bit) in FEATURES.items():
        n, a = _find(needed, leaf, sub), _find(available, leaf, sub)
        if n is not None and getattr(n, reg) >> bit & 1 and (a is None or not getattr(a, reg) >> bit & 1):
            missing.append(name)
    return missing
