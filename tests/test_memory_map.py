# SPDX-License-Identifier: GPL-2.0-or-later
"""The one memory-map builder (pyvmm.loaders.memory_map) and the three maps built on it: the
PC platform's, the Linux loaders' e820/PVH map and the multiboot loader's default map."""

from __future__ import annotations

import pytest

from pyvmm import platform
from pyvmm.loaders import linuxboot, multiboot
from pyvmm.loaders.memory_map import (ACPI, PC_BIOS_HOLE, RESERVED, USABLE, MapEntry,
                                      build_memory_map)

MIB = 1 << 20
GIB = 1 << 30
HOLE_START, HOLE_END = 0x9FC00, 0x100000


def _covers_ram_exactly(entries, ram):
    """Every RAM byte is in exactly one entry, and no entry lies outside RAM."""
    spans = sorted((e.base, e.end) for e in entries)
    for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False):
        assert a_end <= b_start, spans
    assert sum(e.length for e in entries) == sum(size for _, size in ram)
    for e in entries:
        assert any(base <= e.base and e.end <= base + size for base, size in ram), e


def test_ram_above_1mib_reserves_the_bios_area():
    entries = build_memory_map([(0, 64 * MIB)])
    assert entries == [(0, HOLE_START, USABLE), (HOLE_START, HOLE_END - HOLE_START, RESERVED),
                       (HOLE_END, 63 * MIB, USABLE)]
    assert all(isinstance(e, MapEntry) for e in entries)
    assert entries[-1].end == 64 * MIB
    _covers_ram_exactly(entries, [(0, 64 * MIB)])


@pytest.mark.parametrize("size, expected", [
    (0x80000, [(0, 0x80000, USABLE)]),                       # ends before the EBDA
    (HOLE_START, [(0, HOLE_START, USABLE)]),                 # ends exactly where it starts
    (0xA0000, [(0, HOLE_START, USABLE), (HOLE_START, 0xA0000 - HOLE_START, RESERVED)]),
    (HOLE_END, [(0, HOLE_START, USABLE), (HOLE_START, HOLE_END - HOLE_START, RESERVED)]),
])
def test_ram_below_1mib_reports_only_the_reserved_part_it_has(size, expected):
    assert build_memory_map([(0, size)]) == expected


def test_ram_starting_inside_the_bios_area():
    assert build_memory_map([(0xC0000, 2 * MIB)]) == [
        (0xC0000, HOLE_END - 0xC0000, RESERVED), (HOLE_END, 0xC0000 + 2 * MIB - HOLE_END, USABLE)]


def test_split_ram_around_the_pci_hole_keeps_its_pieces():
    ram = [(4 * GIB, 2 * GIB), (0, 3 * GIB)]                   # any order in
    entries = build_memory_map(ram, pci_hole=(3 * GIB, 4 * GIB))
    assert entries[-1] == (4 * GIB, 2 * GIB, USABLE)
    assert [e.base for e in entries] == sorted(e.base for e in entries)
    _covers_ram_exactly(entries, ram)


@pytest.mark.parametrize("ram", [[(0, 3 * GIB + 4096)], [(3 * GIB, 4096)],
                                 [(0, 8 * GIB)], [(0, MIB), (0xFFFFF000, 4096)]])
def test_ram_in_the_pci_hole_is_an_error(ram):
    with pytest.raises(ValueError, match="PCI hole"):
        build_memory_map(ram, pci_hole=(3 * GIB, 4 * GIB))


def test_reserved_ranges_of_the_caller():
    acpi = (0x7FF0000, 0x10000, ACPI)
    mmio_fw = (0x100000, 0x1000, RESERVED)
    entries = build_memory_map([(0, 128 * MIB)], reserved=[acpi, mmio_fw, PC_BIOS_HOLE])
    assert entries == [
        (0, HOLE_START, USABLE), (HOLE_START, HOLE_END - HOLE_START, RESERVED),
        (0x100000, 0x1000, RESERVED), (0x101000, 0x7FF0000 - 0x101000, USABLE),
        (0x7FF0000, 0x10000, ACPI)]
    _covers_ram_exactly(entries, [(0, 128 * MIB)])
    assert build_memory_map([(0, 4 * MIB)], reserved=()) == [(0, 4 * MIB, USABLE)]


def test_a_reserved_range_over_two_ram_pieces_is_cut_at_each():
    ram = [(0, 2 * MIB), (2 * MIB, 2 * MIB)]
    entries = build_memory_map(ram, reserved=[(MIB, 2 * MIB, RESERVED)])
    assert entries == [(0, MIB, USABLE), (MIB, MIB, RESERVED), (2 * MIB, MIB, RESERVED),
                       (3 * MIB, MIB, USABLE)]


def test_a_reserved_range_outside_ram_gives_no_entry():
    assert build_memory_map([(0, 4 * MIB)], reserved=[(8 * MIB, MIB, RESERVED)]) == [
        (0, 4 * MIB, USABLE)]


@pytest.mark.parametrize("kwargs, message", [
    ({"ram": []}, "at least one piece"),
    ({"ram": [(0, 0)]}, "must be positive"),
    ({"ram": [(0, -4096)]}, "must be positive"),
    ({"ram": [(-4096, 8192)]}, "negative"),
    ({"ram": [((1 << 64) - 4096, 8192)]}, "wraps"),
    ({"ram": [(0, "4M")]}, "integers"),
    ({"ram": [(0, True)]}, "integers"),
    ({"ram": [(0, 2 * MIB), (MIB, 2 * MIB)]}, "overlap"),
    ({"ram": [(0, 8 * MIB), (MIB, MIB), (4 * MIB, MIB)]}, "overlap"),
    ({"ram": [(0, MIB)], "reserved": [(0, 4096, RESERVED), (0, 8192, RESERVED)]}, "overlap"),
    ({"ram": [(0, MIB)], "reserved": [(0, 4096, USABLE)]}, "not a reserved type"),
    ({"ram": [(0, MIB)], "reserved": [(0, 4096, 0)]}, "not a reserved type"),
    ({"ram": [(0, MIB)], "reserved": [(0, 0, RESERVED)]}, "must be positive"),
    ({"ram": [(0, MIB)], "pci_hole": (4 * GIB, 3 * GIB)}, "must be positive"),
    ({"ram": [(0, MIB)], "pci_hole": ("3G", "4G")}, "pci_hole"),
])
def test_bad_input_is_a_clear_value_error(kwargs, message):
    ram = kwargs.pop("ram")
    with pytest.raises(ValueError, match=message):
        build_memory_map(ram, **kwargs)


# --- the three users build the same map ---------------------------------------------------

@pytest.mark.parametrize("size", [2 * MIB, 64 * MIB, 3 * GIB])
def test_platform_linux_and_multiboot_maps_agree(size):
    class Region:
        def __init__(self, guest_addr, size):
            self.guest_addr, self.size = guest_addr, size

    pc = [(r.base, r.length, int(r.type)) for r in platform.memory_map(size)]
    linux = [(r.addr, r.size, r.type) for r in linuxboot.memory_map(size)]
    mb = multiboot.default_memory_map([Region(0, size)])
    assert pc == linux == mb == build_memory_map([(0, size)])


def test_platform_map_of_a_split_ram():
    pc = platform.memory_map(5 * GIB)
    assert [(r.base, r.length, r.type) for r in pc] == build_memory_map(
        platform.ram_layout(5 * GIB))
    assert pc[-1].type is platform.MemoryType.USABLE


def test_linux_map_refuses_ram_in_the_mmio_hole():
    linuxboot.memory_map(linuxboot.MMIO_HOLE)            # up to the hole is fine
    with pytest.raises(ValueError, match="PCI hole"):
        linuxboot.memory_map(linuxboot.MMIO_HOLE + 4096)
    with pytest.raises(ValueError, match="2 MiB"):
        linuxboot.memory_map(MIB)
