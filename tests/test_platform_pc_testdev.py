# SPDX-License-Identifier: GPL-2.0-or-later
"""pc-testdev: the scratch register's partial-width semantics, the IRQ-line and flush-page
ports, the MMIO scratch area, and a guest that raises an interrupt line into the in-kernel
IOAPIC and sees it pending in its LAPIC."""

from __future__ import annotations

import pytest

from pyvmm.devices.pc_testdev import (IOMEM_BASE, IOMEM_SIZE, IRQ_LINES, FlushPort, IoMem,
                                      IrqLines, PcTestdev, ScratchPort, flush_guest_page)
from pyvmm.devices.bus import MmioBus, PioBus
from pyvmm.platform import PcPlatform


def test_scratch_register_partial_widths():
    s = ScratchPort()
    s.write(0, (0x12345678).to_bytes(4, "little"))
    s.write(1, b"\xab")                                 # bits 8-15
    assert s.value == 0x1234AB78
    assert s.read(0, 4) == (0x1234AB78).to_bytes(4, "little")
    assert s.read(2, 2) == (0x1234).to_bytes(2, "little")
    assert s.read(3, 1) == b"\x12"
    s.write(2, b"\xcd\xef")                             # bits 16-31
    assert s.value == 0xEFCDAB78
    s.write(3, b"\x01\x02")                             # what passes bit 31 is dropped
    assert s.value == 0x01CDAB78
    assert s.read(3, 2) == b"\x01\x00"


def test_both_scratch_ranges_share_the_register():
    pio, mmio = PioBus(), MmioBus()
    dev = PcTestdev(set_irq=lambda *a: None, flush_page=lambda gpa: None)
    dev.attach(pio, mmio)
    pio.write(0xE0, b"\x11\x22\x33\x44")
    assert pio.read(0xE8, 4) == b"\x11\x22\x33\x44"
    pio.write(0xEA, b"\x99")
    assert pio.read(0xE0, 4) == b"\x11\x22\x99\x44"


def test_irq_lines_take_byte_writes_only():
    calls = []
    irq = IrqLines(set_irq=lambda line, level: calls.append((line, level)))
    irq.write(14, b"\x01")
    irq.write(14, b"\x00")
    irq.write(3, b"\x80")                       # any non-zero byte is "high"
    irq.write(23, b"\x01")                      # the 24 IOAPIC pins
    irq.write(5, b"\x01\x00")                   # not a byte: ignored
    irq.write(IRQ_LINES, b"\x01")               # beyond the lines: ignored
    assert calls == [(14, 1), (14, 0), (3, 1), (23, 1)]
    assert irq.levels[3] == 1 and irq.levels[14] == 0
    assert irq.read(0, 1) == b"\xff"


def test_flush_port_passes_the_page_of_32_bit_writes():
    pages = []
    port = FlushPort(pages.append)
    port.write(0, (0x12345ABC).to_bytes(4, "little"))
    port.write(0, b"\x00\x10")                 # 16 bits: ignored
    port.write(1, b"\x00\x10\x00")             # not at the port: ignored
    assert pages == [0x12345000] and port.flushes == 1


def test_iomem_reads_back_at_every_width():
    mem = IoMem()
    mem.write(0x10, (0x1122334455667788).to_bytes(8, "little"))
    assert mem.read(0x10, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert mem.read(0x12, 2) == b"\x66\x55"
    mem.write(IOMEM_SIZE - 1, b"\x01\x02")     # past the end: ignored, never a host error
    assert mem.read(IOMEM_SIZE - 2, 4) == b"\xff" * 4
    assert mem.read(IOMEM_SIZE - 1, 1) == b"\x00"


def test_flush_guest_page_keeps_the_contents(machine):
    machine.add_memory(0, 0x10000)
    machine.memory.write(0x3000, b"keep me")
    assert flush_guest_page(machine.memory, 0x3123) is True
    assert machine.memory.read(0x3000, 7) == b"keep me"
    machine.memory.write(0x3000, b"written")     # and it is writable again
    assert machine.memory.read(0x3000, 7) == b"written"
    assert flush_guest_page(machine.memory, 0x100000) is False   # not RAM: nothing to do


def test_guest_drives_the_testdev_and_an_irq_line_into_its_lapic(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        payload = pc.machine.load("pc_testdev")
        result = pc.run(timeout=30)
        page = payload.symbol("flushme")
        assert pc.machine.memory.read(page, 4) == b"\x5a" * 4
    assert result.ok, result.summary()
    got = {r.tag: r.value64 for r in result.reports}
    assert got == {1: 0x1234AB78, 2: 0x1234, 3: 0x1234AB78, 4: 0x5566778811223344,
                   5: 0x5A5A5A5A,
                   6: 0,        # nothing pending before the line rises
                   7: 1,        # line 14 -> IOAPIC pin 14 -> LAPIC IRR bit of vector 0x40
                   8: 1}        # level-triggered and not yet EOIed: remote IRR set
    assert pc.testdev.flush.flushes == 1
    assert pc.testdev.irq.levels[14] == 0
    assert bytes(pc.testdev.iomem.data[0x10:0x18]) == (0x5566778811223344).to_bytes(8, "little")


def test_platform_without_testdev_leaves_its_ports_unclaimed(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm, testdev=False) as pc:
        assert pc.testdev is None
        assert pc.machine.pio.find(0xE0) is None and pc.machine.mmio.find(IOMEM_BASE) is None


@pytest.mark.parametrize("port,size", [(0xE0, 4), (0xE4, 4), (0x2000, 1)])
def test_testdev_ports_are_on_the_platform_bus(kvm, port, size):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        assert pc.machine.pio.find(port, size) is not None
