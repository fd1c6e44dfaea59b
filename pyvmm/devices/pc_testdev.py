# SPDX-License-Identifier: GPL-2.0-or-later
"""pc-testdev, QEMU's x86 test device for kvm-unit-tests.

Its pieces, where QEMU puts them:
- 0xe0-0xe3 and 0xe8-0xeb: one 32-bit scratch register behind both ranges. An access of
  `n` bytes at port `p` touches bits `(p & 3) * 8` and up of it (so a byte OUT to 0xe1 sets
  bits 8-15); what does not fit in 32 bits is dropped. The emulator tests write and read it
  back with every width, in real mode too.
- 0xe4: "flush page", a 32-bit OUT of a guest-physical address. The host takes the write
  permission off the host page behind it and gives it back, which makes KVM drop its
  mappings of that page: the guest's next access faults into KVM again (eventinj uses it to
  make an exception's delivery fault on the IDT and the stack). Other widths are ignored.
- 0x2000-0x2017: IRQ lines. A byte OUT of `v` to 0x2000 + n sets interrupt line n to
  `v != 0` (level), on the in-kernel PIC and IOAPIC. Other widths are ignored, as QEMU
  accepts byte accesses only. QEMU's ISA bus has 16 lines; the upper 8 ports drive
  GSIs 16-23 here (IOAPIC pins) where QEMU would refuse them.
- 0xff000000, 64 KiB of MMIO ("iomem"): reads return what was written, at any width.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable

SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
SCRATCH_BYTE_PORT = 0xE8
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000
PAGE_MASK = ~0xFFF


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def flush_guest_page(memory, gpa: int) -> bool:
    """Make KVM drop its mappings of the guest page at `gpa` (in `memory`, a GuestMemory):
    take write permission off the host page and give it back. Changing a mapping's protection
    runs the kernel's MMU notifiers, which unmap the page from the guest; its contents stay.
    Read-only in between (not inaccessible) so host threads reading guest memory meanwhile
    are unaffected. Returns False (nothing done) for an address outside guest RAM."""
    region = memory.find(gpa & PAGE_MASK)
    if region is None or region.closed:
        return False
    host = region.host_addr + (gpa & PAGE_MASK) - region.guest_addr
    for prot in (mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE):
        if _libc.mprotect(host, mmap.PAGESIZE, prot) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect of the host page behind {gpa:#x}: "
                          f"{os.strerror(err)}")
    return True


class ScratchPort:
    """The 32-bit scratch register (register it at 0xe0 and at 0xe8, length 4 each; both
    ranges share the value)."""

    length = 4

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def _mask(self, offset: int, size: int) -> tuple[int, int]:
        shift = (offset & 3) * 8
        return shift, (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF

    def write(self, offset: int, data: bytes) -> None:
        shift, mask = self._mask(offset, len(data))
        value = (int.from_bytes(data, "little") << shift) & mask
        with self._lock:
            self.value = (self.value & ~mask) | value

    def read(self, offset: int, size: int) -> bytes:
        shift, mask = self._mask(offset, size)
        return ((self.value & mask) >> shift).to_bytes(size, "little")


class FlushPort:
    """Port 0xe4: `flush(page_gpa)` is called for each 32-bit write (the address with its
    low 12 bits cleared). Reads answer all ones."""

    length = 4

    def __init__(self, flush: Callable[[int], object]) -> None:
        self.flush = flush
        self.flushes = 0

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 4:
            return
        self.flushes += 1
        self.flush(int.from_bytes(data, "little") & PAGE_MASK)

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size


class IrqLines:
    """Ports 0x2000-0x2017: `set_irq(line, level)` (e.g. `vm.irq_line`) for byte writes.
    `levels` keeps what the guest last set on each line."""

    length = IRQ_LINES

    def __init__(self, set_irq: Callable[[int, int], object]) -> None:
        self.set_irq = set_irq
        self.levels = [0] * IRQ_LINES

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1 or not 0 <= offset < IRQ_LINES:
            return
        level = 1 if data[0] else 0
        self.levels[offset] = level
        self.set_irq(offset, level)

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size


class IoMem:
    """The 64 KiB MMIO scratch area: plain storage, little-endian at every width."""

    length = IOMEM_SIZE

    def __init__(self) -> None:
        self.data = bytearray(IOMEM_SIZE)

    def write(self, offset: int, data: bytes) -> None:
        if 0 <= offset and offset + len(data) <= IOMEM_SIZE:
            self.data[offset: offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        if 0 <= offset and offset + size <= IOMEM_SIZE:
            return bytes(self.data[offset: offset + size])
        return b"\xff" * size


class PcTestdev:
    """All of pc-testdev. `attach(pio, mmio)` registers its pieces where QEMU has them.

    `set_irq(line, level)` drives interrupt lines (the platform passes `vm.irq_line`);
    `flush_page(gpa)` drops KVM's mappings of one guest page (the platform passes
    `flush_guest_page` bound to its Machine's memory)."""

    def __init__(self, set_irq: Callable[[int, int], object],
                 flush_page: Callable[[int], object]) -> None:
        self.scratch = ScratchPort()
        self.flush = FlushPort(flush_page)
        self.irq = IrqLines(set_irq)
        self.iomem = IoMem()

    def attach(self, pio, mmio) -> None:
        """Register on the PIO and MMIO buses at QEMU's addresses."""
        pio.register(SCRATCH_PORT, ScratchPort.length, self.scratch)
        pio.register(FLUSH_PORT, FlushPort.length, self.flush)
        pio.register(SCRATCH_BYTE_PORT, ScratchPort.length, self.scratch)
        pio.register(IRQ_PORT, IrqLines.length, self.irq)
        mmio.register(IOMEM_BASE, IoMem.length, self.iomem)
