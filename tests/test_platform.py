# SPDX-License-Identifier: GPL-2.0-or-later
"""PcPlatform as a whole: the RAM layout and memory map, where every device sits, what it
refuses, and its lifetime."""

from __future__ import annotations

import pytest

from pyvmm import Machine
from pyvmm.platform import (BIOS_AREA_END, CONVENTIONAL_END, GIB, HIGHMEM_BASE, MIB,
                            MemoryType, PcPlatform, memory_map, ram_layout)


def test_ram_layout_keeps_small_ram_low_and_splits_large_ram_at_3_gib():
    assert ram_layout(128 * MIB) == [(0, 128 * MIB)]
    assert ram_layout(0xE0000000) == [(0, 0xE0000000)]
    assert ram_layout(5 * GIB) == [(0, 3 * GIB), (HIGHMEM_BASE, 2 * GIB)]
    for bad in (1 * MIB, 128 * MIB + 1, 0, -4096):
        with pytest.raises(ValueError):
            ram_layout(bad)


def test_memory_map_reserves_the_bios_area():
    ranges = memory_map(64 * MIB)
    assert [(r.base, r.end, r.type) for r in ranges] == [
        (0, CONVENTIONAL_END, MemoryType.USABLE),
        (CONVENTIONAL_END, BIOS_AREA_END, MemoryType.RESERVED),
        (BIOS_AREA_END, 64 * MIB, MemoryType.USABLE)]
    high = memory_map(5 * GIB)
    assert (high[-1].base, high[-1].length) == (HIGHMEM_BASE, 2 * GIB)
    assert sum(r.length for r in high if r.type == MemoryType.USABLE) == \
        5 * GIB - (BIOS_AREA_END - CONVENTIONAL_END)


EXPECTED_PIO = {0x60: "_Port", 0x64: "_Port", 0x70: "Rtc", 0x92: "SystemControlA",
                0xE0: "ScratchPort", 0xE4: "FlushPort", 0xE8: "ScratchPort",
                0xF4: "DebugExit", 0x3F8: "SerialConsole", 0x510: "FwCfg", 0x600: "AcpiPm",
                0xCF8: "ConfigAddressPort", 0xCFC: "ConfigDataPort", 0x2000: "IrqLines",
                0xC000: "_Window"}


def test_every_device_is_where_qemu_has_it(kvm):
    with PcPlatform.create(vcpus=2, memory_size=32 * MIB, kvm=kvm) as pc:
        pio = {m.base: type(m.device).__name__ for m in pc.machine.pio.devices()}
        mmio = {m.base: (m.length, type(m.device).__name__) for m in pc.machine.mmio.devices()}
        assert pio == EXPECTED_PIO
        assert mmio == {0xFEBFF000: (4096, "_Window"), 0xFF000000: (0x10000, "IoMem")}
        assert [(r.guest_addr, r.size) for r in pc.machine.memory.regions(0)] == [
            (0, 32 * MIB)]
        assert pc.acpi.rsdp_address == 0xE0000
        assert pc.machine.memory.read(0xE0000, 8) == b"RSD PTR "


def test_an_os_platform_leaves_the_test_devices_out(kvm):
    with PcPlatform.create(memory_size=32 * MIB, kvm=kvm, testdev=False,
                           pci_testdev=False) as pc:
        bases = {m.base for m in pc.machine.pio.devices()}
        assert not bases & {0xE0, 0xE4, 0xE8, 0x2000, 0xC000}
        assert pc.pci.functions.keys() == {0}
        assert pc.machine.mmio.devices() == []


def test_ram_above_4_gib(kvm):
    with PcPlatform.create(memory_size=5 * GIB, kvm=kvm, pci_testdev=False) as pc:
        regions = [(r.guest_addr, r.size) for r in pc.machine.memory.regions(0)]
        assert regions == [(0, 3 * GIB), (HIGHMEM_BASE, 2 * GIB)]
        pc.machine.memory.write(HIGHMEM_BASE + GIB, b"high")
        assert pc.machine.memory.read(HIGHMEM_BASE + GIB, 4) == b"high"
        assert pc.rtc.cmos[0x5B] | pc.rtc.cmos[0x5C] << 8 | pc.rtc.cmos[0x5D] << 16 == \
            (2 * GIB) >> 16


def test_refusals(kvm):
    with Machine(kvm=kvm) as m:
        with pytest.raises(ValueError, match="irqchip"):
            PcPlatform(m)
    with Machine(kvm=kvm, irqchip=True, memory_size=MIB) as m:
        with pytest.raises(ValueError, match="RAM itself"):
            PcPlatform(m)
    for vcpus in (0, 256):
        with pytest.raises(ValueError):
            PcPlatform.create(vcpus=vcpus, kvm=kvm)
    with pytest.raises(ValueError):
        PcPlatform.create(memory_size=3 * MIB + 1, kvm=kvm)


def test_close_closes_the_machine_and_stops_the_rtc_timer(kvm):
    pc = PcPlatform.create(memory_size=16 * MIB, kvm=kvm)
    pc.rtc.write(0, b"\x0b")
    pc.rtc.write(1, b"\x12")          # update-ended interrupt: the timer runs
    assert pc.rtc.timer_running
    pc.close()
    assert pc.machine.vm.closed and not pc.rtc.timer_running
    pc.close()                        # idempotent
