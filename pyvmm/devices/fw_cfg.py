# SPDX-License-Identifier: GPL-2.0-or-later
"""fw_cfg, QEMU's firmware configuration device, over its legacy x86 I/O ports.

Register layout (QEMU docs/specs/fw_cfg.rst): two ports at 0x510. A 16-bit OUT to either
selects an item by key and rewinds the data offset to 0; each 8-bit IN from either returns
the next byte of the selected item, and 0 once past its end or when the key names no item.
8-bit OUTs are data writes, which QEMU ignores; other widths are not accepted by the device
(writes dropped, reads answer all ones). Keys with bit 15 set are architecture-local (x86:
ACPI tables, SMBIOS, IRQ0 override); bit 14 asks for write access and is ignored here, as
everywhere since QEMU 2.4. The DMA interface is not offered: the ID item says so (bit 1
clear), and kvm-unit-tests reads items only through the data port.

Numbers are little-endian except inside the file directory, which is big-endian.
"""

from __future__ import annotations

import struct
import threading

FW_CFG_PORT = 0x510
FW_CFG_PORTS = 2

# Keys (QEMU's numbering).
SIGNATURE = 0x00
ID = 0x01
UUID = 0x02
RAM_SIZE = 0x03
NOGRAPHIC = 0x04
NB_CPUS = 0x05
MACHINE_ID = 0x06
KERNEL_ADDR = 0x07
KERNEL_SIZE = 0x08
KERNEL_CMDLINE = 0x09
INITRD_ADDR = 0x0A
INITRD_SIZE = 0x0B
BOOT_DEVICE = 0x0C
NUMA = 0x0D
BOOT_MENU = 0x0E
MAX_CPUS = 0x0F
#: kvm-unit-tests reads this key as "highest usable RAM address, 0 for no limit" (it calls it
#: FW_CFG_MAX_RAM); under QEMU it is KERNEL_DATA, the loaded image, whose first 8 bytes a
#: test kernel only consults when RAM extends above 4 GiB. Ours answers 0: no limit.
MAX_RAM = 0x11
FILE_DIR = 0x19
FILE_FIRST = 0x20
WRITE_CHANNEL = 0x4000
ARCH_LOCAL = 0x8000
ENTRY_MASK = 0x3FFF
INVALID = 0xFFFF

#: The ID item's bits: traditional (port) interface present; DMA interface present.
ID_TRADITIONAL = 1 << 0
ID_DMA = 1 << 1

FILE_NAME_MAX = 56          # bytes of a file name in the directory, NUL included
_DIR_ENTRY = struct.Struct(">IHH56s")   # size, select, reserved, name


class FwCfg:
    """The device. `items` maps keys to their bytes; `add_item()`/`add_u16/u32/u64()` set
    them, `add_file()` publishes a named item in the file directory (key 0x19). The
    constructor fills in what a PC machine of `cpus` vCPUs and `ram_size` bytes of RAM
    reports: signature "QEMU", ID, NB_CPUS, MAX_CPUS, RAM_SIZE, and MAX_RAM as 0."""

    length = FW_CFG_PORTS

    def __init__(self, *, cpus: int = 1, ram_size: int = 0, max_cpus: int | None = None
                 ) -> None:
        if not 1 <= cpus <= 0xFFFF:
            raise ValueError(f"cpus must be 1..65535, got {cpus}")
        max_cpus = cpus if max_cpus is None else max_cpus
        if not cpus <= max_cpus <= 0xFFFF:
            raise ValueError(f"max_cpus must be {cpus}..65535, got {max_cpus}")
        if not 0 <= ram_size < 1 << 64:
            raise ValueError(f"ram_size must be 0..2**64-1, got {ram_size}")
        self._lock = threading.Lock()
        self.items: dict[int, bytes] = {}
        self._files: list[tuple[str, int]] = []   # (name, key), in key order
        self._key = INVALID
        self._offset = 0
        self.add_item(SIGNATURE, b"QEMU")
        self.add_u32(ID, ID_TRADITIONAL)
        self.add_u16(NB_CPUS, cpus)
        self.add_u16(MAX_CPUS, max_cpus)
        self.add_u64(RAM_SIZE, ram_size)
        self.add_u64(MAX_RAM, 0)
        self._publish_dir()

    # -- contents --------------------------------------------------------------------------

    def add_item(self, key: int, data: bytes) -> None:
        """Set the item `key` (0..0x3fff, or with ARCH_LOCAL) to `data`."""
        if not 0 <= key <= 0xFFFF or key & WRITE_CHANNEL or (key & ENTRY_MASK) == ENTRY_MASK:
            raise ValueError(f"key {key:#x} is not an item key (0..0x3ffe, optionally | 0x8000)")
        with self._lock:
            self.items[key] = bytes(data)

    def add_u16(self, key: int, value: int) -> None:
        """Set a 16-bit little-endian item."""
        self.add_item(key, _le(value, 2))

    def add_u32(self, key: int, value: int) -> None:
        """Set a 32-bit little-endian item."""
        self.add_item(key, _le(value, 4))

    def add_u64(self, key: int, value: int) -> None:
        """Set a 64-bit little-endian item."""
        self.add_item(key, _le(value, 8))

    def add_file(self, name: str, data: bytes) -> int:
        """Publish `data` under `name` (e.g. "etc/acpi/rsdp") in the file directory; returns
        the key it was given (0x20 and up, in the order files are added)."""
        raw = name.encode()
        if not raw or len(raw) >= FILE_NAME_MAX or b"\0" in raw:
            raise ValueError(f"a file name is 1..{FILE_NAME_MAX - 1} bytes without NUL, "
                             f"got {name!r}")
        with self._lock:
            if any(n == name for n, _ in self._files):
                raise ValueError(f"fw_cfg already has a file named {name!r}")
            key = FILE_FIRST + len(self._files)
            if key >= ENTRY_MASK:
                raise ValueError("fw_cfg has no key left for another file")
            self._files.append((name, key))
            self.items[key] = bytes(data)
        self._publish_dir()
        return key

    def _publish_dir(self) -> None:
        with self._lock:
            entries = [_DIR_ENTRY.pack(len(self.items[key]), key, 0, name.encode())
                       for name, key in self._files]
            self.items[FILE_DIR] = struct.pack(">I", len(entries)) + b"".join(entries)

    @property
    def selected(self) -> int:
        """The key the guest selected last (INVALID before any)."""
        return self._key

    # -- guest side ------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """16 bits: select an item; 8 bits: a data write (ignored); other widths: dropped."""
        if len(data) == 2:
            with self._lock:
                self._key = int.from_bytes(data, "little") & ~WRITE_CHANNEL
                self._offset = 0

    def read(self, offset: int, size: int) -> bytes:
        """8 bits: the next byte of the selected item (0 past its end or for no item)."""
        if size != 1:
            return b"\xff" * size
        with self._lock:
            item = self.items.get(self._key)
            if item is None or self._offset >= len(item):
                return b"\0"
            value = item[self._offset]
            self._offset += 1
        return bytes([value])


def _le(value: int, size: int) -> bytes:
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{value} does not fit in {size} bytes")
    return value.to_bytes(size, "little")
