# SPDX-License-Identifier: GPL-2.0-or-later
"""PCI: configuration mechanism #1 at 0xcf8/0xcfc, type-0 functions with BARs, and a host
bridge.

Mechanism #1 (the PCI Local Bus specification): a 32-bit OUT to 0xcf8 latches an address
(bit 31 enable, bus in 23:16, device/function in 15:8, register in 7:2); an access of 1, 2 or
4 bytes at 0xcfc + n then reads or writes that register's byte n and up. As in QEMU, the
latched address's bits 1:0 count too (they are ORed with n): a guest may latch register 2
and read the device ID at 0xcfc, which kvm-unit-tests does. With the enable bit
clear, or for a function nobody implements, reads answer all ones and writes go nowhere.
Only bus 0 exists. The byte at 0xcf9 is the PIIX reset control register instead (a byte
write with bit 2 set resets the machine: `on_reset()`), as on QEMU's PC.

A `PciFunction` keeps the 256-byte type-0 header: the identity registers read-only, the
command register's decode/master bits, the cache line and latency, the interrupt line, and
BARs that answer the sizing protocol (write all ones, read back the size mask). A BAR is
mapped on the machine's bus while its decode bit (I/O or memory space) is on and its address
is a real one (not 0, not being sized, inside the space); moving a BAR remaps it. A BAR the
guest places over another device stays unmapped (QEMU would let it overlap).

Firmware assigns BARs before the OS runs; there is none here, so `PciBus.add()` does what a
BIOS would: it gives each BAR the next free address of its kind and turns decoding on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
RESET_CONTROL = 0xCF9
RESET_CPU = 0x04          # reset control: bit 2 starts a reset (bit 1 picks hard vs soft)
CONFIG_ENABLE = 1 << 31

# Header registers (type 0).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, CACHE_LINE, LATENCY, HEADER_TYPE = 0x08, 0x09, 0x0C, 0x0D, 0x0E
BAR0, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x10, 0x2C, 0x2E
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
BAR_COUNT = 6

COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER = 0x1, 0x2, 0x4
COMMAND_INTX_DISABLE = 0x400
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE
BAR_IO = 0x1

#: Where the platform's "BIOS" puts BARs: 32-bit memory BARs down from the top of this window
#: (just below the IOAPIC at 0xfec00000), I/O BARs from 0xc000 up, as QEMU's SeaBIOS does
#: (so pci-testdev's BARs land where they do under QEMU: 0xfebff000 and 0xc000).
MEM_WINDOW = (0xFE000000, 0xFEC00000)
IO_WINDOW = (0xC000, 0x10000)


@dataclass
class Bar:
    """One BAR: its size (a power of two), kind, the device behind it, and where it is
    mapped now (None: unmapped)."""

    size: int
    io: bool
    device: object
    address: int = 0
    mapping: object = None

    @property
    def flags(self) -> int:
        return BAR_IO if self.io else 0   # memory: 32-bit, not prefetchable


class PciFunction:
    """A type-0 function. Subclasses (or callers) pass the identity and BARs; config reads
    and writes go through `config_read()`/`config_write()` with the register semantics in
    the module docstring. `bars[i]` is None for an unimplemented BAR."""

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 0,
                 bars: list[Bar | None] | None = None) -> None:
        bars = list(bars or [])
        if len(bars) > BAR_COUNT:
            raise ValueError(f"a type-0 function has {BAR_COUNT} BARs, got {len(bars)}")
        for bar in bars:
            if bar is not None and (bar.size < (4 if bar.io else 16)
                                    or bar.size & (bar.size - 1)):
                raise ValueError(f"a BAR size is a power of two of at least 4 (I/O) or 16 "
                                 f"(memory) bytes, got {bar.size}")
        self.bars: list[Bar | None] = bars + [None] * (BAR_COUNT - len(bars))
        self.config = bytearray(256)
        self._put(VENDOR_ID, vendor_id, 2)
        self._put(DEVICE_ID, device_id, 2)
        self._put(REVISION, revision, 1)
        self._put(CLASS_PROG, class_code, 3)
        self._put(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id, 2)
        self._put(SUBSYSTEM_ID, subsystem_id, 2)
        self._put(INTERRUPT_PIN, interrupt_pin, 1)
        for i, bar in enumerate(self.bars):
            if bar is not None:
                self._put(BAR0 + 4 * i, bar.flags, 4)
        self.bus: PciBus | None = None

    def _put(self, reg: int, value: int, size: int) -> None:
        self.config[reg: reg + size] = value.to_bytes(size, "little")

    def _get(self, reg: int, size: int) -> int:
        return int.from_bytes(self.config[reg: reg + size], "little")

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def bar(self, i: int) -> Bar:
        """BAR `i` (ValueError for an unimplemented one)."""
        bar = self.bars[i] if 0 <= i < BAR_COUNT else None
        if bar is None:
            raise ValueError(f"BAR {i} is not implemented")
        return bar

    def bar_address(self, i: int) -> int:
        """The address BAR `i` holds now (its low flag bits cleared)."""
        return self._get(BAR0 + 4 * i, 4) & (~0x3 if self.bar(i).io else ~0xF) & 0xFFFFFFFF

    # -- config space ----------------------------------------------------------------------

    def config_read(self, reg: int, size: int) -> int:
        """Read `size` bytes at `reg` (the register semantics apply byte by byte)."""
        return int.from_bytes(self.config[reg: reg + size], "little")

    def config_write(self, reg: int, value: int, size: int) -> None:
        """Write `size` bytes at `reg`; read-only bits keep their value."""
        old_command = self.command
        touched_bars = set()
        for n in range(size):
            at, byte = reg + n, (value >> (8 * n)) & 0xFF
            if at in (COMMAND, COMMAND + 1):
                mask = (COMMAND_WRITABLE >> (8 * (at - COMMAND))) & 0xFF
            elif at in (CACHE_LINE, LATENCY, INTERRUPT_LINE):
                mask = 0xFF
            elif BAR0 <= at < BAR0 + 4 * BAR_COUNT and self.bars[(at - BAR0) // 4] is not None:
                i = (at - BAR0) // 4
                bar = self.bar(i)
                writable = ~(bar.size - 1) & 0xFFFFFFFF & ~(0x3 if bar.io else 0xF)
                mask = (writable >> (8 * ((at - BAR0) % 4))) & 0xFF
                touched_bars.add(i)
            else:
                continue
            self.config[at] = (self.config[at] & ~mask) | (byte & mask)
        if touched_bars or self.command != old_command:
            self.update_mappings()

    def update_mappings(self) -> None:
        """Map or unmap each BAR on the bus's buses as its decode bit and address say."""
        if self.bus is not None:
            for i, bar in enumerate(self.bars):
                if bar is not None:
                    self.bus.map_bar(self, i, bar)

    def bar_target(self, i: int) -> int | None:
        """Where BAR `i` decodes now, or None (decode off, address 0, being sized, or
        beyond its space)."""
        bar = self.bar(i)
        enabled = self.command & (COMMAND_IO if bar.io else COMMAND_MEMORY)
        address = self.bar_address(i)
        limit = 1 << 16 if bar.io else 1 << 32
        if not enabled or address == 0 or address + bar.size >= limit:
            return None
        return address


class PciHostBridge(PciFunction):
    """The host bridge at 00:00.0, with QEMU's i440FX identity (8086:1237, class 0600)."""

    def __init__(self) -> None:
        super().__init__(vendor_id=0x8086, device_id=0x1237, class_code=0x060000, revision=2)


class PciBus:
    """Bus 0: functions by device/function number, the mechanism #1 ports, and BAR mapping
    on the machine's `pio` and `mmio` buses. `on_reset()` is called for a reset through
    0xcf9. `guest_errors` counts BAR placements that were refused (an overlap)."""

    def __init__(self, pio, mmio, *, on_reset: Callable[[], object] | None = None) -> None:
        self.pio, self.mmio = pio, mmio
        self.on_reset = on_reset
        self.functions: dict[int, PciFunction] = {}
        self.address = 0
        self.reset_control = 0
        self.refused_bars = 0
        self._next = {True: IO_WINDOW[0], False: MEM_WINDOW[1]}
        self._lock = threading.RLock()
        self.add(0, 0, PciHostBridge(), assign=False)

    def attach(self) -> None:
        """Register the configuration ports on the PIO bus."""
        self.pio.register(CONFIG_ADDRESS, 4, ConfigAddressPort(self))
        self.pio.register(CONFIG_DATA, 4, ConfigDataPort(self))

    def add(self, device: int, function: int, fn: PciFunction, *, assign: bool = True
            ) -> PciFunction:
        """Put `fn` at 00:`device`.`function`; with `assign`, give its BARs addresses from
        the platform windows and turn decoding on, as firmware would."""
        if not (0 <= device < 32 and 0 <= function < 8):
            raise ValueError(f"device 0..31 and function 0..7, got {device}.{function}")
        devfn = device << 3 | function
        with self._lock:
            if devfn in self.functions:
                raise ValueError(f"00:{device:02x}.{function} is taken")
            self.functions[devfn] = fn
            fn.bus = self
            if assign:
                command = 0
                for i, bar in enumerate(fn.bars):
                    if bar is None:
                        continue
                    if bar.io:      # I/O BARs bottom-up, memory BARs top-down, as SeaBIOS
                        base = -(-self._next[True] // bar.size) * bar.size
                        fits = base + bar.size <= IO_WINDOW[1]
                        self._next[True] = base + bar.size
                    else:
                        base = (self._next[False] - bar.size) & ~(bar.size - 1)
                        fits = base >= MEM_WINDOW[0]
                        self._next[False] = base
                    if not fits:
                        raise ValueError(f"no room left for a {bar.size}-byte BAR")
                    fn.config_write(BAR0 + 4 * i, base, 4)
                    command |= COMMAND_IO if bar.io else COMMAND_MEMORY
                fn.config_write(COMMAND, command, 2)
        return fn

    def map_bar(self, fn: PciFunction, i: int, bar: Bar) -> None:
        target = fn.bar_target(i)
        with self._lock:
            if bar.mapping is not None and target == bar.address:
                return
            bus = self.pio if bar.io else self.mmio
            if bar.mapping is not None:
                bus.unregister(bar.mapping)
                bar.mapping = None
            bar.address = target or 0
            if target is None:
                return
            try:
                bar.mapping = bus.register(target, bar.size, bar.device)
            except ValueError:   # over another device: refused, the BAR decodes nothing
                self.refused_bars += 1
                bar.address = 0

    # -- mechanism #1 ------------------------------------------------------------------------

    def _target(self) -> tuple[PciFunction | None, int]:
        address = self.address
        if not address & CONFIG_ENABLE or (address >> 16) & 0xFF != 0:
            return None, 0
        return self.functions.get((address >> 8) & 0xFF), address & 0xFF

    def data_read(self, offset: int, size: int) -> int:
        with self._lock:
            fn, reg = self._target()
            if fn is None:
                return (1 << (8 * size)) - 1
            return fn.config_read(_register(reg, offset, size), size)

    def data_write(self, offset: int, value: int, size: int) -> None:
        with self._lock:
            fn, reg = self._target()
            if fn is not None:
                fn.config_write(_register(reg, offset, size), value, size)

    def reset_write(self, value: int) -> None:
        self.reset_control = value & 0x0E
        if value & RESET_CPU and self.on_reset is not None:
            self.on_reset()


def _register(latched: int, offset: int, size: int) -> int:
    # QEMU ORs the latched address's low bits (which the specification reserves) with the
    # data port offset, and kvm-unit-tests relies on it: it latches register 2 and reads
    # the device ID from 0xcfc. The access stays inside the 256-byte header.
    return min(latched | offset, 256 - size)


class ConfigAddressPort:
    """0xcf8-0xcfb: the address latch (32-bit accesses at 0xcf8), and the reset control
    byte at 0xcf9. Other accesses: writes dropped, reads all ones."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:
            self.bus.address = int.from_bytes(data, "little")  # read back as written
        elif offset == 1 and len(data) == 1:
            self.bus.reset_write(data[0])

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and size == 4:
            return self.bus.address.to_bytes(4, "little")
        if offset == 1 and size == 1:
            return bytes([self.bus.reset_control])
        return b"\xff" * size


class ConfigDataPort:
    """0xcfc-0xcff: the selected register, at the access's byte offset."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def write(self, offset: int, data: bytes) -> None:
        self.bus.data_write(offset, int.from_bytes(data, "little"), len(data))

    def read(self, offset: int, size: int) -> bytes:
        return self.bus.data_read(offset, size).to_bytes(size, "little")
