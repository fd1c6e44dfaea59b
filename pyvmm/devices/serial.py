# SPDX-License-Identifier: GPL-2.0-or-later
"""A 16550 UART subset: enough for a guest to print through the classic COM1 port, polling
the line status or driven by the transmit-holding-register-empty interrupt."""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable

from .limits import DEFAULT_SERIAL_KEEP

COM1 = 0x3F8

# Register offsets (DLAB = 0)
THR_RBR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LSR_THR_EMPTY = 0x20
IER_THRE = 0x02            # interrupt when the transmit holding register is empty
IIR_NONE, IIR_THRE = 0x01, 0x02
#: The ISA IRQ of COM1 (an IOAPIC pin and a GSI with the in-kernel irqchip).
COM1_IRQ = 4
LSR_TX_IDLE = 0x40
LCR_DLAB = 0x80


class SerialConsole:
    """Transmit-only 16550: bytes written to THR are passed to `sink`, if given, and the most
    recent `keep` of them are kept in `output` (older ones are dropped and counted in
    `dropped`: a guest printing forever cannot grow host memory); the line status always says
    the transmitter is empty; there is no receive data. Divisor latch and scratch registers
    read back what was written.

    `irq(level)`, when given, drives the UART's interrupt line (e.g. the irqchip's IRQ 4):
    with IER bit 1 set, an empty transmit holding register is an interrupt (IIR 0x02),
    pending when the bit is enabled and again after every byte (sent at once), cleared by
    reading IIR or writing THR, as on a 16550; an interrupt-driven driver (Linux's 8250)
    sends one byte per interrupt and waits for the next without it."""

    length = 8

    def __init__(self, sink=None, *, keep: int = DEFAULT_SERIAL_KEEP,
                 irq: Callable[[int], object] | None = None) -> None:
        if isinstance(keep, bool) or operator.index(keep) < 0:
            raise ValueError(f"keep must be a byte count >= 0, got {keep!r}")
        if irq is not None and not callable(irq):
            raise ValueError(f"irq must be a callable taking the line level, not {irq!r}")
        self.sink = sink
        self.keep = operator.index(keep)
        self.dropped = 0
        self.irq = irq
        self._out = bytearray()
        self._lock = threading.Lock()
        self._regs = bytearray(8)
        self._divisor = bytearray(2)
        self._thre_pending = False
        self._level = 0

    def _update_irq(self) -> None:
        # The line follows "an enabled interrupt is pending", as the chip's INTR pin does;
        # only changes reach `irq` (an ioctl each), so a polling guest costs nothing here.
        level = int(bool(self._regs[IER] & IER_THRE) and self._thre_pending)
        if level != self._level and self.irq is not None:
            self._level = level
            self.irq(level)

    @property
    def output(self) -> bytes:
        with self._lock:
            return bytes(self._out)

    def clear(self) -> None:
        """Forget the output kept so far (`dropped` stays)."""
        with self._lock:
            self._out.clear()

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        dlab = self._regs[LCR] & LCR_DLAB
        if offset in (THR_RBR, IER) and dlab:
            self._divisor[offset] = value
        elif offset == THR_RBR:
            with self._lock:
                self._out.append(value)
                over = len(self._out) - self.keep
                if over > 0:
                    del self._out[:over]  # cheap: CPython moves a bytearray's start
                    self.dropped += over
            if self.sink is not None:
                self.sink(bytes([value]))
            # Writing THR clears its interrupt; the byte leaves at once, so THR is empty
            # again: a new interrupt (the line drops and rises: an edge for the IOAPIC).
            self._thre_pending = False
            self._update_irq()
            self._thre_pending = True
            self._update_irq()
        elif offset == IER:
            enabling = value & IER_THRE and not self._regs[IER] & IER_THRE
            self._regs[IER] = value & 0x0F
            if enabling:
                self._thre_pending = True  # THR is always empty: enabling it interrupts
            self._update_irq()
        elif offset not in (LSR, MSR):
            self._regs[offset] = value

    def read(self, offset: int, size: int) -> bytes:
        dlab = self._regs[LCR] & LCR_DLAB
        if offset in (THR_RBR, IER) and dlab:
            value = self._divisor[offset]
        elif offset == THR_RBR:
            value = 0
        elif offset == IIR_FCR:
            value = IIR_NONE  # no FIFOs: a driver sends one byte per interrupt
            if self._regs[IER] & IER_THRE and self._thre_pending:
                value = IIR_THRE
                self._thre_pending = False  # reading IIR that names THRE clears it
                self._update_irq()
        elif offset == LSR:
            value = LSR_THR_EMPTY | LSR_TX_IDLE
        elif offset == MSR:
            value = 0xB0  # DCD, DSR, CTS
        else:
            value = self._regs[offset]
        return bytes([value]) * size
