# SPDX-License-Identifier: GPL-2.0-or-later
"""The keyboard controller's reset line (an i8042 at 0x60/0x64) and System Control Port A
(0x92): the PC's ways for a guest to reset the machine.

i8042, the part of it an OS uses to reset and to probe:
- status (read 0x64): output buffer full (bit 0) when a byte waits at 0x60, system flag
  (bit 2, POST passed), command/data (bit 3), not inhibited (bit 4); the input buffer is
  always empty (bit 1 clear), so a guest never waits to write.
- commands (write 0x64): 0xfe pulses the reset line (`on_reset()`); 0xd0 reads the output
  port, 0xd1 writes it through the next byte at 0x60 (bit 0 clear = reset asserted); 0x20 /
  0x60 read / write the command byte; 0xaa self-test answers 0x55; 0xab interface test 0x00;
  others (enable/disable keyboard or mouse, ...) are accepted and do nothing.
- data (write 0x60) with no command pending goes to a keyboard that acknowledges it (0xfa;
  a reset, 0xff, also reports its self-test passed, 0xaa). Reading 0x60 takes the next byte
  (the last one again when none waits).
Port 0x92: bit 1 is the A20 gate (kept), a write setting bit 0 resets the machine.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

I8042_DATA = 0x60
I8042_COMMAND = 0x64
SYSTEM_CONTROL_A = 0x92

STATUS_OBF, STATUS_SYS, STATUS_CMD, STATUS_UNLOCKED = 0x01, 0x04, 0x08, 0x10
CMD_READ_BYTE, CMD_WRITE_BYTE = 0x20, 0x60
CMD_SELF_TEST, CMD_IF_TEST = 0xAA, 0xAB
CMD_READ_OUTPORT, CMD_WRITE_OUTPORT = 0xD0, 0xD1
CMD_RESET = 0xFE
OUTPORT_RESET = 0x01      # 0 = reset asserted
OUTPORT_A20 = 0x02


class I8042:
    """Register it twice: `register(pio)` puts the data port at 0x60 and the command/status
    port at 0x64. `on_reset()` is called when the guest resets the machine through it."""

    def __init__(self, on_reset: Callable[[], object] | None = None) -> None:
        self.on_reset = on_reset
        self.output: deque[int] = deque()
        self.last = 0
        self.command_byte = 0x45     # keyboard interrupt and translation on, system flag
        self.outport = OUTPORT_RESET | OUTPORT_A20
        self.pending: int | None = None   # a command waiting for its data byte
        self.resets = 0
        self._lock = threading.Lock()
        self.data_port = _Port(self, data=True)
        self.command_port = _Port(self, data=False)

    def register(self, pio) -> None:
        """Put the two ports on the PIO bus."""
        pio.register(I8042_DATA, 1, self.data_port)
        pio.register(I8042_COMMAND, 1, self.command_port)

    def _reset(self) -> None:
        self.resets += 1
        if self.on_reset is not None:
            self.on_reset()

    def status(self) -> int:
        with self._lock:
            return (STATUS_OBF if self.output else 0) | STATUS_SYS | STATUS_UNLOCKED | \
                (STATUS_CMD if self.pending is not None else 0)

    def read_data(self) -> int:
        with self._lock:
            if self.output:
                self.last = self.output.popleft()
            return self.last

    def command(self, value: int) -> None:
        reset = False
        with self._lock:
            self.pending = None
            if value == CMD_RESET:
                reset = True
            elif value == CMD_READ_OUTPORT:
                self.output.append(self.outport)
            elif value == CMD_READ_BYTE:
                self.output.append(self.command_byte)
            elif value in (CMD_WRITE_OUTPORT, CMD_WRITE_BYTE):
                self.pending = value
            elif value == CMD_SELF_TEST:
                self.output.append(0x55)
            elif value == CMD_IF_TEST:
                self.output.append(0x00)
        if reset:
            self._reset()

    def write_data(self, value: int) -> None:
        reset = False
        with self._lock:
            pending, self.pending = self.pending, None
            if pending == CMD_WRITE_OUTPORT:
                self.outport = value
                reset = not value & OUTPORT_RESET
            elif pending == CMD_WRITE_BYTE:
                self.command_byte = value
            else:
                self.output.extend((0xFA, 0xAA) if value == 0xFF else (0xFA,))
                while len(self.output) > 16:     # a guest cannot grow it without bound
                    self.output.popleft()
        if reset:
            self._reset()


class _Port:
    def __init__(self, dev: I8042, *, data: bool) -> None:
        self.dev, self.data = dev, data

    def read(self, offset: int, size: int) -> bytes:
        value = self.dev.read_data() if self.data else self.dev.status()
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if self.data:
            self.dev.write_data(data[0])
        else:
            self.dev.command(data[0])


class SystemControlA:
    """Port 0x92: A20 (bit 1) kept; setting bit 0 resets the machine (`on_reset()`)."""

    length = 1

    def __init__(self, on_reset: Callable[[], object] | None = None) -> None:
        self.on_reset = on_reset
        self.value = OUTPORT_A20

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        old, self.value = self.value, data[0] & 0x03
        if self.value & 1 and not old & 1 and self.on_reset is not None:
            self.on_reset()
