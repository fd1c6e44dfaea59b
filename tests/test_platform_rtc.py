# SPDX-License-Identifier: GPL-2.0-or-later
"""CMOS/RTC: the clock in BCD and binary, 12- and 24-hour forms, SET and writing the time,
UIP around updates, the flags of register C and IRQ 8, the CMOS bytes the platform fills,
and a guest reading the clock, waiting for an update and taking the update interrupt."""

from __future__ import annotations

import calendar
import time

import pytest

from pyvmm.devices.rtc import (A_UIP, B_24H, B_AIE, B_DM, B_SET, B_UIE, C_AF, C_IRQF, C_UF,
                               Rtc, pc_cmos_bytes)
from pyvmm.platform import PcPlatform

T0 = calendar.timegm((2026, 12, 2, 13, 59, 58, 0, 0, 0)) + 0.5   # a Wednesday


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def rtc():
    clock = Clock()
    irqs = []
    dev = Rtc(set_irq=lambda line, level: irqs.append((line, level)), now=clock)
    yield dev, clock, irqs
    dev.close()


def rd(dev: Rtc, index: int) -> int:
    dev.write(0, bytes([index]))
    return dev.read(1, 1)[0]


def wr(dev: Rtc, index: int, value: int) -> None:
    dev.write(0, bytes([index]))
    dev.write(1, bytes([value]))


def test_time_in_bcd_24_hour(rtc):
    dev, clock, _ = rtc
    assert [rd(dev, i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [
        0x58, 0x59, 0x13, 0x04, 0x02, 0x12, 0x26, 0x20]   # day of week 4 = Wednesday
    assert rd(dev, 0x0B) == B_24H and rd(dev, 0x0D) == 0x80 and rd(dev, 0x0A) & 0x7F == 0x26
    clock.t += 2                                          # 14:00:00.5
    assert [rd(dev, i) for i in (0, 2, 4)] == [0x00, 0x00, 0x14]


def test_binary_and_12_hour_forms(rtc):
    dev, _, _ = rtc
    wr(dev, 0x0B, B_DM)                                   # binary, 12-hour
    assert rd(dev, 0) == 58 and rd(dev, 4) == 0x80 | 1    # 1 PM
    wr(dev, 0x0B, 0)                                      # BCD, 12-hour
    assert rd(dev, 4) == 0x81


def test_set_freezes_and_the_written_time_runs_on(rtc):
    dev, clock, _ = rtc
    wr(dev, 0x0B, B_SET | B_24H)
    for index, value in ((0, 0x30), (2, 0x15), (4, 0x09), (7, 0x01), (8, 0x01), (9, 0x99),
                         (0x32, 0x19)):
        wr(dev, index, value)
    clock.t += 5                                          # frozen while SET is on
    assert rd(dev, 0) == 0x30 and rd(dev, 0x0A) & A_UIP == 0
    wr(dev, 0x0B, B_24H)
    clock.t += 3
    assert [rd(dev, i) for i in (0, 2, 4, 7, 8, 9, 0x32)] == [
        0x33, 0x15, 0x09, 0x01, 0x01, 0x99, 0x19]


def test_a_write_to_a_running_clock_moves_it(rtc):
    dev, clock, _ = rtc
    wr(dev, 2, 0x10)                                      # minutes = 10
    assert rd(dev, 2) == 0x10 and rd(dev, 4) == 0x13
    wr(dev, 8, 0x13)                                      # month 13: nonsense, kept as was
    assert rd(dev, 8) == 0x12


def test_uip_brackets_each_update(rtc):
    dev, clock, _ = rtc
    clock.t = T0 - 0.5 + 0.5                              # mid-second
    assert not rd(dev, 0x0A) & A_UIP
    clock.t = T0 - 0.5 + 1 - 100e-6                       # 100 us before the update
    assert rd(dev, 0x0A) & A_UIP
    clock.t = T0 - 0.5 + 1 + 1e-3                         # during the update
    assert rd(dev, 0x0A) & A_UIP
    clock.t = T0 - 0.5 + 1 + 3e-3                         # after it
    assert not rd(dev, 0x0A) & A_UIP
    wr(dev, 0x0A, 0xA6)                                   # UIP is read-only
    assert rd(dev, 0x0A) == 0x26


def test_register_c_flags_irqf_and_the_irq_line(rtc):
    dev, clock, irqs = rtc
    rd(dev, 0x0C)
    clock.t += 1
    assert rd(dev, 0x0C) & (C_UF | C_IRQF) == C_UF        # flagged, not enabled: no IRQF
    assert irqs == []
    wr(dev, 0x0B, B_24H | B_UIE)
    clock.t += 1
    rd(dev, 0)                                            # any access catches up... not IRQ
    c = rd(dev, 0x0C)
    assert c & (C_UF | C_IRQF) == C_UF | C_IRQF and c & C_AF == 0
    assert irqs == [(8, 1), (8, 0)]                       # raised, lowered by reading C
    assert rd(dev, 0x0C) == 0


def test_alarm_with_dont_care_fields(rtc):
    dev, clock, _ = rtc
    for index in (1, 3, 5):
        wr(dev, index, 0xC0)
    wr(dev, 0x0B, B_24H | B_AIE)
    rd(dev, 0x0C)
    clock.t += 1
    assert rd(dev, 0x0C) & (C_AF | C_IRQF) == C_AF | C_IRQF
    wr(dev, 1, 0x30)                                      # at second 30 only
    clock.t += 1                                          # 14:00:00
    assert not rd(dev, 0x0C) & C_AF
    clock.t += 30
    assert rd(dev, 0x0C) & C_AF


def test_interrupt_timer_raises_irq_8_in_real_time():
    irqs = []
    dev = Rtc(set_irq=lambda line, level: irqs.append((line, level)))
    try:
        wr(dev, 0x0B, B_24H | B_UIE)
        deadline = time.monotonic() + 5
        while not irqs and time.monotonic() < deadline:
            time.sleep(0.01)
        assert irqs[:1] == [(8, 1)]
    finally:
        dev.close()


def test_cmos_bytes_and_index_port():
    dev = Rtc()
    wr(dev, 0x40, 0x5A)
    assert rd(dev, 0x40) == 0x5A
    dev.write(0, b"\x8f")                                 # NMI mask bit + index 0x0f
    assert dev.index == 0x0F and dev.nmi_masked
    assert dev.read(0, 1) == b"\xff" and dev.read(1, 2) == b"\xff\xff"
    wr(dev, 0x0D, 0)                                      # read-only
    assert rd(dev, 0x0D) == 0x80
    cmos = pc_cmos_bytes(128 << 20, 4)
    assert (cmos[0x15], cmos[0x16]) == (0x80, 0x02)        # 640 KiB
    assert cmos[0x17] | cmos[0x18] << 8 == 0xFFFF          # KiB above 1 MiB, capped
    assert cmos[0x34] | cmos[0x35] << 8 == (112 << 20) // 65536
    assert cmos[0x5F] == 3 and cmos[0x5B] == cmos[0x5C] == cmos[0x5D] == 0
    high = pc_cmos_bytes(5 << 30, 1, below_4g=3 << 30)
    assert high[0x5B] | high[0x5C] << 8 | high[0x5D] << 16 == (2 << 30) // 65536


def test_guest_reads_the_clock_and_takes_the_update_interrupt(kvm):
    before = time.time()
    with PcPlatform.create(vcpus=2, memory_size=64 << 20, kvm=kvm) as pc:
        pc.machine.load("pc_rtc")
        result = pc.run(timeout=30)
    after = time.time()
    assert result.stop == "done" and result.status == 1, result.summary()
    got = {r.tag: r.value64 for r in result.reports}
    assert got[1] == B_24H and got[2] == 0x80

    def unbcd(v: int) -> int:
        return (v >> 4) * 10 + (v & 0xF)
    guest = calendar.timegm((unbcd(got[9]) * 100 + unbcd(got[8]), unbcd(got[7]),
                             unbcd(got[6]), unbcd(got[5]), unbcd(got[4]), unbcd(got[3]),
                             0, 0, 0))
    assert int(before) - 1 <= guest <= after + 1            # the host's UTC time
    assert got[10] == 1                                      # an update cycle was seen
    assert got[11] == (48 << 20) // 65536 and got[12] == 1
    assert got[13] == 1                                      # IRQ 8 reached the LAPIC
    assert got[14] & (C_IRQF | C_UF) == C_IRQF | C_UF


def test_a_timer_outliving_its_vm_stops_quietly():
    calls = []

    def gone(line, level):
        calls.append(level)
        raise OSError(9, "the VM is closed")

    dev = Rtc(set_irq=gone)
    try:
        wr(dev, 0x0B, B_24H | B_UIE)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert calls == [1] and not dev.timer_running
    finally:
        dev.close()
