# SPDX-License-Identifier: GPL-2.0-or-later
"""ACPI tables for the PC platform, built in Python and written into the BIOS area.

What a test kernel (kvm-unit-tests' lib/acpi.c) and a small OS look for:
- the RSDP ("RSD PTR ", revision 2) on a 16-byte boundary in 0xe0000-0xfffff, with both
  checksums (the first 20 bytes, and all 36);
- the RSDT (32-bit pointers) and the XSDT (64-bit pointers) to the FADT and the MADT;
- the FADT ("FACP", revision 3, 244 bytes): the FACS and DSDT, the SCI on IRQ 9, the PM1a
  event/control blocks and the PM timer on their ports (both the 32-bit fields and the
  generic address structures), the reset register (0xcf9, value 6), no SMI command port
  (ACPI mode is always on);
- the FACS (64 bytes, 64-byte aligned): its waking vector is what a guest going to S3 sets;
- a DSDT holding only the \\_S3 and \\_S5 sleep-type packages (what an OS needs to suspend
  and power off through PM1a control);
- the MADT ("APIC"): the local APIC address, PC/AT-compatible 8259s, one enabled
  processor-local-APIC entry per vCPU (ACPI id = APIC id = vCPU id), the IOAPIC (id = the
  vCPU count, at 0xfec00000, GSI base 0), the SCI's interrupt source override (IRQ 9, level,
  active high) and a LINT1 NMI entry for all processors.
Every table's checksum makes its bytes sum to 0 (mod 256).

Layouts are the ACPI specification's; `build_tables()` returns the bytes and where each
table lives, `install()` writes them into guest memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .acpi_pm import PM1_CNT_LEN, PM1_EVT_LEN, PM_BASE, PM_TMR_LEN, PM1A_CNT, PM1A_EVT, PM_TMR
from .pci import RESET_CONTROL

#: Where the tables go: the BIOS area, inside the 0xe0000-0xfffff range the RSDP is searched.
ACPI_BASE = 0xE0000
ACPI_AREA_END = 0x100000
LAPIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
SCI_IRQ = 9
OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMPC "
CREATOR_ID = b"PYVM"

# FADT flags: WBINVD works, C1 supported (PROC_C1), power and sleep buttons are control
# methods (absent here), RTC wake from S4, the reset register is supported.
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4
FADT_SLP_BUTTON = 1 << 5
FADT_RTC_S4 = 1 << 7
FADT_RESET_REG_SUP = 1 << 10
FADT_FLAGS = (FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RTC_S4
              | FADT_RESET_REG_SUP)
FADT_REVISION, FADT_LENGTH = 3, 244
RESET_VALUE = 0x06
#: Sleep types written to PM1a control's SLP_TYP for S3 and S5 (QEMU's PIIX4 numbers).
SLP_TYP_S3, SLP_TYP_S5 = 1, 0

MADT_PCAT_COMPAT = 1
MADT_LAPIC, MADT_IOAPIC, MADT_OVERRIDE, MADT_LAPIC_NMI = 0, 1, 2, 4


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with 0 in its checksum field) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A table: the 36-byte header, then `body`, with the checksum filled in."""
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID,
                         OEM_TABLE_ID, 1, CREATOR_ID, 1)
    raw = bytearray(header + body)
    raw[9] = checksum(raw)
    return bytes(raw)


def _gas(space: int, bit_width: int, address: int, access: int = 0) -> bytes:
    """A generic address structure (space 1 = system I/O)."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access, address)


def rsdp(rsdt: int, xsdt: int) -> bytes:
    """The 36-byte revision-2 RSDP."""
    raw = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt, 36, xsdt, 0))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def rsdt(tables: list[int]) -> bytes:
    return _table(b"RSDT", 1, b"".join(struct.pack("<I", t) for t in tables))


def xsdt(tables: list[int]) -> bytes:
    return _table(b"XSDT", 1, b"".join(struct.pack("<Q", t) for t in tables))


def facs() -> bytes:
    """64 bytes: signature, length, hardware signature 0, waking vectors 0 (the guest sets
    them), global lock 0, flags 0, version 1."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", 64, 0, 0, 0, 0, 0, 1, 0)


def dsdt() -> bytes:
    """A DSDT whose AML defines only \\_S3 and \\_S5 (Name(_Sx, Package(4){t, t, 0, 0}))."""
    def sleep_package(name: bytes, typ: int) -> bytes:
        value = b"\x01" if typ == 1 else b"\x00" if typ == 0 else b"\x0a" + bytes([typ])
        elements = value * 2 + b"\x00\x00"
        return b"\x08" + name + b"\x12" + bytes([2 + len(elements), 4]) + elements
    return _table(b"DSDT", 1, sleep_package(b"_S3_", SLP_TYP_S3) +
                  sleep_package(b"_S5_", SLP_TYP_S5))


def fadt(*, facs_address: int, dsdt_address: int, pm_base: int = PM_BASE) -> bytes:
    """The revision-3 FADT (ACPI 2.0 layout, 244 bytes)."""
    evt, cnt, tmr = pm_base + PM1A_EVT, pm_base + PM1A_CNT, pm_base + PM_TMR
    body = struct.pack("<IIBBHIBBBB", facs_address, dsdt_address,
                       0,             # INT_MODEL (reserved since ACPI 2.0)
                       0,             # preferred PM profile: unspecified
                       SCI_IRQ,
                       0, 0, 0, 0, 0)  # SMI_CMD (none: always in ACPI mode), its values
    body += struct.pack("<8I", evt, 0, cnt, 0, 0, tmr, 0, 0)   # PM1a/b EVT, CNT, PM2, TMR, GPE
    body += struct.pack("<8B", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN, 0, 0, 0, 0)
    body += struct.pack("<4H", 0xFFF, 0xFFF, 0, 0)  # no C2/C3; flush size/stride
    body += struct.pack("<5B", 0, 0, 0, 0, 0x32)    # duty cycle; no day/month alarm; century
    body += struct.pack("<HBI", 0, 0, FADT_FLAGS)   # IA-PC boot flags, reserved, flags
    body += _gas(1, 8, RESET_CONTROL) + bytes([RESET_VALUE]) + bytes(3)
    body += struct.pack("<QQ", facs_address, dsdt_address)
    body += _gas(1, PM1_EVT_LEN * 8, evt) + _gas(0, 0, 0)       # X_PM1a/b_EVT
    body += _gas(1, PM1_CNT_LEN * 8, cnt) + _gas(0, 0, 0)       # X_PM1a/b_CNT
    body += _gas(0, 0, 0)                                        # X_PM2_CNT
    body += _gas(1, PM_TMR_LEN * 8, tmr, access=3)               # X_PM_TMR (dword access)
    body += _gas(0, 0, 0) + _gas(0, 0, 0)                        # X_GPE0/1
    table = _table(b"FACP", FADT_REVISION, body)
    assert len(table) == FADT_LENGTH, len(table)
    return table


def madt(cpus: int) -> bytes:
    """The MADT for `cpus` vCPUs and one IOAPIC."""
    if not 1 <= cpus <= 255:
        raise ValueError(f"the MADT has xAPIC entries for 1..255 vCPUs, got {cpus}")
    body = struct.pack("<II", LAPIC_ADDRESS, MADT_PCAT_COMPAT)
    for i in range(cpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, 1)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, cpus & 0xFF, 0, IOAPIC_ADDRESS, 0)
    # The SCI: ISA IRQ 9 on GSI 9, level-triggered (bits 3:2 = 3), active high (bits 1:0 = 1).
    body += struct.pack("<BBBBIH", MADT_OVERRIDE, 10, 0, SCI_IRQ, SCI_IRQ, 0x000D)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, 0, 1)
    return _table(b"APIC", 1, body)


@dataclass
class AcpiTables:
    """Built tables: `blob` goes at `base`; `addresses` maps signatures to table addresses."""

    base: int
    blob: bytes
    addresses: dict[str, int] = field(default_factory=dict)

    @property
    def rsdp_address(self) -> int:
        return self.addresses["RSD PTR "]


def build_tables(cpus: int, *, base: int = ACPI_BASE, pm_base: int = PM_BASE) -> AcpiTables:
    """Lay all tables out from `base` (16-byte aligned; the FACS 64-byte aligned)."""
    if base % 16 or not ACPI_BASE <= base < ACPI_AREA_END:
        raise ValueError(f"the tables start 16-byte aligned in {ACPI_BASE:#x}.."
                         f"{ACPI_AREA_END - 1:#x} (where the RSDP is searched), got {base:#x}")
    blob = bytearray()
    addresses: dict[str, int] = {}

    def place(name: str, data: bytes, align: int = 16) -> int:
        blob.extend(bytes(-len(blob) % align))
        addresses[name] = base + len(blob)
        blob.extend(data)
        return addresses[name]

    # The RSDP first (its pointers are fixed up once the others are placed: same size).
    place("RSD PTR ", bytes(36))
    facs_at = place("FACS", facs(), align=64)
    dsdt_at = place("DSDT", dsdt())
    fadt_at = place("FACP", fadt(facs_address=facs_at, dsdt_address=dsdt_at, pm_base=pm_base))
    madt_at = place("APIC", madt(cpus))
    rsdt_at = place("RSDT", rsdt([fadt_at, madt_at]))
    xsdt_at = place("XSDT", xsdt([fadt_at, madt_at]))
    blob[0:36] = rsdp(rsdt_at, xsdt_at)
    if base + len(blob) > ACPI_AREA_END:
        raise ValueError("the ACPI tables do not fit below 1 MiB from this base")
    return AcpiTables(base, bytes(blob), addresses)


def install(memory, cpus: int, *, base: int = ACPI_BASE, pm_base: int = PM_BASE
            ) -> AcpiTables:
    """Build the tables and write them into guest `memory` (a GuestMemory)."""
    tables = build_tables(cpus, base=base, pm_base=pm_base)
    memory.write(tables.base, tables.blob)
    return tables
