# SPDX-License-Identifier: GPL-2.0-or-later
"""The PC's CMOS RAM and real-time clock (a Motorola MC146818), at ports 0x70/0x71.

A write to 0x70 selects a register (bit 7 is the NMI mask, kept but not otherwise used);
0x71 reads or writes it. Reading 0x70 answers all ones, as QEMU does.

Clock registers 0x00-0x09 (seconds, alarm seconds, minutes, alarm minutes, hours, alarm
hours, day of week, day of month, month, year) follow a clock that starts at the host's UTC
time (QEMU's `-rtc base=utc`), in BCD or binary and 24- or 12-hour form as register B says.
Register A: UIP (bit 7) is set from 244 us before each second's update until the update ends
1984 us after it, the divider/rate bits are kept. Register B: SET (bit 7) stops the clock so
the guest can write the time, which then runs on from what was written; PIE/AIE/UIE enable
the periodic, alarm and update-ended interrupts. Register C: their flags (IRQF in bit 7),
cleared by reading it, which also lowers IRQ 8. Register D: the battery is good (VRT).
An alarm field whose top two bits are set matches any value ("don't care").

Interrupts: while an enabled event is pending the device raises IRQ 8 through `set_irq`; one
timer thread per device serves them. The periodic interrupt runs at register A's rate, but
no faster than `MIN_PERIOD` (a Python timer cannot keep the 122 us of the fastest rate).

CMOS bytes 0x0e-0x7f are plain storage; `PcPlatform` fills the ones firmware would (memory
sizes, CPU count; see `pc_cmos_bytes`). Register 0x0f is the shutdown status byte.
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable

RTC_PORT = 0x70
RTC_PORTS = 2
RTC_IRQ = 8
SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = range(6)
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
SHUTDOWN_STATUS = 0x0F
CENTURY = 0x32

A_UIP = 0x80
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM, B_24H, B_DSE = (0x80, 0x40, 0x20, 0x10, 0x08, 0x04,
                                                          0x02, 0x01)
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80
ALARM_DONT_CARE = 0xC0

UIP_BEFORE = 244e-6     # UIP rises this long before an update...
UPDATE_TIME = 1984e-6   # ...and the update itself takes this long
MIN_PERIOD = 1e-3


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _unbcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


class Rtc:
    """The device. `set_irq(line, level)` raises IRQ 8 (None: no interrupts); `now()` gives
    the host time in seconds since the epoch (time.time by default), `start` the guest's
    clock at creation (default: the host's time)."""

    length = RTC_PORTS

    def __init__(self, set_irq: Callable[[int, int], object] | None = None, *,
                 now: Callable[[], float] = time.time, start: float | None = None) -> None:
        self.set_irq = set_irq
        self._now = now
        self._lock = threading.RLock()
        self.cmos = bytearray(128)
        self.cmos[REG_A] = 0x26          # 32.768 kHz time base, 1024 Hz periodic rate
        self.cmos[REG_B] = B_24H
        self.cmos[REG_D] = D_VRT
        self.index = 0
        self.nmi_masked = False
        # guest time = host time + offset; while SET is on, the time is `_frozen`.
        self._offset = (start - now()) if start is not None else 0.0
        self._frozen: float | None = None
        self._written: dict[int, int] = {}
        self._last_check = self._guest_time()
        self._flags = 0
        self._line = 0
        self._timer: threading.Timer | None = None
        self._closed = False

    # -- the clock ---------------------------------------------------------------------------

    def _guest_time(self) -> float:
        return self._frozen if self._frozen is not None else self._now() + self._offset

    def _encode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_DM else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_DM else _unbcd(value)

    def _encode_hour(self, hour: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._encode(hour)
        pm = 0x80 if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _decode_hour(self, value: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._decode(value)
        hour = self._decode(value & 0x7F) % 12
        return hour + 12 if value & 0x80 else hour

    def _fields(self, t: float) -> dict[int, int]:
        tm = time.gmtime(int(t))
        return {SECONDS: self._encode(tm.tm_sec), MINUTES: self._encode(tm.tm_min),
                HOURS: self._encode_hour(tm.tm_hour),
                DAY_OF_WEEK: self._encode((tm.tm_wday + 1) % 7 + 1),   # 1 = Sunday
                DAY_OF_MONTH: self._encode(tm.tm_mday), MONTH: self._encode(tm.tm_mon),
                YEAR: self._encode(tm.tm_year % 100), CENTURY: self._encode(tm.tm_year // 100)}

    def _set_from_fields(self, fields: dict[int, int]) -> None:
        """Leave SET: the clock runs on from the time the guest wrote."""
        base = self._fields(self._frozen or 0)
        base = {k: fields.get(k, v) for k, v in base.items()}
        year = self._decode(base[CENTURY]) * 100 + self._decode(base[YEAR])
        when: float
        try:
            when = calendar.timegm((year, self._decode(base[MONTH]),
                                    self._decode(base[DAY_OF_MONTH]),
                                    self._decode_hour(base[HOURS]), self._decode(base[MINUTES]),
                                    self._decode(base[SECONDS]), 0, 0, 0))
        except (ValueError, OverflowError):   # a nonsense date: keep the old time
            when = self._frozen or 0
        self._offset = when - self._now()
        self._frozen = None

    def _uip(self, t: float) -> bool:
        frac = t % 1.0
        return frac >= 1.0 - UIP_BEFORE or frac < UPDATE_TIME

    def _period(self) -> float | None:
        rate = self.cmos[REG_A] & 0x0F
        if rate == 0:
            return None
        if rate <= 2:
            rate += 7            # rates 1 and 2 are 3.90625 ms and 7.8125 ms
        return max((1 << (rate - 1)) / 32768.0, MIN_PERIOD)

    def seconds_to_alarm(self, horizon: int = 86400) -> float | None:
        """How long until the alarm goes off (None: the alarm interrupt is not enabled, or
        no second within `horizon` matches). What a sleeping machine waits for to wake."""
        with self._lock:
            if not self.cmos[REG_B] & B_AIE or self._frozen is not None:
                return None
            t = self._guest_time()
            for second in range(int(t) + 1, int(t) + 1 + horizon):
                if self._alarm_matches(second):
                    return second - t
        return None

    # -- events ------------------------------------------------------------------------------

    def _alarm_matches(self, t: int) -> bool:
        now = self._fields(t)
        for field, alarm in ((SECONDS, SECONDS_ALARM), (MINUTES, MINUTES_ALARM),
                             (HOURS, HOURS_ALARM)):
            value = self.cmos[alarm]
            if value & ALARM_DONT_CARE != ALARM_DONT_CARE and value != now[field]:
                return False
        return True

    def _catch_up(self) -> None:
        """Set the flags of every event between the last check and now."""
        if self._frozen is not None:
            return
        t, last = self._guest_time(), self._last_check
        self._last_check = t
        if int(t) > int(last):
            self._flags |= C_UF
            # an alarm is checked at each update; cap the scan (a long pause in the host)
            for second in range(max(int(last) + 1, int(t) - 3600), int(t) + 1):
                if self._alarm_matches(second):
                    self._flags |= C_AF
                    break
        period = self._period()
        if period is not None and int(t / period) > int(last / period):
            self._flags |= C_PF
        # The enable bits of register B sit where register C has the flags they enable.
        if self._flags & self.cmos[REG_B] & (C_PF | C_AF | C_UF):
            self._flags |= C_IRQF
        self._drive_line()

    def _drive_line(self) -> None:
        level = 1 if self._flags & C_IRQF else 0
        if level != self._line and self.set_irq is not None:
            self._line = level
            self.set_irq(RTC_IRQ, level)

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        b = self.cmos[REG_B]
        if self._closed or self.set_irq is None or b & B_SET or not b & (B_PIE | B_AIE
                                                                          | B_UIE):
            return
        t = self._guest_time()
        wait = 1.0 - t % 1.0
        period = self._period()
        if b & B_PIE and period is not None:
            wait = min(wait, period - t % period)
        self._timer = threading.Timer(max(wait, 0.0) + 1e-4, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._catch_up()
            except (OSError, ValueError):   # KvmError, ClosedError
                # The VM went away under the timer (closed without close() here first):
                # nothing left to interrupt.
                self._closed, self._timer = True, None
                return
            self._reschedule()

    # -- guest side ----------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """0x70: select a register (and the NMI mask); 0x71: write it."""
        value = data[0]
        with self._lock:
            if offset == 0:
                self.index, self.nmi_masked = value & 0x7F, bool(value & 0x80)
                return
            index = self.index
            if index in (REG_C, REG_D):
                return                                   # read-only
            if index == REG_A:
                self.cmos[REG_A] = (self.cmos[REG_A] & A_UIP) | (value & 0x7F)
                self._catch_up()
                self._reschedule()
                return
            if index == REG_B:
                self._catch_up()
                was_set = self.cmos[REG_B] & B_SET
                self.cmos[REG_B] = value
                if value & B_SET and not was_set:
                    self._frozen = float(int(self._guest_time()))
                    self._written = {}
                elif was_set and not value & B_SET:
                    self._set_from_fields(self._written)
                    self._last_check = self._guest_time()
                self._catch_up()    # flags already pending may now be enabled: IRQF
                self._reschedule()
                return
            if index in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR,
                         CENTURY):
                if self._frozen is not None:
                    self._written[index] = value
                else:                                    # running clock: it moves at once
                    self._frozen = float(int(self._guest_time()))
                    self._set_from_fields({index: value})
                if index != CENTURY:
                    return
            self.cmos[index] = value
            if index in (SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM):
                self._reschedule()

    def read(self, offset: int, size: int) -> bytes:
        """0x70: all ones; 0x71: the selected register."""
        if offset == 0 or size != 1:
            return b"\xff" * size
        with self._lock:
            index = self.index
            if index == REG_A:
                uip = A_UIP if self._frozen is None and self._uip(self._guest_time()) else 0
                return bytes([(self.cmos[REG_A] & 0x7F) | uip])
            if index == REG_C:
                self._catch_up()
                flags, self._flags = self._flags, 0
                self._drive_line()
                return bytes([flags])
            if index in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR,
                         CENTURY):
                if self._frozen is not None and index in self._written:
                    return bytes([self._written[index]])
                return bytes([self._fields(self._guest_time())[index]])
            return bytes([self.cmos[index]])

    @property
    def timer_running(self) -> bool:
        """Whether the interrupt timer is armed (an enabled interrupt is due)."""
        return self._timer is not None

    def close(self) -> None:
        """Stop the interrupt timer."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


def pc_cmos_bytes(memory_size: int, cpus: int, *, below_4g: int | None = None
                  ) -> dict[int, int]:
    """The CMOS bytes a PC BIOS (QEMU's) reports: base memory 640 KiB (0x15-0x16), extended
    memory in KiB above 1 MiB up to 64 MiB (0x17-0x18, 0x30-0x31), memory above 16 MiB in
    64 KiB units (0x34-0x35), memory above 4 GiB in 64 KiB units (0x5b-0x5d), CPUs - 1
    (0x5f)."""
    low = memory_size if below_4g is None else below_4g
    high = memory_size - low
    ext = min(max(low - (1 << 20), 0) // 1024, 0xFFFF)
    above16 = min(max(low - (16 << 20), 0) // 65536, 0xFFFF)
    above4g = min(high // 65536, 0xFFFFFF)
    out = {0x15: 0x80, 0x16: 0x02, 0x17: ext & 0xFF, 0x18: ext >> 8, 0x30: ext & 0xFF,
           0x31: ext >> 8, 0x34: above16 & 0xFF, 0x35: above16 >> 8,
           0x5B: above4g & 0xFF, 0x5C: (above4g >> 8) & 0xFF, 0x5D: above4g >> 16,
           0x5F: (cpus - 1) & 0xFF}
    return out
