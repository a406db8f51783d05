"""What a virtio PCI function looks like to the driver: its configuration space, BAR0
layout, status and feature bits (virtio 1.x, 4.1). Values only; pci.py acts on them."""

from __future__ import annotations

import struct

from ..pci import PciFunction

VENDOR = 0x1AF4
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1 = 1 << 28, 1 << 29, 1 << 32
NO_VECTOR = 0xFFFF
BAR_SIZE = 0x8000
COMMON, ISR, DEVICE, NOTIFY, MSIX_TABLE, MSIX_PBA = 0x0, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
COMMON_SIZE, DEVICE_SIZE = 0x38, 0x1000
NOTIFY_MULT = 4
MAX_VECTORS = 64
_CAP_COMMON, _CAP_NOTIFY, _CAP_ISR, _CAP_DEVICE, _CAP_PCI = 1, 2, 3, 4, 5


def config_space(device_type: int, class_code: int, queues: int, vectors: int, bar: int,
                 irq: int) -> tuple[PciFunction, int, int]:
    """The function's config space, and where its PCI-config-access and MSI-X
    capabilities sit. Vendor capabilities (0x09) point the driver at BAR0's regions; the
    last one chains to MSI-X."""
    f = PciFunction(VENDOR, 0x1040 + device_type, class_code)
    cfg = f.config
    cfg[0x08] = 1  # revision 1: a modern-only device
    struct.pack_into("<HH", cfg, 0x2C, VENDOR, 0x40)  # subsystem
    struct.pack_into("<I", cfg, 0x10, bar)
    struct.pack_into("<I", f.wmask, 0x10, ~(BAR_SIZE - 1) & 0xFFFF_FFF0)
    cfg[0x06] |= 0x10  # capability list
    cfg[0x3C], cfg[0x3D] = irq, 1  # INTA# on `irq`
    caps = [(_CAP_COMMON, COMMON, COMMON_SIZE), (_CAP_NOTIFY, NOTIFY, NOTIFY_MULT * queues),
            (_CAP_ISR, ISR, 1), (_CAP_DEVICE, DEVICE, DEVICE_SIZE), (_CAP_PCI, 0, 0)]
    at, pos = [], 0x40
    for kind, _, _ in caps:  # notify and pci-cfg carry 4 more bytes
        at.append(pos)
        pos += 20 if kind in (_CAP_NOTIFY, _CAP_PCI) else 16
    msix, pci_cap = pos, 0
    cfg[0x34] = at[0]
    for i, (kind, off, length) in enumerate(caps):
        p, nxt = at[i], at[i + 1] if i + 1 < len(caps) else msix
        cfg[p:p + 16] = struct.pack("<BBBBB3xII", 0x09, nxt, nxt - p, kind, 0, off, length)
        if kind == _CAP_NOTIFY:
            struct.pack_into("<I", cfg, p + 16, NOTIFY_MULT)
        if kind == _CAP_PCI:  # bar, offset, length and data are the driver's to set
            f.wmask[p + 4] = 0xFF
            f.wmask[p + 8:p + 20] = b"\xff" * 12
            pci_cap = p
    struct.pack_into("<BBHII", cfg, msix, 0x11, 0, vectors - 1, MSIX_TABLE, MSIX_PBA)
    f.wmask[msix + 3] = 0xC0  # enable, function mask
    return f, pci_cap, msix
