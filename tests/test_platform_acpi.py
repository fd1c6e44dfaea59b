# SPDX-License-Identifier: GPL-2.0-or-later
"""ACPI: the tables (found the way kvm-unit-tests finds them, checksums, layouts), the PM
registers (timer, PM1 status/control, sleep states), and a guest that finds the FADT, reads
the PM timer and powers the machine off."""

from __future__ import annotations

import struct

import pytest

from pyvmm.devices import acpi
from pyvmm.devices.acpi_pm import (PM_TIMER_HZ, SCI_EN, TMR_STS, WAK_STS, AcpiPm)
from pyvmm.platform import PcPlatform


class Mem:
    """Guest memory as a bytearray at address 0 (enough for the BIOS area)."""

    def __init__(self) -> None:
        self.data = bytearray(0x100000)

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa: gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.data[gpa: gpa + n])


def find_rsdp(mem) -> int | None:
    for addr in range(0xE0000, 0x100000, 16):
        if mem.read(addr, 8) == b"RSD PTR ":
            return addr
    return None


def table_at(mem, addr: int) -> bytes:
    length = struct.unpack("<I", mem.read(addr + 4, 4))[0]
    return mem.read(addr, length)


def find_table(mem, sig: bytes, *, xsdt: bool) -> int | None:
    rsdp = find_rsdp(mem)
    root = struct.unpack("<Q" if xsdt else "<I",
                         mem.read(rsdp + (24 if xsdt else 16), 8 if xsdt else 4))[0]
    raw = table_at(mem, root)
    size = 8 if xsdt else 4
    for off in range(36, len(raw), size):
        ptr = int.from_bytes(raw[off: off + size], "little")
        if mem.read(ptr, 4) == sig:
            return ptr
    return None


@pytest.fixture
def installed():
    mem = Mem()
    tables = acpi.install(mem, 3)
    return mem, tables


def test_rsdp_is_found_and_both_checksums_hold(installed):
    mem, tables = installed
    rsdp = find_rsdp(mem)
    assert rsdp == tables.rsdp_address and rsdp % 16 == 0
    raw = mem.read(rsdp, 36)
    assert sum(raw[:20]) % 256 == 0 and sum(raw) % 256 == 0
    assert raw[15] == 2 and struct.unpack("<I", raw[20:24])[0] == 36   # revision, length


@pytest.mark.parametrize("xsdt", [False, True])
def test_rsdt_and_xsdt_lead_to_the_same_tables(installed, xsdt):
    mem, tables = installed
    for sig in (b"FACP", b"APIC"):
        assert find_table(mem, sig, xsdt=xsdt) == tables.addresses[sig.decode()]
    assert find_table(mem, b"HPET", xsdt=xsdt) is None


def test_every_table_sums_to_zero(installed):
    mem, tables = installed
    for sig in ("RSDT", "XSDT", "FACP", "APIC", "DSDT"):
        raw = table_at(mem, tables.addresses[sig])
        assert raw[:4] == sig.encode() and sum(raw) % 256 == 0, sig


def test_fadt_fields(installed):
    mem, tables = installed
    raw = table_at(mem, tables.addresses["FACP"])
    assert len(raw) == 244 and raw[8] == 3
    facs, dsdt = struct.unpack_from("<II", raw, 36)
    assert facs == tables.addresses["FACS"] and facs % 64 == 0
    assert dsdt == tables.addresses["DSDT"]
    assert struct.unpack_from("<H", raw, 46)[0] == 9                    # SCI
    assert struct.unpack_from("<I", raw, 48)[0] == 0                    # no SMI_CMD
    evt, _, cnt, _, _, tmr = struct.unpack_from("<6I", raw, 56)
    assert (evt, cnt, tmr) == (0x600, 0x604, 0x608)
    assert tuple(raw[88:92]) == (4, 2, 0, 4)
    assert raw[108] == 0x32                                             # century in CMOS
    assert raw[116] == 1 and struct.unpack_from("<Q", raw, 120)[0] == 0xCF9  # reset reg
    assert raw[128] == 6
    assert struct.unpack_from("<QQ", raw, 132) == (facs, dsdt)
    assert raw[208] == 1 and struct.unpack_from("<Q", raw, 212)[0] == 0x608  # X_PM_TMR
    facs_raw = mem.read(facs, 64)
    assert facs_raw[:4] == b"FACS" and struct.unpack_from("<I", facs_raw, 4)[0] == 64


def test_madt_has_a_lapic_per_cpu_and_the_ioapic(installed):
    mem, tables = installed
    raw = table_at(mem, tables.addresses["APIC"])
    assert struct.unpack_from("<II", raw, 36) == (0xFEE00000, 1)
    entries, off = [], 44
    while off < len(raw):
        kind, length = raw[off], raw[off + 1]
        entries.append((kind, bytes(raw[off: off + length])))
        off += length
    assert off == len(raw)
    lapics = [e for k, e in entries if k == 0]
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == [
        (0, 0, 1), (1, 1, 1), (2, 2, 1)]
    (ioapic,) = [e for k, e in entries if k == 1]
    assert struct.unpack_from("<BxII", ioapic, 2) == (3, 0xFEC00000, 0)
    (override,) = [e for k, e in entries if k == 2]
    assert struct.unpack_from("<BBIH", override, 2) == (0, 9, 9, 0x000D)


def test_dsdt_defines_the_sleep_packages(installed):
    mem, tables = installed
    aml = table_at(mem, tables.addresses["DSDT"])[36:]
    assert aml == (b"\x08_S3_\x12\x06\x04\x01\x01\x00\x00"
                   b"\x08_S5_\x12\x06\x04\x00\x00\x00\x00")


def test_bad_layouts_are_refused():
    for base in (0xE0008, 0xD0000, 0x100000):
        with pytest.raises(ValueError):
            acpi.build_tables(1, base=base)
    with pytest.raises(ValueError):
        acpi.build_tables(1, base=0xFFF00)          # does not fit below 1 MiB
    for cpus in (0, 256):
        with pytest.raises(ValueError):
            acpi.madt(cpus)


def test_pm_timer_runs_at_its_rate_and_wraps_at_24_bits():
    now = [100.0]
    pm = AcpiPm(clock=lambda: now[0])
    assert int.from_bytes(pm.read(8, 4), "little") == 0
    now[0] += 1.0
    assert int.from_bytes(pm.read(8, 4), "little") == PM_TIMER_HZ
    now[0] += (1 << 24) / PM_TIMER_HZ                 # one full turn later: the same value
    assert int.from_bytes(pm.read(8, 4), "little") in (PM_TIMER_HZ, PM_TIMER_HZ - 1)
    assert pm.read(8, 2) == (pm.timer() & 0xFFFF).to_bytes(2, "little")
    assert pm.read(8, 4)[3] == 0                     # 24 bits


def test_pm1_status_enable_and_control():
    now = [0.0]
    sleeps = []
    pm = AcpiPm(clock=lambda: now[0], on_poweroff=lambda: sleeps.append("S5"),
                on_suspend=lambda: sleeps.append("S3"))
    now[0] += (1 << 23) / PM_TIMER_HZ + 0.01          # bit 23 flipped: TMR_STS
    assert int.from_bytes(pm.read(0, 2), "little") & TMR_STS
    pm.write(0, TMR_STS.to_bytes(2, "little"))        # write 1 to clear
    assert not int.from_bytes(pm.read(0, 2), "little") & TMR_STS
    pm.write(2, b"\x01\x01")
    assert pm.read(2, 2) == b"\x01\x01"
    assert int.from_bytes(pm.read(4, 2), "little") == SCI_EN       # always in ACPI mode
    pm.write(4, (5 << 10).to_bytes(2, "little"))                    # SLP_TYP without SLP_EN
    assert sleeps == [] and int.from_bytes(pm.read(4, 2), "little") == SCI_EN | 5 << 10
    pm.write(4, (1 << 10 | 1 << 13).to_bytes(2, "little"))          # S3
    pm.write(4, (1 << 13).to_bytes(2, "little"))                    # S5
    pm.write(4, (5 << 10 | 1 << 13).to_bytes(2, "little"))          # another type: nothing
    assert sleeps == ["S3", "S5"] and pm.sleeps == [1, 0, 5]
    assert not int.from_bytes(pm.read(4, 2), "little") & (1 << 13)  # SLP_EN is write-only
    pm.wake()
    assert int.from_bytes(pm.read(0, 2), "little") & WAK_STS
    assert pm.read(10, 4) == b"\xff" * 4 and pm.read(1, 1) == b"\xff"
    pm.write(6, b"\x01\x02")                                          # nothing there


def test_guest_finds_the_fadt_reads_the_pm_timer_and_powers_off(kvm):
    with PcPlatform.create(vcpus=2, memory_size=16 << 20, kvm=kvm) as pc:
        pc.machine.load("pc_acpi")
        result = pc.run(timeout=30)
        addresses = pc.acpi.addresses
        assert pc.power_event == "poweroff" and pc.pm.sleeps == [0]
    assert result.stop == "done" and result.status == 0, result.summary()
    got = {r.tag: r.value64 for r in result.reports}
    assert got[1] == addresses["RSD PTR "] and got[2] == addresses["RSDT"]
    assert got[3] == addresses["FACP"] and got[4] == 0x608 and got[6] == 0x604
    assert 0 < got[5] < PM_TIMER_HZ                  # the timer moved, by less than a second


def test_guest_suspends_to_ram_and_resumes_at_its_waking_vector_on_the_rtc_alarm(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        pc.machine.load("pc_s3", regs={"rdi": 0})
        result = pc.run(timeout=30)
        assert pc.power_event == "resume" and pc.pm.sleeps == [1]
        assert int.from_bytes(pc.pm.read(0, 2), "little") & WAK_STS
    # the real-mode resume code reported the dword at 0 through debug-exit: (0x2a << 1) | 1
    assert result.stop == "done" and result.status == 0x55, result.summary()
    assert result.duration < 30


def test_without_an_alarm_a_suspended_guest_stays_asleep(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        pc.machine.load("pc_s3", regs={"rdi": 1})
        result = pc.run(timeout=30)
        assert pc.power_event == "suspend"
    assert result.stop == "stopped" and result.status is None, result.summary()
