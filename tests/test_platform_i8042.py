# SPDX-License-Identifier: GPL-2.0-or-later
"""The reset paths of the PC: the i8042's commands and output port, port 0x92, the PCI
reset control register, each driven by a guest that resets the machine; and the i8042's
probe answers."""

from __future__ import annotations

import pytest

from pyvmm.devices.i8042 import I8042, SystemControlA
from pyvmm.platform import PcPlatform


def test_i8042_probe_answers_and_status():
    kbc = I8042()
    status = kbc.status()
    assert status & 0x02 == 0 and status & 0x04 and not status & 0x01   # IBF clear, SYS set
    kbc.command(0xAA)                                 # self test
    assert kbc.status() & 0x01 and kbc.read_data() == 0x55
    assert not kbc.status() & 0x01
    kbc.command(0x20)
    assert kbc.read_data() == 0x45
    kbc.command(0x60)
    kbc.write_data(0x47)                              # new command byte
    kbc.command(0x20)
    assert kbc.read_data() == 0x47
    kbc.write_data(0xFF)                              # keyboard reset: ACK, then passed
    assert [kbc.read_data(), kbc.read_data()] == [0xFA, 0xAA]
    assert kbc.read_data() == 0xAA                    # nothing waiting: the last byte again
    for _ in range(100):                              # a guest cannot fill the host's memory
        kbc.write_data(0xF4)
    assert len(kbc.output) <= 16


def test_i8042_reset_paths():
    resets = []
    kbc = I8042(on_reset=lambda: resets.append(1))
    kbc.command(0xD0)
    assert kbc.read_data() == 0x03                    # reset line high, A20 on
    kbc.command(0xD1)
    kbc.write_data(0x03)                              # still high: no reset
    assert resets == []
    kbc.command(0xFE)
    kbc.command(0xD1)
    kbc.write_data(0x02)                              # bit 0 low: reset
    assert resets == [1, 1] and kbc.resets == 2
    kbc.command(0xAD)                                 # disable keyboard: accepted, nothing
    assert resets == [1, 1]


def test_port_92_fast_reset_on_a_rising_bit_0():
    resets = []
    port = SystemControlA(on_reset=lambda: resets.append(1))
    assert port.read(0, 1) == b"\x02"
    port.write(0, b"\x03")
    port.write(0, b"\x03")                            # already set: no second reset
    assert resets == [1] and port.read(0, 1) == b"\x03"
    port.write(0, b"\x00")
    port.write(0, b"\x01")
    assert resets == [1, 1]


@pytest.mark.parametrize("way", [0, 1, 2, 3], ids=["i8042-cmd", "cf9", "port92", "outport"])
def test_guest_resets_the_machine(kvm, way):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        pc.machine.load("pc_reset", regs={"rdi": way})
        result = pc.run(timeout=30)
        assert pc.power_event == "reset"
    assert result.stop == "shutdown", result.summary()
