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
