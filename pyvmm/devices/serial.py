# SPDX-License-Identifier: GPL-2.0-or-later
"""A 16550 UART subset: enough for a guest to print through the classic COM1 port."""

from __future__ import annotations

import operator
import threading

from .limits import DEFAULT_SERIAL_KEEP

COM1 = 0x3F8

# Register offsets (DLAB = 0)
THR_RBR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LSR_THR_EMPTY = 0x20
LSR_TX_IDLE = 0x40
LCR_DLAB = 0x80


class SerialConsole:
    """Transmit-only 16550: bytes written to THR are passed to `sink`, if given, and the most
    recent `keep` of them are kept in `output` (older ones are dropped and counted in
    `dropped`: a guest printing forever cannot grow host memory); the line status always says
    the transmitter is empty; there is no receive data. Divisor latch and scratch registers
    read back what was written."""

    length = 8

    def __init__(self, sink=None, *, keep: int = DEFAULT_SERIAL_KEEP) -> None:
        if isinstance(keep, bool) or operator.index(keep) < 0:
            raise ValueError(f"keep must be a byte count >= 0, got {keep!r}")
        self.sink = sink
        self.keep = operator.index(keep)
        self.dropped = 0
        self._out = bytearray()
        self._lock = threading.Lock()
        self._regs = bytearray(8)
        self._divisor = bytearray(2)

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
        elif offset not in (LSR, MSR):
            self._regs[offset] = value

    def read(self, offset: int, size: int) -> bytes:
        dlab = self._regs[LCR] & LCR_DLAB
        if offset in (THR_RBR, IER) and dlab:
            value = self._divisor[offset]
        elif offset == THR_RBR:
            value = 0
        elif offset == IIR_FCR:
            value = 0x01  # no interrupt pending
        elif offset == LSR:
            value = LSR_THR_EMPTY | LSR_TX_IDLE
        elif offset == MSR:
            value = 0xB0  # DCD, DSR, CTS
        else:
            value = self._regs[offset]
        return bytes([value]) * size
