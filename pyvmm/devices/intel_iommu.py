# SPDX-License-Identifier: GPL-2.0-or-later
"""An Intel VT-d IOMMU (DMA remapping with second-level tables, interrupt remapping), the
part of QEMU's `-device intel-iommu,intremap=on,eim=off` that kvm-unit-tests' intel_iommu
test drives. Register layout and table formats are the VT-d specification's (as QEMU's
hw/i386/intel_iommu models it); this is our own, smaller model of them.

Its 4 KiB register block sits at `BASE` (0xfed90000, where q35 puts it):

    0x00 VER     1.0                   0x08 CAP    39-bit AGAW (3 levels), 2 MiB and
    0x10 ECAP    QI, IR (no EIM)                   1 GiB second-level pages, 256 domains
    0x18 GCMD    commands (WO)         0x1c GSTS   their status (RO)
    0x20 RTADDR  root table            0x28 CCMD   context-cache invalidation
    0x34 FSTS    fault status (RW1C)   0x80/0x88/0x90 IQH/IQT/IQA  invalidation queue
    0x9c ICS     invalidation done     0xb8 IRTA   interrupt remapping table
    IRO*16 + 8   IOTLB invalidation

GCMD: TE (31, translation on), SRTP (30, latch RTADDR), QIE (26), IRE (25), SIRTP (24,
latch IRTA); GSTS reports each (a latch as RTPS/IRTPS). The model caches nothing, so the
invalidation registers and queue descriptors complete at once (a wait descriptor with
status write stores its data); a fault is the guest's error (`GuestError`), also counted in
FSTS (primary pending fault).

`translate(source_id, iova, write)` walks root entry (bus) -> context entry (devfn) -> the
3- or 4-level second-level table; `dma_read`/`dma_write` move bytes through it page by page.
`remap_msi(source_id, address, data)` turns a remappable-format MSI into the message its
IRTE says (xAPIC destination, physical or logical, fixed/lowest...), checking the entry's
source id; a compatibility-format MSI passes unchanged. `remap_ioapic(entry)` does the same
for an IOAPIC redirection entry written in remappable format.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from ..errors import GuestError

BASE = 0xFED90000
SIZE = 0x1000
VERSION = 0x10
#: CAP: ND=2 (256 domains), SAGAW bit 1 (39-bit), MGAW 38, SLLPS 2M|1G, FRO, NFR=0.
FRO = 0x22                     # fault recording registers at 0x220 (16-byte units)
CAP = 2 | 1 << 9 | 38 << 16 | FRO << 24 | 1 << 34 | 1 << 35
IRO = 0x20                     # IOTLB registers at 0x200 (16-byte units)
ECAP_QI, ECAP_IR = 1 << 1, 1 << 3
ECAP = ECAP_QI | ECAP_IR | IRO << 8

REG_VER, REG_CAP, REG_ECAP, REG_GCMD, REG_GSTS = 0x00, 0x08, 0x10, 0x18, 0x1C
REG_RTADDR, REG_CCMD, REG_FSTS, REG_FECTL = 0x20, 0x28, 0x34, 0x38
REG_IQH, REG_IQT, REG_IQA, REG_ICS, REG_IRTA = 0x80, 0x88, 0x90, 0x9C, 0xB8
REG_IOTLB = IRO * 16 + 8

GCMD_TE, GCMD_SRTP, GCMD_WBF, GCMD_QIE = 1 << 31, 1 << 30, 1 << 27, 1 << 26
GCMD_IRE, GCMD_SIRTP, GCMD_CFI = 1 << 25, 1 << 24, 1 << 23
_PERSISTENT = GCMD_TE | GCMD_QIE | GCMD_IRE | GCMD_CFI
FSTS_PPF = 1 << 1
INVALIDATE = 1 << 63           # CCMD.ICC / IOTLB.IVT: busy until done (at once here)
PTE_R, PTE_W, PTE_PS = 1 << 0, 1 << 1, 1 << 7
ADDR_MASK = ((1 << 64) - 1) & ~0xFFF
_QUAD = struct.Struct("<QQ")

MemoryRead = Callable[[int, int], bytes]
MemoryWrite = Callable[[int, bytes], None]


class IntelIommu:
    """The register block (a bus device) and the remapping it does. `read_memory(gpa, n)` /
    `write_memory(gpa, data)` reach guest RAM (the tables and the DMA targets)."""

    length = SIZE

    def __init__(self, read_memory: MemoryRead, write_memory: MemoryWrite) -> None:
        self.read_memory, self.write_memory = read_memory, write_memory
        self._lock = threading.Lock()
        self.gsts = 0
        self.rtaddr = self.irta = 0          # as written
        self.root = self.ir_table = 0        # as latched by SRTP / SIRTP
        self.fsts = self.fectl = 0
        self.iqh = self.iqt = self.iqa = 0
        self.ics = 0
        self.faults = 0

    # -- registers --------------------------------------------------------------------------

    def _value(self, reg: int) -> int:
        return {REG_VER: VERSION, REG_CAP: CAP, REG_ECAP: ECAP, REG_GSTS: self.gsts,
                REG_RTADDR: self.rtaddr, REG_FSTS: self.fsts, REG_FECTL: self.fectl,
                REG_IQH: self.iqh, REG_IQT: self.iqt, REG_IQA: self.iqa, REG_ICS: self.ics,
                REG_IRTA: self.irta}.get(reg, 0)

    def read(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset % size:
            raise GuestError(f"intel-iommu: {size}-byte access at {offset:#x}")
        with self._lock:
            low = offset & ~0x7 if offset & 0x4 and offset - 4 in _WIDE else offset
            value = self._value(low)
            if low != offset:
                value >>= 32
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (4, 8) or offset % size:
            raise GuestError(f"intel-iommu: {size}-byte access at {offset:#x}")
        value = int.from_bytes(data, "little")
        with self._lock:
            if offset - 4 in _WIDE and size == 4:      # the high half of a 64-bit register
                reg, value = offset - 4, (self._value(offset - 4) & 0xFFFFFFFF) | value << 32
            elif offset in _WIDE and size == 4:
                reg, value = offset, (self._value(offset) & ~0xFFFFFFFF) | value
            else:
                reg = offset
            self._write(reg, value)

    def _write(self, reg: int, value: int) -> None:
        if reg == REG_GCMD:
            self._command(value & 0xFFFFFFFF)
        elif reg == REG_RTADDR:
            self.rtaddr = value & ADDR_MASK
        elif reg == REG_IRTA:
            self.irta = value & (ADDR_MASK | 0x80F)
        elif reg == REG_FSTS:
            self.fsts &= ~(value & 0x7F)
        elif reg == REG_FECTL:
            self.fectl = value & (1 << 31)
        elif reg == REG_IQA:
            self.iqa = value & (ADDR_MASK | 0x7)
        elif reg == REG_IQT:
            self.iqt = value & 0x7FFF0
            self._drain_queue()
        elif reg == REG_ICS:
            self.ics &= ~(value & 1)
        # CCMD, IOTLB: ICC/IVT read back clear (done at once); VER, CAP, ECAP, GSTS: RO

    def _command(self, value: int) -> None:
        if value & GCMD_SRTP:
            self.root = self.rtaddr
            self.gsts |= GCMD_SRTP
        if value & GCMD_SIRTP:
            self.ir_table = self.irta
            self.gsts |= GCMD_SIRTP
        if value & GCMD_QIE and not self.gsts & GCMD_QIE:
            self.iqh = 0
        self.gsts = (self.gsts & ~_PERSISTENT) | (value & _PERSISTENT)

    def _drain_queue(self) -> None:
        # Descriptors are 16 bytes; the queue is 2**(QS) 4 KiB pages at IQA.
        if not self.gsts & GCMD_QIE:
            return
        size = (1 << (self.iqa & 0x7)) * 4096
        base = self.iqa & ADDR_MASK
        while self.iqh != self.iqt:
            low, high = _QUAD.unpack(self.read_memory(base + self.iqh, 16))
            if low & 0xF == 0x5 and low & (1 << 5):       # wait descriptor, status write
                self.write_memory(high & ~0x3, (low >> 32).to_bytes(4, "little"))
            if low & 0xF == 0x5 and low & (1 << 4):       # wait with interrupt: done flag
                self.ics |= 1
            self.iqh = (self.iqh + 16) % size

    # -- DMA remapping ----------------------------------------------------------------------

    def _fault(self, why: str) -> GuestError:
        self.faults += 1
        self.fsts |= FSTS_PPF
        return GuestError(f"intel-iommu: {why}")

    def translate(self, source_id: int, iova: int, write: bool) -> int:
        """The guest-physical address device `source_id` (bus << 8 | devfn) reaches at
        `iova`; identity while translation is off. GuestError on a fault."""
        with self._lock:
            if not self.gsts & GCMD_TE:
                return iova
            root = self.root
        bus, devfn = source_id >> 8 & 0xFF, source_id & 0xFF
        re_low, _ = _QUAD.unpack(self.read_memory(root + bus * 16, 16))
        if not re_low & 1:
            raise self._fault(f"no root entry for bus {bus}")
        ce_low, ce_high = _QUAD.unpack(self.read_memory((re_low & ADDR_MASK) + devfn * 16, 16))
        if not ce_low & 1:
            raise self._fault(f"no context entry for {bus:02x}:{devfn >> 3:02x}.{devfn & 7}")
        kind = ce_low >> 2 & 0x3
        if kind == 2:
            return iova                           # pass-through
        if kind != 0:
            raise self._fault(f"context entry translation type {kind} not supported")
        levels = {1: 3, 2: 4}.get(ce_high & 0x7)
        if levels is None:
            raise self._fault(f"context entry address width {ce_high & 0x7} not supported")
        if iova >> (12 + 9 * levels):
            raise self._fault(f"IOVA {iova:#x} beyond the {12 + 9 * levels}-bit width")
        table = ce_low & ADDR_MASK
        need = PTE_W if write else PTE_R
        for level in range(levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            pte = int.from_bytes(self.read_memory(table + (iova >> shift & 0x1FF) * 8, 8),
                                 "little")
            if not pte & need:
                raise self._fault(f"IOVA {iova:#x}: no {'write' if write else 'read'} "
                                  f"access at level {level}")
            address = pte & ADDR_MASK & ((1 << 52) - 1)
            if level == 1 or (pte & PTE_PS and level <= 3):
                return (address & ~((1 << shift) - 1)) | (iova & ((1 << shift) - 1))
            table = address
        raise AssertionError("unreachable")

    def dma_read(self, source_id: int, iova: int, length: int) -> bytes:
        """`length` bytes device `source_id` reads at `iova`."""
        out = bytearray()
        while length > 0:
            chunk = min(length, 4096 - (iova & 0xFFF))
            out += self.read_memory(self.translate(source_id, iova, False), chunk)
            iova, length = iova + chunk, length - chunk
        return bytes(out)

    def dma_write(self, source_id: int, iova: int, data: bytes) -> None:
        """Device `source_id` writes `data` at `iova`."""
        done = 0
        while done < len(data):
            chunk = min(len(data) - done, 4096 - ((iova + done) & 0xFFF))
            gpa = self.translate(source_id, iova + done, True)
            self.write_memory(gpa, data[done: done + chunk])
            done += chunk

    # -- interrupt remapping ----------------------------------------------------------------

    def remap_msi(self, source_id: int, address: int, data: int) -> tuple[int, int]:
        """The message an MSI write of `data` at `address` from `source_id` becomes."""
        with self._lock:
            enabled, table = bool(self.gsts & GCMD_IRE), self.ir_table
        if not enabled or not address & (1 << 4):
            return address, data                  # compatibility format (or IR off)
        handle = (address >> 5 & 0x7FFF) | (address >> 2 & 1) << 15
        if address & (1 << 3):                    # SHV: the data's low 16 bits add on
            handle += data & 0xFFFF
        return self.remap_handle(source_id, handle, table)

    @property
    def remapping_interrupts(self) -> bool:
        """Interrupt remapping is on (GSTS.IRES)."""
        return bool(self.gsts & GCMD_IRE)

    def remap_ioapic(self, entry: int) -> tuple[int, int] | None:
        """The MSI an IOAPIC redirection `entry` in remappable format (bit 48) sends, or
        None for a compatibility-format entry (or interrupt remapping off). The IOAPIC has
        no PCI requester id here, so the entry's source-id check is not applied."""
        if not self.remapping_interrupts or not entry >> 48 & 1:
            return None
        return self.remap_handle(None, (entry >> 49 & 0x7FFF) | (entry >> 11 & 1) << 15)

    def remap_handle(self, source_id: int | None, handle: int, table: int | None = None
                     ) -> tuple[int, int]:
        """The compatibility MSI that interrupt remapping table entry `handle` describes
        (`source_id` None: no requester id to check)."""
        if table is None:
            with self._lock:
                table = self.ir_table
        entries = 1 << ((table & 0xF) + 1)
        if handle >= entries:
            raise self._fault(f"interrupt handle {handle} beyond the {entries}-entry table")
        low, high = _QUAD.unpack(self.read_memory((table & ADDR_MASK) + handle * 16, 16))
        if not low & 1:
            raise self._fault(f"interrupt remapping entry {handle} not present")
        if low >> 15 & 1:
            raise self._fault(f"interrupt remapping entry {handle}: posted format")
        svt, sid = high >> 18 & 0x3, high & 0xFFFF
        if svt == 1 and source_id is not None and sid != source_id:          # full requester-id check (SQ 0 only)
            raise self._fault(f"interrupt remapping entry {handle} belongs to source "
                              f"{sid:#06x}, not {source_id:#06x}")
        vector, delivery = low >> 16 & 0xFF, low >> 5 & 0x7
        dest = (low >> 32 >> 8) & 0xFF            # xAPIC mode: destination in bits 47:40
        msi_address = 0xFEE00000 | dest << 12 | (low >> 3 & 1) << 3 | (low >> 2 & 1) << 2
        msi_data = vector | delivery << 8 | (low >> 4 & 1) << 15
        if low >> 4 & 1:
            msi_data |= 1 << 14                   # level: asserted
        return msi_address, msi_data


_WIDE = frozenset({REG_CAP, REG_ECAP, REG_RTADDR, REG_CCMD, REG_IQH, REG_IQT, REG_IQA,
                   REG_IRTA, REG_IOTLB})
