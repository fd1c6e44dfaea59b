# SPDX-License-Identifier: GPL-2.0-or-later
"""isa-debug-exit: the status arithmetic, the device's writes, and a guest that ends its run
through port 0xf4 with the status QEMU would exit with."""

from __future__ import annotations

import pytest

from pyvmm.devices.debug_exit import DebugExit, exit_status, guest_code
from pyvmm.platform import PcPlatform


def test_status_is_value_shifted_with_the_low_bit_set():
    assert [exit_status(v) for v in (0, 1, 2, 0x7F, 0xFFFFFFFF)] == [
        1, 3, 5, 0xFF, 0x1FFFFFFFF]
    assert guest_code(exit_status(42)) == 42
    for bad in (0, 2, -1):
        with pytest.raises(ValueError):
            guest_code(bad)
    with pytest.raises(ValueError):
        exit_status(-1)


def test_every_width_and_offset_ends_with_its_value():
    seen = []
    dev = DebugExit(on_exit=seen.append)
    dev.write(0, b"\x00")
    dev.write(1, b"\x02\x00")
    dev.write(0, (0x12345678).to_bytes(4, "little"))
    assert seen == [1, 5, (0x12345678 << 1) | 1]
    assert dev.status == seen[-1] and dev.writes == 3
    assert dev.read(0, 4) == b"\xff" * 4   # nothing to read: all ones, no exit
    assert dev.writes == 3


def test_without_a_callback_the_status_is_kept():
    dev = DebugExit()
    assert dev.status is None
    dev.write(0, b"\x03")
    assert dev.status == 7
    with pytest.raises(ValueError):
        DebugExit(length=0)


@pytest.mark.parametrize("code", [0, 1, 0x55])
def test_guest_write_ends_the_run_with_qemus_status(kvm, code):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        pc.machine.load("pc_fwcfg", regs={"rdi": code})
        result = pc.run(timeout=30)
    assert result.stop == "done", result.summary()
    assert result.status == (code << 1) | 1
    # the run stopped at the write: the FAIL after it never ran
    assert pc.debug_exit.writes == 1 and len(result.reports) == 7
