# SPDX-License-Identifier: GPL-2.0-or-later
"""virtio-mmio devices announced to the guest through ACPI.

A kernel built without VIRTIO_MMIO_CMDLINE_DEVICES (Debian's) finds virtio-mmio devices only
through firmware: in ACPI, a device whose _HID is "LNRO0005" and whose _CRS holds the register
window (Memory32Fixed) and the interrupt (an Extended Interrupt descriptor). `ssdt()` builds a
Secondary System Description Table with one such device per transport, and `add_table()`
appends a table to the platform's ACPI tables already in guest memory: the table after them,
new RSDT and XSDT listing it too, and the RSDP (at its old address) pointing at those.

AML used (ACPI 6.x, section 20): ScopeOp 0x10, DeviceOp 0x5b 0x82, NameOp 0x08, StringPrefix
0x0d, BytePrefix 0x0a, BufferOp 0x11, PkgLength (1 byte below 64, else 2: 0x40|low nibble,
then the rest); resource descriptors: Memory32Fixed 0x86 (9 bytes of body), Extended
Interrupt 0x89, End Tag 0x79.
"""

from __future__ import annotations

import struct

from ..devices import acpi

VIRTIO_MMIO_HID = b"LNRO0005"
SSDT_REVISION = 2
INT_CONSUMER, INT_EDGE = 0x01, 0x02


def pkg_length(body_len: int) -> bytes:
    """The PkgLength encoding of a package whose contents (after it) are `body_len` bytes."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    total = body_len + 2
    if total >= 1 << 12:
        raise ValueError(f"an AML package of {body_len} bytes needs a longer PkgLength")
    return bytes([0x40 | (total & 0xF), total >> 4])


def _name(seg: bytes, value: bytes) -> bytes:
    return b"\x08" + seg + value


def _crs(base: int, size: int, gsi: int) -> bytes:
    resources = (struct.pack("<BHBII", 0x86, 9, 1, base, size)   # Memory32Fixed, read-write
                 + struct.pack("<BHBBI", 0x89, 6, INT_CONSUMER | INT_EDGE, 1, gsi)
                 + b"\x79\x00")                                  # End Tag
    body = b"\x0a" + bytes([len(resources)]) + resources
    return b"\x11" + pkg_length(len(body)) + body


def device_aml(index: int, base: int, size: int, gsi: int) -> bytes:
    """Device(VRnn) { _HID "LNRO0005", _UID n, _CRS {window, interrupt} }."""
    if not 0 <= index < 100:
        raise ValueError(f"virtio device index {index} is outside 0..99")
    body = (f"VR{index:02d}".encode()
            + _name(b"_HID", b"\x0d" + VIRTIO_MMIO_HID + b"\0")
            + _name(b"_UID", b"\x0a" + bytes([index]))
            + _name(b"_CRS", _crs(base, size, gsi)))
    return b"\x5b\x82" + pkg_length(len(body)) + body


def ssdt(devices: list[tuple[int, int, int]]) -> bytes:
    """An SSDT declaring one virtio-mmio device per (base, size, gsi) under \\_SB."""
    inner = b"\\_SB_" + b"".join(device_aml(i, *d) for i, d in enumerate(devices))
    aml = b"\x10" + pkg_length(len(inner)) + inner
    header = struct.pack("<4sIBB6s8sI4sI", b"SSDT", 36 + len(aml), SSDT_REVISION, 0,
                         acpi.OEM_ID, b"PYVMMVIO", 1, acpi.CREATOR_ID, 1)
    raw = bytearray(header + aml)
    raw[9] = acpi.checksum(raw)
    return bytes(raw)


def _entries(memory, address: int, width: int) -> list[int]:
    length, = struct.unpack("<I", memory.read(address + 4, 4))
    data = memory.read(address + 36, length - 36)
    fmt = "<I" if width == 4 else "<Q"
    return [struct.unpack_from(fmt, data, i)[0] for i in range(0, len(data), width)]


def add_table(memory, tables, table: bytes) -> int:
    """Append `table` to the ACPI tables `tables` (an AcpiTables already written to
    `memory`): returns its address. Raises ValueError if the ACPI area is full."""
    at = (tables.base + len(tables.blob) + 15) & ~15
    rsdt_entries = _entries(memory, tables.addresses["RSDT"], 4) + [at]
    xsdt_entries = _entries(memory, tables.addresses["XSDT"], 8) + [at]
    new_rsdt = acpi.rsdt(rsdt_entries)
    new_xsdt = acpi.xsdt(xsdt_entries)
    rsdt_at = (at + len(table) + 15) & ~15
    xsdt_at = (rsdt_at + len(new_rsdt) + 15) & ~15
    if xsdt_at + len(new_xsdt) > acpi.ACPI_AREA_END:
        raise ValueError("no room left for another ACPI table below 1 MiB")
    memory.write(at, table)
    memory.write(rsdt_at, new_rsdt)
    memory.write(xsdt_at, new_xsdt)
    memory.write(tables.rsdp_address, acpi.rsdp(rsdt_at, xsdt_at))
    return at
