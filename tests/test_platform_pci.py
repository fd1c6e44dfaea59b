# SPDX-License-Identifier: GPL-2.0-or-later
"""PCI: configuration mechanism #1, type-0 header semantics and BAR mapping through the
ports, the reset control byte, pci-testdev's tests (with real ioeventfds for its eventfd
tests), and a guest that finds the device and runs them through both BARs."""

from __future__ import annotations

import pytest

from pyvmm.devices.bus import Counter, MmioBus, PioBus
from pyvmm.devices.pci import (COMMAND, COMMAND_IO, COMMAND_MEMORY, IO_WINDOW,
                               MEM_WINDOW, Bar, PciBus, PciFunction)
from pyvmm.devices.pci_testdev import DATAMATCH, NOMATCH, PciTestdev
from pyvmm.platform import PcPlatform


def cfg_addr(dev: int, reg: int, fn: int = 0, bus: int = 0, enable: bool = True) -> bytes:
    value = (1 << 31 if enable else 0) | bus << 16 | dev << 11 | fn << 8 | reg
    return value.to_bytes(4, "little")


class Cfg:
    """Config cycles through the PIO bus, as a guest makes them."""

    def __init__(self, pio: PioBus) -> None:
        self.pio = pio

    def read(self, dev: int, reg: int, size: int = 4, **kw) -> int:
        self.pio.write(0xCF8, cfg_addr(dev, reg & 0xFC, **kw))
        return int.from_bytes(self.pio.read(0xCFC + (reg & 3), size), "little")

    def write(self, dev: int, reg: int, value: int, size: int = 4, **kw) -> None:
        self.pio.write(0xCF8, cfg_addr(dev, reg & 0xFC, **kw))
        self.pio.write(0xCFC + (reg & 3), value.to_bytes(size, "little"))


@pytest.fixture
def buses():
    pio, mmio = PioBus(), MmioBus()
    resets = []
    bus = PciBus(pio, mmio, on_reset=lambda: resets.append(1))
    bus.attach()
    bells = []

    class Bell:
        def __init__(self, *args):
            self.args, self.removed = args, False
            bells.append(self)

        def remove(self):
            self.removed = True

    dev = PciTestdev(doorbell=Bell)
    bus.add(2, 0, dev)
    return pio, mmio, bus, dev, Cfg(pio), resets, bells


def test_unaligned_latched_register_is_ored_with_the_port_offset(buses):
    pio, *_ = buses
    # kvm-unit-tests latches register 2 and reads the device ID from 0xcfc (QEMU's rule)
    pio.write(0xCF8, (0x80000000 | 2 << 11 | 2).to_bytes(4, "little"))
    assert pio.read(0xCFC, 2) == (0x0005).to_bytes(2, "little")
    pio.write(0xCF8, (0x80000000 | 2 << 11 | 0xFE).to_bytes(4, "little"))
    assert pio.read(0xCFF, 1) == b"\x00"       # stays inside the header: no host error
    assert pio.read(0xCFE, 2) == b"\x00\x00"


def test_identity_and_absent_functions(buses):
    pio, _, _, _, cfg, _, _ = buses
    assert cfg.read(0, 0) == 0x12378086                     # i440FX host bridge
    assert cfg.read(0, 0x08) >> 8 == 0x060000                # class: host bridge
    assert cfg.read(2, 0) == 0x00051B36                      # pci-testdev
    assert cfg.read(2, 0x08) >> 8 == 0x00FF00
    assert cfg.read(2, 0x3D, 1) == 0                         # no interrupt pin
    assert cfg.read(2, 2, 2) == 0x0005                       # 16-bit read at offset 2
    assert cfg.read(5, 0) == 0xFFFFFFFF                      # nobody there
    assert cfg.read(2, 0, fn=1) == 0xFFFFFFFF
    assert cfg.read(2, 0, bus=1) == 0xFFFFFFFF               # only bus 0
    assert cfg.read(2, 0, enable=False) == 0xFFFFFFFF        # enable bit clear


def test_address_latch_reads_back_and_narrow_accesses_do_not_latch(buses):
    pio, *_ = buses
    pio.write(0xCF8, (0x80000000).to_bytes(4, "little"))
    assert pio.read(0xCF8, 4) == (0x80000000).to_bytes(4, "little")
    pio.write(0xCF8, b"\x00\x00")                            # 16 bits: ignored
    assert pio.read(0xCF8, 4) == (0x80000000).to_bytes(4, "little")
    assert pio.read(0xCFA, 2) == b"\xff\xff"


def test_read_only_registers_keep_their_value(buses):
    _, _, _, _, cfg, _, _ = buses
    cfg.write(2, 0, 0x12345678)
    cfg.write(2, 0x08, 0)
    cfg.write(2, 0x3D, 7, 1)
    assert cfg.read(2, 0) == 0x00051B36 and cfg.read(2, 0x08) >> 8 == 0x00FF00
    assert cfg.read(2, 0x3D, 1) == 0
    cfg.write(2, 0x3C, 11, 1)                                # interrupt line: writable
    cfg.write(2, 0x0C, 0x10, 1)                              # cache line size: writable
    assert cfg.read(2, 0x3C, 1) == 11 and cfg.read(2, 0x0C, 1) == 0x10
    cfg.write(2, 0x18, 0xFFFFFFFF)                           # BAR2: not implemented
    assert cfg.read(2, 0x18) == 0


def test_firmware_assignment_and_bar_sizing(buses):
    pio, mmio, _, dev, cfg, _, _ = buses
    mem, io = cfg.read(2, 0x10), cfg.read(2, 0x14)
    assert mem == MEM_WINDOW[1] - 4096 == 0xFEBFF000 and io == IO_WINDOW[0] | 1
    assert cfg.read(2, COMMAND, 2) & (COMMAND_IO | COMMAND_MEMORY) == COMMAND_IO | COMMAND_MEMORY
    assert mmio.find(mem, 4096) is not None and pio.find(IO_WINDOW[0], 256) is not None
    cfg.write(2, 0x10, 0xFFFFFFFF)
    assert cfg.read(2, 0x10) == 0xFFFFF000                   # 4 KiB, 32-bit memory
    assert mmio.find(0xFFFFF000) is None                      # being sized: not decoded
    cfg.write(2, 0x14, 0xFFFFFFFF)
    assert cfg.read(2, 0x14) == 0xFFFFFF01                   # 256 ports, I/O
    cfg.write(2, 0x10, mem)
    cfg.write(2, 0x14, io)
    assert mmio.find(mem) is not None and pio.find(IO_WINDOW[0]) is not None


def test_moving_a_bar_and_turning_decode_off(buses):
    pio, mmio, _, dev, cfg, _, _ = buses
    cfg.write(2, 0x10, 0xFD000000)
    assert mmio.find(MEM_WINDOW[1] - 4096) is None
    assert mmio.find(0xFD000000).device is dev.bar(0).device
    cfg.write(2, COMMAND, COMMAND_IO, 2)                      # memory decode off
    assert mmio.find(0xFD000000) is None and pio.find(IO_WINDOW[0]) is not None
    cfg.write(2, COMMAND, 0, 2)
    assert pio.find(IO_WINDOW[0]) is None
    cfg.write(2, COMMAND, COMMAND_IO | COMMAND_MEMORY, 2)
    assert mmio.find(0xFD000000) is not None


def test_a_bar_over_another_device_is_refused_not_a_crash(buses):
    pio, mmio, bus, _, cfg, _, _ = buses
    pio.register(0xD000, 0x100, Counter())
    cfg.write(2, 0x14, 0xD000)
    assert bus.refused_bars == 1 and isinstance(pio.find(0xD000).device, Counter)
    cfg.write(2, 0x14, 0xE000)                                # elsewhere: mapped again
    assert pio.find(0xE000) is not None


def test_reset_control_register(buses):
    pio, _, bus, _, _, resets, _ = buses
    pio.write(0xCF9, b"\x02")                                 # hard-reset select, no reset
    assert resets == [] and pio.read(0xCF9, 1) == b"\x02"
    pio.write(0xCF9, b"\x06")
    assert resets == [1]


def test_testdev_header_and_tests(buses):
    pio, mmio, _, dev, cfg, _, bells = buses
    mem = cfg.read(2, 0x10)
    io = cfg.read(2, 0x14) & ~3
    assert mmio.read(mem, 4) == bytes(4)                      # no test selected: zeros
    mmio.write(mem, b"\x00")                                  # mmio-no-eventfd
    assert dev.current == "mmio-no-eventfd"
    assert mmio.read(mem, 1) == b"\x00" and mmio.read(mem + 1, 1) == b"\x01"   # test, width
    offset = int.from_bytes(mmio.read(mem + 4, 4), "little")
    assert offset == 2048 and int.from_bytes(mmio.read(mem + 8, 4), "little") == DATAMATCH
    for _ in range(3):
        mmio.write(mem + offset, bytes([DATAMATCH]))
    mmio.write(mem + offset, b"\x01")                         # wrong data: not counted
    mmio.write(mem + offset + 1, bytes([DATAMATCH]))          # wrong place: not counted
    assert int.from_bytes(mmio.read(mem + 12, 4), "little") == 3
    name = bytes(mmio.read(mem + 16 + i, 1)[0] for i in range(20))
    assert name == b"mmio-no-eventfd" + bytes(5)
    assert bells == []                                        # no eventfd for this one

    pio.write(io, b"\x01")                                    # portio-wildcard-eventfd
    assert dev.current == "portio-wildcard-eventfd"
    assert pio.read(io, 1) == b"\x04"                         # global test number 3 + 1
    assert int.from_bytes(pio.read(io + 8, 4), "little") == NOMATCH
    assert int.from_bytes(pio.read(io + 4, 4), "little") == 128 + 4
    (bell,) = bells
    address, length, datamatch = bell.args
    assert address.is_pio and address.addr == io + 132 and length == 1 and datamatch is None
    pio.write(io, b"\x02")                                    # datamatch: a new eventfd
    assert bell.removed and bells[1].args[2] == DATAMATCH
    pio.write(io, b"\x07")                                    # beyond the tests: deselect
    assert dev.current is None and bells[1].removed
    assert pio.read(io, 4) == bytes(4)


def test_bad_function_setup_is_refused(buses):
    _, _, bus, _, _, _, _ = buses
    with pytest.raises(ValueError, match="taken"):
        bus.add(2, 0, PciTestdev())
    with pytest.raises(ValueError):
        bus.add(32, 0, PciTestdev())
    with pytest.raises(ValueError):
        PciFunction(vendor_id=1, device_id=1, class_code=0, bars=[Bar(24, io=False, device=None)])
    with pytest.raises(ValueError):
        PciFunction(vendor_id=1, device_id=1, class_code=0, bars=[None] * 7)


def test_guest_finds_the_testdev_and_runs_its_tests(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        pc.machine.load("pc_pci")
        result = pc.run(timeout=30)
        bells = [(b.address.is_pio, b.datamatch, b.count) for b in pc.machine.doorbells]
    assert result.ok, result.summary()
    got = {r.tag: r.value64 for r in result.reports}
    assert got == {1: 0x12378086, 2: 0x00051B36, 3: 0xFFFFFFFF,
                   4: 0xFEBFF000, 5: IO_WINDOW[0] | 1, 6: 0xFFFFF000,
                   7: 16,               # counted by the Python device
                   8: 0, 9: 0,          # taken by the kernel's ioeventfds
                   10: int.from_bytes(b"port", "little"), 11: 0}
    # ... where the doorbells counted every one of them, without a userspace exit
    assert bells == [(False, DATAMATCH, 16), (True, None, 16)]
    assert result.exits["MmioExit"] < 40 and result.exits["IoExit"] < 40
