"""The PIO bus's single-access IN path (the exit vmexit's inl_from_qemu measures): the indexed
fast step answers like the general read(), errors included."""

import pytest

from pyvmm.devices.bus import Memory, PioBus
from pyvmm.errors import GuestError
from pyvmm.exits import IoExit


def _in(bus: PioBus, port: int, size: int) -> bytes:
    buf = memoryview(bytearray(b"\x00" * size))
    bus.handle_io(IoExit(port, size, 1, False, buf))
    return bytes(buf)


class _Raises:
    def read(self, offset: int, size: int) -> bytes:
        raise GuestError(f"bad read at {offset}")

    def write(self, offset: int, data: bytes) -> None:
        pass


class _Short:
    def read(self, offset: int, size: int) -> bytes:
        return b"\x01"

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_in_reads_the_device_at_its_offset() -> None:
    bus = PioBus()
    mem = Memory(8)
    mem.data[:] = bytes(range(8))
    bus.register(0x1230, 8, mem)
    assert _in(bus, 0x1234, 4) == bytes([4, 5, 6, 7])
    assert _in(bus, 0x1230, 1) == b"\x00"
    assert bus.unclaimed_reads == 0


def test_in_past_the_device_end_is_unclaimed_all_ones() -> None:
    bus = PioBus()
    bus.register(0x1230, 4, Memory(4))
    assert _in(bus, 0x1232, 4) == b"\xff" * 4    # straddles the end: not the device's
    assert _in(bus, 0x2000, 2) == b"\xff" * 2
    assert bus.unclaimed_reads == 2


def test_in_guest_error_answers_all_ones_and_is_counted() -> None:
    bus = PioBus()
    bus.register(0x60, 1, _Raises())
    assert _in(bus, 0x60, 1) == b"\xff"
    assert bus.guest_error_count == 1
    assert "bad read" in str(bus.guest_errors[0])


def test_in_wrong_length_from_a_device_is_a_clear_error() -> None:
    bus = PioBus()
    bus.register(0x70, 4, _Short())
    with pytest.raises(ValueError, match=r"_Short.read returned 1 bytes for a 4-byte access"):
        _in(bus, 0x70, 4)
