"""The VM description: what the guest's machine is (a frozen, versioned value), apart from
the host resources that back it.

It lists every device with a stable id (`com1`, later `disk0`, `net0`, ...), its kind, its
bus range and IRQ, and the backend it had (a console spec, later a disk path or a tap).
The VM is built from it; the snapshot metadata records it; the migration stream sends it;
restore and receive rebuild from it. Binding rule: a recorded description never opens a
host path, socket or tap by itself. At restore and receive each backend is bound by id
from the command line (`--bind ID=SPEC`; `--console` is the shorthand for com1); the
console defaults to stdout; any other device whose backend is left unbound is refused,
naming its id, unless `--reuse-paths` reopens the recorded backends (the destination of a
migration over shared storage uses it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from .errors import PyhyveError

VIRTIO_KINDS = {"virtio-blk", "virtio-rng", "virtio-console", "virtio-net", "virtio-vsock"}
KINDS = {"uart16550", "i8042", "post", "pci-host", "pci-ecam", "vmgenid",
         "acpi-pm", "cmos-rtc"} | VIRTIO_KINDS
BUSES = {"pio", "mmio", "pci"}  # pci: `base` is the slot on bus 0, the BAR is assigned from it
PCI_SLOTS = 32
MAX_DEVICES = 64
_ID = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
CONSOLE_ID = "com1"


class DescriptionError(PyhyveError, ValueError):
    pass


_RESTORE_OPTIONS = re.compile(r",(?:clone=[^,]*|force|newmac)(?=,|$)")


def _without_restore_options(backend: str | None) -> str | None:
    return _RESTORE_OPTIONS.sub("", backend) if backend else backend


def _bounded(v: object, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < hi:
        raise DescriptionError(what)
    return v


@dataclass(frozen=True)
class DeviceDesc:
    id: str
    kind: str
    bus: str
    base: int
    length: int
    irq: int | None = None
    backend: str | None = None  # host resource spec; never opened unless bound or reused


@dataclass(frozen=True)
class VmDescription:
    VERSION: ClassVar[int] = 1
    devices: tuple[DeviceDesc, ...]

    def device(self, dev_id: str) -> DeviceDesc | None:
        return next((d for d in self.devices if d.id == dev_id), None)

    def to_dict(self) -> dict[str, Any]:
        """The record snapshots and streams carry: backends without the options one
        restore gave itself (`clone=DIR`, `force`, `newmac`), which must not steer a later
        one."""
        return {"version": self.VERSION,
                "devices": [{"id": d.id, "kind": d.kind, "bus": d.bus, "base": d.base,
                             "length": d.length, "irq": d.irq,
                             "backend": _without_restore_options(d.backend)}
                            for d in self.devices]}

    @classmethod
    def from_dict(cls, raw: object) -> VmDescription:
        """Validate a recorded description (untrusted: a file or a stream)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("devices"), list):
            raise DescriptionError("VM description: malformed")
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DescriptionError("VM description: bad version")
        if version > cls.VERSION:
            raise DescriptionError(f"VM description version {version}; this pyhyve reads up "
                                   f"to version {cls.VERSION}")
        if len(raw["devices"]) > MAX_DEVICES:
            raise DescriptionError(f"VM description: more than {MAX_DEVICES} devices")
        out, seen = [], set()
        for d in raw["devices"]:
            if not isinstance(d, dict):
                raise DescriptionError("VM description: malformed device")
            dev_id, kind, bus = d.get("id"), d.get("kind"), d.get("bus")
            if not isinstance(dev_id, str) or not _ID.match(dev_id) or dev_id in seen:
                raise DescriptionError(f"VM description: bad or repeated device id {dev_id!r}")
            seen.add(dev_id)
            if kind not in KINDS:
                raise DescriptionError(f"device {dev_id}: kind {kind!r} is not one this pyhyve "
                                       "can build")
            if bus not in BUSES:
                raise DescriptionError(f"device {dev_id}: bad bus {bus!r}")
            base = _bounded(d.get("base"), PCI_SLOTS if bus == "pci" else 1 << 64,
                            f"device {dev_id}: bad base")
            if (bus == "pci") != (kind in VIRTIO_KINDS):
                raise DescriptionError(f"device {dev_id}: {kind} cannot sit on bus {bus}")
            length = _bounded(d.get("length"), 1 << 32, f"device {dev_id}: bad length")
            irq, backend = d.get("irq"), d.get("backend")
            if irq is not None and (not isinstance(irq, int) or isinstance(irq, bool)
                                    or not 0 <= irq < 24):
                raise DescriptionError(f"device {dev_id}: bad irq")
            if bus == "pci" and irq in PLATFORM_IRQS:
                raise DescriptionError(f"device {dev_id}: irq {irq} is a platform device's "
                                       "(timer, keyboard, cascade, COM1, RTC, SCI, mouse, FPU)")
            if backend is not None and (not isinstance(backend, str) or len(backend) > 4096):
                raise DescriptionError(f"device {dev_id}: bad backend")
            out.append(DeviceDesc(dev_id, kind, bus, base, length, irq, backend))
        slots = [d.base for d in out if d.bus == "pci"]
        if 0 in slots or len(set(slots)) != len(slots):
            raise DescriptionError("VM description: PCI slot 0 or a slot used twice")
        return cls(tuple(out))


GENID_ID = "genid"
GENID_BASE, GENID_LENGTH = 0xFED0_2000, 0x1000  # devices/genid.py: the guest's view


ECAM_ID = "ecam"
ECAM_BASE, ECAM_LENGTH = 0xF000_0000, 1 << 20  # in the MMIO hole; devices/pci.py PciEcam


ACPI_PM_ID = "acpi-pm"
ACPI_PM_BASE, ACPI_PM_LENGTH = 0x600, 6      # PM1a event + control blocks (FADT)
SCI_IRQ = 9


def default_description(console: str | None, genid: bool = True) -> VmDescription:
    """The machine a new VM gets. Format 1 and 2 snapshots imply it without the generation
    ID, ECAM, ACPI PM and RTC devices (`genid=False`), which came later (later records
    list their devices)."""
    devices = [
        DeviceDesc(CONSOLE_ID, "uart16550", "pio", 0x3F8, 8, 4, console),
        DeviceDesc("i8042", "i8042", "pio", 0x60, 5),
        DeviceDesc("post", "post", "pio", 0x80, 1),
        DeviceDesc("pci", "pci-host", "pio", 0xCF8, 8),
    ]
    if genid:
        devices.append(DeviceDesc(GENID_ID, "vmgenid", "mmio", GENID_BASE, GENID_LENGTH))
        devices.append(DeviceDesc(ECAM_ID, "pci-ecam", "mmio", ECAM_BASE, ECAM_LENGTH))
        devices.append(DeviceDesc(ACPI_PM_ID, "acpi-pm", "pio", ACPI_PM_BASE, ACPI_PM_LENGTH,
                                  SCI_IRQ))
        devices.append(DeviceDesc("rtc", "cmos-rtc", "pio", 0x70, 2, 8))
    return VmDescription(tuple(devices))


# INTx lines for virtio functions: not 4 (COM1), 9 (the ACPI SCI), 0-2, 8, 12, 13 (the
# PIT, the PIC cascade, the RTC's, mouse and FPU lines PCs keep)
INTX_IRQS = (10, 11, 5, 7, 6, 14, 15, 3, 16, 17, 18, 19, 20, 21, 22, 23)
PLATFORM_IRQS = frozenset({0, 1, 2, 4, 8, 9, 12, 13})  # never a PCI device's INTx


def with_virtio(desc: VmDescription, disks: list[str], rng: bool,
                slots: list[str] | None = None,
                vconsoles: list[str] | None = None,
                nets: list[str] | None = None,
                vsocks: list[str] | None = None) -> VmDescription:
    """`desc` plus virtio devices: disk0.. (backend PATH[,ro][,serial=ID]) and rng0, each
    in a PCI slot with an INTx line of its own (MSI-X is what drivers use; INTx is the
    fallback). `slots` are bhyve's `-s SLOT,EMULATION[,CONF]` (virtio-blk,PATH...;
    virtio-rnd; hostbridge and lpc, which every pyhyve VM has, are accepted and ignored);
    they keep their slot, --disk and --rng devices take the free ones from 1 on."""
    wanted: list[tuple[int | None, str, str | None]] = []
    for item in slots or []:
        slot_text, _, rest = item.partition(",")
        emulation, _, conf = rest.partition(",")
        slot_text = slot_text.split(":")[0]  # SLOT or SLOT:FUNCTION (function 0 only)
        if not slot_text.isdigit() or not 0 <= int(slot_text) < PCI_SLOTS:
            raise DescriptionError(f"bad -s '{item}': use SLOT,EMULATION[,CONF] with a slot "
                                   f"below {PCI_SLOTS}")
        slot = int(slot_text)
        if emulation in ("hostbridge", "lpc"):
            continue
        if slot == 0:
            raise DescriptionError(f"bad -s '{item}': slot 0 is the host bridge")
        if emulation == "virtio-blk" and conf:
            wanted.append((slot, "virtio-blk", conf))
        elif emulation in ("virtio-rnd", "virtio-rng") and not conf:
            wanted.append((slot, "virtio-rng", None))
        elif emulation == "virtio-net" and conf:  # bhyve: -s 2,virtio-net,tap0[,mac=M]
            wanted.append((slot, "virtio-net", conf if conf.startswith(("tap:", "loop"))
                           else "tap:" + conf))
        elif emulation == "virtio-console" and conf:
            wanted.append((slot, "virtio-console", "unix:" + conf[6:]
                           if conf.startswith("port1=") else conf))
        else:
            raise DescriptionError(f"bad -s '{item}': emulations here are virtio-blk,PATH"
                                   "[,ro][,serial=ID], virtio-net,TAP[,mac=MAC], virtio-rnd "
                                   "and virtio-console,unix:PATH|file:PATH|port1=PATH")
    wanted += [(None, "virtio-blk", spec) for spec in disks]
    wanted += [(None, "virtio-console", spec) for spec in vconsoles or []]
    wanted += [(None, "virtio-net", spec) for spec in nets or []]
    wanted += [(None, "virtio-vsock", spec) for spec in vsocks or []]
    if rng:
        wanted.append((None, "virtio-rng", None))
    if len(wanted) > len(INTX_IRQS):
        raise DescriptionError(f"at most {len(INTX_IRQS)} virtio devices")
    taken = [s for s, _, _ in wanted if s is not None]
    if len(set(taken)) != len(taken):
        raise DescriptionError("two devices in one PCI slot")
    free = (n for n in range(1, PCI_SLOTS) if n not in taken)
    extra, counts = [], {k: 0 for k in VIRTIO_KINDS}
    prefixes = {"virtio-blk": "disk", "virtio-rng": "rng", "virtio-console": "vconsole",
                "virtio-net": "net", "virtio-vsock": "vsock"}
    for at, kind, spec in wanted:
        n = at if at is not None else next(free)
        prefix = prefixes[kind]
        extra.append(DeviceDesc(f"{prefix}{counts[kind]}", kind, "pci", n, 0x8000,
                                INTX_IRQS[(n - 1) % len(INTX_IRQS)], spec))
        counts[kind] += 1
    if counts["virtio-rng"] > 1 or counts["virtio-vsock"] > 1:
        raise DescriptionError("one virtio-rng device is enough, and one virtio-vsock")
    return VmDescription(desc.devices + tuple(sorted(extra, key=lambda d: d.base)))


def bind(desc: VmDescription, bindings: dict[str, str], reuse_paths: bool) -> VmDescription:
    """The description with every backend chosen by the binding rule (module docstring)."""
    unknown = sorted(set(bindings) - {d.id for d in desc.devices})
    if unknown:
        raise DescriptionError(f"--bind names no device of this VM: {', '.join(unknown)}")
    out = []
    for d in desc.devices:
        if d.id in bindings:
            out.append(replace(d, backend=bindings[d.id]))
        elif d.backend is None or reuse_paths:
            out.append(d)
        elif d.id == CONSOLE_ID:
            out.append(replace(d, backend="stdio"))  # the console defaults to stdout
        else:
            raise DescriptionError(f"device {d.id} had the backend {d.backend!r}: bind one "
                                   f"with --bind {d.id}=SPEC, or pass --reuse-paths")
    return VmDescription(tuple(out))


def parse_bindings(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        dev_id, sep, spec = item.partition("=")
        if not sep or not _ID.match(dev_id) or not spec:
            raise DescriptionError(f"bad --bind '{item}': use ID=SPEC, e.g. com1=file:/var/log/vm.log")
        if dev_id in out:
            raise DescriptionError(f"--bind {dev_id} given twice")
        out[dev_id] = spec
    return out
