# SPDX-License-Identifier: GPL-2.0-or-later
"""The one builder of a guest's physical memory map (the e820 table, the multiboot mmap, the
PVH memmap all carry the same triples: base, length, type).

`build_memory_map(ram, reserved=..., pci_hole=...)` takes where the RAM is, as (base, size)
pieces, and the ranges firmware keeps for itself; it returns sorted, non-overlapping
`MapEntry` triples: every RAM byte is in exactly one entry, usable unless a reserved range
covers it. A reserved range is reported only where it overlaps RAM (address space nobody
backs needs no entry). The default reservation is the PC's: the EBDA and the BIOS area,
0x9fc00-0xfffff. `pci_hole`, when given, is an address range RAM must not reach (the 32-bit
PCI/MMIO window); RAM in it is an error, not silently dropped.

Every bad input is a ValueError that names it: a size of 0 or below, a negative base, a
piece that wraps past 2**64, RAM pieces that overlap, reserved ranges that overlap each
other or that say they are usable.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from itertools import pairwise
from typing import NamedTuple

__all__ = ["ACPI", "PC_BIOS_HOLE", "RESERVED", "USABLE", "MapEntry", "build_memory_map"]

#: Entry types, as e820 and multiboot number them.
USABLE = 1
RESERVED = 2
ACPI = 3

_LIMIT = 1 << 64


class MapEntry(NamedTuple):
    """One entry of a memory map: `length` bytes from `base`, of `type` (USABLE, RESERVED,
    ACPI). A tuple, so it compares equal to a plain (base, length, type)."""

    base: int
    length: int
    type: int

    @property
    def end(self) -> int:
        """The first address after the entry."""
        return self.base + self.length


#: The PC's firmware area below 1 MiB: the EBDA from 639 KiB, VGA, option ROMs, the BIOS.
PC_BIOS_HOLE = MapEntry(0x9FC00, 0x100000 - 0x9FC00, RESERVED)


def _range(what: str, base: object, size: object) -> tuple[int, int]:
    """(base, end) of a checked range."""
    if isinstance(base, bool) or isinstance(size, bool):
        raise ValueError(f"{what}: base and size must be integers, got {base!r}, {size!r}")
    try:
        b, s = operator.index(base), operator.index(size)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what}: base and size must be integers, got {base!r}, "
                         f"{size!r}") from None
    if b < 0:
        raise ValueError(f"{what}: base {b:#x} is negative")
    if s <= 0:
        raise ValueError(f"{what} at {b:#x}: size {s:#x} must be positive")
    if b + s > _LIMIT:
        raise ValueError(f"{what} at {b:#x}: size {s:#x} wraps past the 64-bit space")
    return b, b + s


def _no_overlap(what: str, ranges: list[tuple[int, int]]) -> None:
    for (a0, a1), (b0, b1) in pairwise(ranges):
        if b0 < a1:
            raise ValueError(f"{what} {a0:#x}-{a1:#x} and {b0:#x}-{b1:#x} overlap")


def build_memory_map(ram: Iterable[tuple[int, int]], *,
                     reserved: Iterable[tuple[int, int, int]] = (PC_BIOS_HOLE,),
                     pci_hole: tuple[int, int] | None = None) -> list[MapEntry]:
    """The memory map of a guest whose RAM is the (base, size) pieces `ram`, with the
    (base, length, type) ranges `reserved` kept from use, and no RAM allowed in
    [pci_hole[0], pci_hole[1]) (see the module documentation)."""
    pieces = sorted(_range("RAM", base, size) for base, size in ram)
    if not pieces:
        raise ValueError("the memory map needs at least one piece of RAM")
    _no_overlap("RAM pieces", pieces)
    holds: list[tuple[int, int, int]] = []
    for base, length, kind in reserved:
        start, end = _range("reserved range", base, length)
        if kind == USABLE or isinstance(kind, bool) or not isinstance(kind, int) or kind <= 0:
            raise ValueError(f"reserved range at {start:#x}: type {kind!r} is not a reserved "
                             "type (2 reserved, 3 ACPI, ...)")
        holds.append((start, end, int(kind)))
    holds.sort()
    _no_overlap("reserved ranges", [(s, e) for s, e, _ in holds])
    if pci_hole is not None:
        try:
            low, high = (operator.index(x) for x in pci_hole)
        except (TypeError, ValueError):
            raise ValueError(f"pci_hole must be (start, end) integers, got {pci_hole!r}") from None
        hole = _range("PCI hole", low, high - low)
        for start, end in pieces:
            if start < hole[1] and hole[0] < end:
                raise ValueError(f"RAM {start:#x}-{end:#x} reaches into the PCI hole "
                                 f"{hole[0]:#x}-{hole[1]:#x}")
    entries: list[MapEntry] = []
    for start, end in pieces:
        at = start
        for hold_start, hold_end, kind in holds:
            if hold_end <= at or hold_start >= end:
                continue
            if hold_start > at:
                entries.append(MapEntry(at, hold_start - at, USABLE))
            cut = min(hold_end, end)
            entries.append(MapEntry(max(hold_start, at), cut - max(hold_start, at), kind))
            at = cut
        if at < end:
            entries.append(MapEntry(at, end - at, USABLE))
    return entries
