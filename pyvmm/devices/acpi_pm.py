# SPDX-License-Identifier: GPL-2.0-or-later
"""The ACPI power-management registers of the PC platform (PIIX4-style, at I/O 0x600):
the PM1a event block, the PM1a control block and the PM timer. The FADT points at them.

- PM1a_STS (0x600, 16 bits): TMR_STS (bit 0) set when the timer's bit 23 flips, WAK_STS
  (bit 15) set when the machine wakes; a 1 written clears a bit. PM1a_EN (0x602): kept.
- PM1a_CNT (0x604, 16 bits): SCI_EN (bit 0) always reads 1 (there is no SMI command port: the
  machine is always in ACPI mode); SLP_TYP (bits 12:10) is kept; writing SLP_EN (bit 13,
  never read back) enters that sleep state: type 0 is S5 (`on_poweroff()`), type 1 is S3
  (`on_suspend()`), as QEMU's PIIX4 numbers them; other types do nothing.
- PM_TMR (0x608, 32 bits read): a 24-bit counter running at 3.579545 MHz from the host's
  monotonic clock. Narrower reads give its low bytes.
Other accesses: writes dropped, reads all ones. No SCI is raised (no event here is enabled to
raise one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

PM_BASE = 0x600
PM1A_EVT, PM1A_CNT, PM_TMR = 0x0, 0x4, 0x8
PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN = 4, 2, 4
PM_LENGTH = 12
PM_TIMER_HZ = 3579545
TMR_STS, WAK_STS = 1 << 0, 1 << 15
SCI_EN, SLP_EN = 1 << 0, 1 << 13
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 0x7


class AcpiPm:
    """The registers. `on_poweroff()` and `on_suspend()` are called from the vCPU thread
    that wrote SLP_EN; `clock()` gives seconds (time.monotonic by default)."""

    length = PM_LENGTH

    def __init__(self, *, on_poweroff: Callable[[], object] | None = None,
                 on_suspend: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_poweroff, self.on_suspend = on_poweroff, on_suspend
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self.status = 0
        self.enable = 0
        self.control = SCI_EN
        self._last_timer = 0
        self.sleeps: list[int] = []     # the SLP_TYP of every SLP_EN write

    def timer(self) -> int:
        """The 24-bit PM timer now."""
        ticks = int((self._clock() - self._start) * PM_TIMER_HZ)
        return ticks & 0xFFFFFF

    def _update_status(self) -> None:
        now = int((self._clock() - self._start) * PM_TIMER_HZ)
        if now >> 23 != self._last_timer >> 23:
            self.status |= TMR_STS
        self._last_timer = now

    def wake(self) -> None:
        """The machine woke from a sleep state: WAK_STS is set."""
        with self._lock:
            self.status |= WAK_STS

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == PM1A_EVT and size in (2, 4):
                self._update_status()
                value = self.status | self.enable << 16
            elif offset == PM1A_EVT + 2 and size == 2:
                value = self.enable
            elif offset == PM1A_CNT and size in (1, 2):
                value = self.control & ~SLP_EN
            elif PM_TMR <= offset and offset + size <= PM_TMR + PM_TMR_LEN:
                value = self.timer() >> (8 * (offset - PM_TMR))
            else:
                return b"\xff" * size
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        size = len(data)
        sleep = None
        with self._lock:
            if offset == PM1A_EVT and size in (2, 4):
                self._update_status()
                self.status &= ~(value & 0xFFFF)
                if size == 4:
                    self.enable = value >> 16
            elif offset == PM1A_EVT + 2 and size == 2:
                self.enable = value
            elif offset == PM1A_CNT and size == 2:
                self.control = (value & ~SLP_EN) | SCI_EN
                if value & SLP_EN:
                    sleep = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
                    self.sleeps.append(sleep)
        if sleep == 0 and self.on_poweroff is not None:
            self.on_poweroff()
        elif sleep == 1 and self.on_suspend is not None:
            self.on_suspend()
