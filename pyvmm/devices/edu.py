# SPDX-License-Identifier: GPL-2.0-or-later
"""edu, QEMU's educational PCI device (docs/specs/edu.rst), which kvm-unit-tests' intel_iommu
test drives to make DMA and interrupts go through the IOMMU.

Identity 1234:11e8, class 00ff, interrupt pin INTA, an MSI capability (one vector, 64-bit
address). BAR 0 is 1 MiB of memory with 32-bit registers below 0x80 and 32- or 64-bit ones
from 0x80 on:

    0x00 RO  identification 0x010000ed (version 1.0)
    0x04 RW  liveness: reads the bitwise inverse of the last write
    0x08 RW  factorial: a write stores n, a read gives n! (mod 2**32)
    0x20 RW  status: bit 0 factorial busy (RO, never set: computed at the write), bit 7
             raise interrupt 0x1 when a factorial is done
    0x24 RO  interrupt status: the values that raised the interrupt (ORed)
    0x60 WO  interrupt raise: ORs the value into the status and raises the interrupt
    0x64 WO  interrupt acknowledge: clears those bits; INTx drops when none are left
    0x80 RW  DMA source, 0x88 RW DMA destination, 0x90 RW DMA count
    0x98 RW  DMA command: bit 0 start, bit 1 direction (1: device buffer to RAM), bit 2
             raise interrupt 0x100 when done

The device's DMA buffer is 4 KiB at device address 0x40000. A DMA runs at the command write
(bit 0 reads back clear at once); its RAM side goes through `dma_read(address, n)` /
`dma_write(address, data)`, which a platform points at guest memory or at an IOMMU's
translation. The interrupt is INTx (`set_intx(level)`) unless the guest enabled MSI, then
each raise sends one message through `msi(address, data)`. A DMA range outside the buffer,
or an access of a size the specification does not allow, is the guest's error
(`GuestError`); reads of other registers answer 0.
"""

from __future__ import annotations

from collections.abc import Callable
from math import factorial

from ..errors import GuestError
from .pci import STATUS, Bar, PciFunction

VENDOR_QEMU = 0x1234
DEVICE_EDU = 0x11E8
CLASS_OTHERS = 0x00FF00
BAR_SIZE = 1 << 20
IDENTIFICATION = 0x010000ED
DMA_BUFFER = 0x40000
DMA_BUFFER_SIZE = 4096

REG_ID, REG_ALIVE, REG_FACTORIAL = 0x00, 0x04, 0x08
REG_STATUS, REG_INTR_STATUS, REG_INTR_RAISE, REG_INTR_ACK = 0x20, 0x24, 0x60, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
STATUS_IRQ_FACTORIAL = 0x80
CMD_START, CMD_FROM_DEVICE, CMD_IRQ = 0x1, 0x2, 0x4
IRQ_FACTORIAL, IRQ_DMA = 0x1, 0x100

#: The MSI capability: where it is in config space, and its layout (64-bit address).
CAP_LIST = 0x34
MSI_CAP = 0x40
CAP_ID_MSI = 0x05
STATUS_CAP_LIST = 0x10
MSI_CONTROL, MSI_ADDRESS_LO, MSI_ADDRESS_HI, MSI_DATA = 2, 4, 8, 12
MSI_ENABLE = 0x1
MSI_64BIT = 0x80
_MSI_END = MSI_CAP + 16


class Edu(PciFunction):
    """The edu device; its BAR 0 register block is `self.regs` (the object on the bus)."""

    def __init__(self, *, dma_read: Callable[[int, int], bytes],
                 dma_write: Callable[[int, bytes], None],
                 set_intx: Callable[[bool], object] | None = None,
                 msi: Callable[[int, int], object] | None = None) -> None:
        self.regs = EduRegisters(self)
        super().__init__(vendor_id=VENDOR_QEMU, device_id=DEVICE_EDU, class_code=CLASS_OTHERS,
                         revision=0x10, interrupt_pin=1, bars=[Bar(BAR_SIZE, False, self.regs)])
        self._put(STATUS, STATUS_CAP_LIST, 2)
        self._put(CAP_LIST, MSI_CAP, 1)
        self._put(MSI_CAP, CAP_ID_MSI, 1)          # next pointer 0: the last capability
        self._put(MSI_CAP + MSI_CONTROL, MSI_64BIT, 2)
        self.dma_read, self.dma_write = dma_read, dma_write
        self.set_intx, self.msi = set_intx, msi
        self._intx = False

    # -- config space: the MSI capability's writable fields --------------------------------

    def config_write(self, reg: int, value: int, size: int) -> None:
        if MSI_CAP <= reg < _MSI_END:
            for n in range(size):
                at = reg + n
                off = at - MSI_CAP
                if off == MSI_CONTROL:
                    mask = MSI_ENABLE           # one vector: multiple-message enable stays 0
                elif MSI_ADDRESS_LO <= off < MSI_ADDRESS_LO + 4:
                    mask = 0xFC if off == MSI_ADDRESS_LO else 0xFF
                elif MSI_ADDRESS_HI <= off < MSI_DATA + 2:
                    mask = 0xFF
                else:
                    continue
                byte = (value >> (8 * n)) & 0xFF
                self.config[at] = (self.config[at] & ~mask) | (byte & mask)
            self._update_intx()
            return
        super().config_write(reg, value, size)

    @property
    def msi_enabled(self) -> bool:
        return bool(self._get(MSI_CAP + MSI_CONTROL, 2) & MSI_ENABLE)

    def msi_message(self) -> tuple[int, int]:
        """(address, data) the guest programmed into the MSI capability."""
        address = self._get(MSI_CAP + MSI_ADDRESS_LO, 4) | self._get(MSI_CAP + MSI_ADDRESS_HI,
                                                                     4) << 32
        return address, self._get(MSI_CAP + MSI_DATA, 2)

    # -- interrupts --------------------------------------------------------------------------

    def raise_irq(self, value: int) -> None:
        """OR `value` into the interrupt status and signal it (one MSI, or INTx high)."""
        self.regs.intr_status |= value & 0xFFFFFFFF
        if self.msi_enabled:
            if self.msi is not None:
                self.msi(*self.msi_message())
        self._update_intx()

    def ack_irq(self, value: int) -> None:
        self.regs.intr_status &= ~value & 0xFFFFFFFF
        self._update_intx()

    def _update_intx(self) -> None:
        level = bool(self.regs.intr_status) and not self.msi_enabled
        if level != self._intx:
            self._intx = level
            if self.set_intx is not None:
                self.set_intx(level)

    # -- DMA --------------------------------------------------------------------------------

    def run_dma(self, command: int) -> None:
        regs = self.regs
        count = regs.dma_count
        side = regs.dma_src if command & CMD_FROM_DEVICE else regs.dma_dst
        offset = side - DMA_BUFFER
        if not (0 <= offset and offset + count <= DMA_BUFFER_SIZE):
            raise GuestError(f"edu: DMA of {count} bytes at device address {side:#x} is "
                             f"outside the buffer {DMA_BUFFER:#x}+{DMA_BUFFER_SIZE:#x}")
        if command & CMD_FROM_DEVICE:
            self.dma_write(regs.dma_dst, bytes(regs.buffer[offset: offset + count]))
        else:
            data = self.dma_read(regs.dma_src, count)
            regs.buffer[offset: offset + count] = data
        if command & CMD_IRQ:
            self.raise_irq(IRQ_DMA)


class EduRegisters:
    """BAR 0 of an `Edu` (the MMIO side)."""

    def __init__(self, edu: Edu) -> None:
        self.edu = edu
        self.alive = 0
        self.fact = 0
        self.status = 0
        self.intr_status = 0
        self.dma_src = self.dma_dst = self.dma_count = 0
        self.dma_cmd = 0
        self.buffer = bytearray(DMA_BUFFER_SIZE)

    @staticmethod
    def _check(offset: int, size: int) -> None:
        if not (size == 4 or (size == 8 and offset >= 0x80)) or offset % size:
            raise GuestError(f"edu: {size}-byte access at {offset:#x} (4-byte registers below "
                             "0x80, 4 or 8 bytes from 0x80, aligned)")

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        value = {REG_ID: IDENTIFICATION, REG_ALIVE: ~self.alive & 0xFFFFFFFF,
                 REG_FACTORIAL: self.fact, REG_STATUS: self.status,
                 REG_INTR_STATUS: self.intr_status, REG_DMA_SRC: self.dma_src,
                 REG_DMA_DST: self.dma_dst, REG_DMA_COUNT: self.dma_count,
                 REG_DMA_CMD: self.dma_cmd}.get(offset & ~0x7 if offset >= 0x80 else offset, 0)
        if offset >= 0x80 and offset % 8:     # the high half of a 64-bit register
            value >>= 32
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        value = int.from_bytes(data, "little")
        edu = self.edu
        if offset == REG_ALIVE:
            self.alive = value
        elif offset == REG_FACTORIAL:
            self.fact = factorial(value) & 0xFFFFFFFF if value < 34 else 0  # 34! = 0 mod 2**32
            if self.status & STATUS_IRQ_FACTORIAL:
                edu.raise_irq(IRQ_FACTORIAL)
        elif offset == REG_STATUS:
            self.status = value & STATUS_IRQ_FACTORIAL
        elif offset == REG_INTR_RAISE:
            edu.raise_irq(value)
        elif offset == REG_INTR_ACK:
            edu.ack_irq(value)
        elif offset >= 0x80:
            self._write_dma(offset, len(data), value)

    def _write_dma(self, offset: int, size: int, value: int) -> None:
        reg = offset & ~0x7
        name = {REG_DMA_SRC: "dma_src", REG_DMA_DST: "dma_dst", REG_DMA_COUNT: "dma_count",
                REG_DMA_CMD: "dma_cmd"}.get(reg)
        if name is None:
            return
        old = getattr(self, name)
        if size == 8:
            new = value
        elif offset % 8:
            new = (old & 0xFFFFFFFF) | value << 32
        else:
            new = (old & ~0xFFFFFFFF) | value
        if name == "dma_cmd":
            self.dma_cmd = new & (CMD_FROM_DEVICE | CMD_IRQ)
            if new & CMD_START:
                self.edu.run_dma(new)
        else:
            setattr(self, name, new)
