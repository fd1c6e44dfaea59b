"""PIO/MMIO buses and the serial console, driven by real guest exits."""

from __future__ import annotations

import pytest

from pyvmm import GuestError, Machine
from pyvmm.devices import Counter, Memory, MmioBus, PioBus, SerialConsole


def test_overlapping_devices_are_rejected():
    bus = PioBus()
    bus.register(0x100, 8, Counter())
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0x104, 2, Counter())
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0xF0, 0x11, Counter())
    bus.register(0x108, 1, Counter())  # adjacent is fine
    with pytest.raises(ValueError, match="outside the bus"):
        bus.register(0xFFFF, 2, Counter())
    with pytest.raises(ValueError, match="positive"):
        bus.register(0x200, 0, Counter())
    with pytest.raises(TypeError):
        bus.register(0x300, 1, object())


def test_unclaimed_policy_reads_all_ones_and_counts():
    bus = MmioBus()
    assert bus.read(0x1000, 4) == b"\xff" * 4
    bus.write(0x1000, b"\x01")
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (1, 1)


def test_routing_by_offset_and_unregister():
    bus = MmioBus()
    ram = Memory(0x100)
    bus.register(0xD000_0000, 0x100, ram)
    bus.write(0xD000_0010, b"\xaa\xbb")
    assert ram.data[0x10:0x12] == b"\xaa\xbb"
    assert bus.read(0xD000_0011, 1) == b"\xbb"
    # An access straddling the end of the device is unclaimed, not truncated.
    assert bus.read(0xD000_00FF, 2) == b"\xff\xff"
    bus.unregister(ram)
    assert bus.read(0xD000_0010, 1) == b"\xff"
    with pytest.raises(ValueError):
        bus.unregister(ram)


def test_guest_error_is_answered_not_raised():
    class Strict:
        def read(self, offset, size):
            raise GuestError(f"no register at {offset}")

        def write(self, offset, data):
            raise GuestError("read-only device")

    bus = PioBus()
    bus.register(0x10, 4, Strict())
    assert bus.read(0x10, 1) == b"\xff"
    bus.write(0x11, b"\x00")
    assert len(bus.guest_errors) == 2


def test_pio_payload_through_the_bus(kvm):
    """The pio payload's OUTs land in a device and its INs read values the device chose."""
    class Echo:
        def __init__(self):
            self.writes = []

        def write(self, offset, data):
            self.writes.append((offset, bytes(data)))

        def read(self, offset, size):
            return bytes((0x40 + offset + i) & 0xFF for i in range(size))

    with Machine(kvm=kvm) as m:
        echo = Echo()
        payload = m.load("pio")
        base = payload.symbol("PIO_PORT")
        m.pio.register(base, 4, echo)
        result = m.run(timeout=10)
        assert result.ok, result
        assert echo.writes[:3] == [(0, b"\x11"), (0, b"\x33\x22"), (0, b"\x77\x66\x55\x44")]
        assert b"".join(d for off, d in echo.writes[3:] if off == 1) == b"pyvmm"
        by_tag = {r.tag: r.value64 for r in result.reports}
        assert by_tag[1] == 0x40 and by_tag[2] == 0x4140 and by_tag[4] == 0x43424140
        assert by_tag[6] == 0x434243424342  # rep insw: three words read at offset 2


def test_serial_console_collects_guest_output(kvm, tmp_path):
    src = tmp_path / "serial.S"
    src.write_text("""
# pyvmm: mode=real16 load=0x1000 entry=start
.include "pyvmm.inc"
    .code16
    .globl start
start:
    movw $0x3fd, %dx          # LSR: wait for THR empty, as a real driver does
1:  inb %dx, %al
    testb $0x20, %al
    jz 1b
    movw $0x3f8, %dx
    movw $msg, %si
2:  movb (%si), %al
    testb %al, %al
    jz 3f
    outb %al, %dx
    incw %si
    jmp 2b
3:  DONE
msg: .asciz "serial ok\\n"
""")
    with Machine(kvm=kvm) as m:
        m.load(str(src))
        result = m.run(timeout=10)
        assert result.ok, result
        assert m.serial.text == "serial ok\n"
        assert result.console == "serial ok\n"


def test_serial_registers():
    uart = SerialConsole()
    assert uart.read(5, 1)[0] & 0x20  # THR empty
    uart.write(3, b"\x80")              # DLAB on: divisor latch
    uart.write(0, b"\x01")
    assert uart.read(0, 1) == b"\x01"
    uart.write(3, b"\x03")              # DLAB off
    uart.write(0, b"A")
    uart.write(7, b"\x5a")
    assert uart.read(7, 1) == b"\x5a"
    assert uart.output == b"A"


def test_dispatch_while_devices_come_and_go():
    """Registration from another thread never makes dispatch see half an update: every
    write to the device that stays mapped arrives, at its own offset."""
    import threading
    import time

    bus = PioBus()
    steady, churner = Counter(), Memory(8)
    bus.register(0x30, 8, steady)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            bus.register(0x10, 8, churner)
            bus.unregister(churner)

    thread = threading.Thread(target=churn)
    thread.start()
    writes = 0
    deadline = time.monotonic() + 0.5
    try:
        while time.monotonic() < deadline:
            bus.write(0x30, b"x")
            bus.write(0x12, b"y")   # to the churning device, or unclaimed: never elsewhere
            writes += 1
    finally:
        stop.set()
        thread.join()
    assert steady.count == writes


def test_serial_keeps_a_bounded_tail_of_a_guest_that_prints_forever(kvm, tmp_path):
    """Issue 13.7: the UART kept a second copy of all output for the machine's life. Now it
    keeps the last `keep` bytes, counts what it dropped, and its sink still sees all."""
    src = tmp_path / "serial_flood.S"
    src.write_text("""
# pyvmm: mode=real16 load=0x1000 entry=start
.include "pyvmm.inc"
    .code16
    .globl start
start:
    movw $0x3f8, %dx
    movw $3000, %cx
1:  movb %cl, %al
    andb $0x0f, %al
    addb $0x41, %al          # 'A' + (count & 15)
    outb %al, %dx
    loop 1b
    DONE
""")
    seen = bytearray()
    with Machine(kvm=kvm) as m:
        m.serial.keep = 100
        m.serial.sink = seen.extend
        m.load(str(src))
        result = m.run(timeout=30)
        assert result.ok, result
        assert len(seen) == 3000
        assert m.serial.output == bytes(seen[-100:])
        assert m.serial.dropped == 2900


def test_serial_keep_is_checked_and_zero_keeps_nothing():
    got = []
    uart = SerialConsole(sink=got.append, keep=0)
    uart.write(0, b"A")
    assert uart.output == b"" and uart.dropped == 1 and got == [b"A"]
    for bad in (-1, True, "10"):
        with pytest.raises((ValueError, TypeError)):
            SerialConsole(keep=bad)


def test_lookup_by_index_and_by_bisect_agree():
    """Short mappings are found through the address index, long ones by bisect; both refuse
    an access that runs past the end, and re-registration republishes the index."""
    from pyvmm.devices.bus import INDEXED_LENGTH, Memory, MmioBus

    bus = MmioBus()
    small, big = Memory(8), Memory(INDEXED_LENGTH * 4)
    bus.register(0x1000, 8, small)
    bus.register(0x100000, INDEXED_LENGTH * 4, big)
    assert bus.find(0x1000).device is small and bus.find(0x1007).device is small
    assert bus.find(0x1007, 2) is None and bus.find(0x1008) is None and bus.find(0xFFF) is None
    assert bus.find(0x100000 + INDEXED_LENGTH * 2, 4).device is big
    assert bus.find(0x100000 + INDEXED_LENGTH * 4 - 2, 4) is None
    bus.write(0x1006, b"\x01\x02")
    bus.write(0x1007, b"\x01\x02")          # past the end: unclaimed, not truncated
    assert small.data[6:8] == b"\x01\x02" and bus.unclaimed_writes == 1
    bus.write(0x100010, b"\xaa")
    assert big.data[0x10] == 0xAA
    bus.unregister(small)
    assert bus.find(0x1000) is None
    bus.write(0x1000, b"\x00")
    assert bus.unclaimed_writes == 2
