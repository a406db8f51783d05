from pyhyve.devices.pci import PciFunction, PciHostBridge


def cfg(bus, dev, fn, reg):
    return 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | reg


def test_host_bridge_ids_and_absent_slots():
    p = PciHostBridge()
    p.write(0, 4, cfg(0, 0, 0, 0))
    assert p.read(0, 4) == cfg(0, 0, 0, 0)
    assert p.read(4, 4) == 0x0D57_8086
    p.write(0, 4, cfg(0, 0, 0, 8))
    assert p.read(4 + 3, 1) == 0x06  # class: bridge
    p.write(0, 4, cfg(0, 5, 0, 0))
    assert p.read(4, 4) == 0xFFFF_FFFF
    assert p.read(4, 2) == 0xFFFF


def test_disabled_address_reads_all_ones():
    p = PciHostBridge()
    p.write(0, 4, 0)
    assert p.read(4, 4) == 0xFFFF_FFFF


def test_write_mask_and_added_function():
    p = PciHostBridge()
    f = PciFunction(0x1AF4, 0x1041, 0x020000)
    p.add(3, f)
    p.write(0, 4, cfg(0, 3, 0, 0))
    assert p.read(4, 4) == 0x1041_1AF4
    p.write(4, 4, 0xFFFF_FFFF)  # read-only ids
    assert p.read(4, 4) == 0x1041_1AF4
    p.write(0, 4, cfg(0, 3, 0, 4))
    p.write(4, 2, 0x0007)
    assert p.read(4, 2) == 0x0007
    p.write(0, 4, cfg(0, 3, 0, 0x3C))
    p.write(4, 1, 11)
    assert p.read(4, 1) == 11


def test_a_shared_intx_line_stays_high_while_any_device_holds_it():
    """Two devices on one pin: one lowering its INTx must not drop the other's pending
    interrupt (KVM_IRQ_LINE keeps one level per line and source)."""
    from pyhyve.devices.base import IrqLines

    levels: list[tuple[int, int]] = []
    lines = IrqLines(lambda irq, level: levels.append((irq, level)))
    a, b, uart = lines.source(), lines.source(), lines.source()
    a(10, 1)
    b(10, 1)
    a(10, 0)                       # the driver read A's ISR; B still waits
    assert levels[-1] == (10, 1)
    uart(4, 1)
    uart(4, 0)                     # another pin is its own line
    assert levels[-1] == (4, 0)
    b(10, 0)
    assert levels[-1] == (10, 0)
    a(10, 0)                       # lowering twice is harmless
    assert levels[-1] == (10, 0)
