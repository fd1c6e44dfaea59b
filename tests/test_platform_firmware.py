# SPDX-License-Identifier: GPL-2.0-or-later
"""The BIOS state the platform recreates: the real-mode IVT and BDA, and the init stub that
programs the in-kernel 8259s and PIT and hands over to the kernel with EAX/EBX intact."""

from __future__ import annotations

import struct

import pytest

from pyvmm.devices import firmware
from pyvmm.platform import PcPlatform


def test_ivt_points_every_vector_at_a_handler():
    table = firmware.ivt()
    assert len(table) == 1024
    entries = [struct.unpack_from("<HH", table, 4 * v) for v in range(256)]
    assert {seg for _, seg in entries} == {0xF000}
    code = firmware.handler_code()
    for vector, (off, seg) in enumerate(entries):
        linear = (seg << 4) + off - firmware.HANDLERS
        handler = code[linear:]
        if 0x08 <= vector <= 0x0F:
            assert handler.startswith(bytes([0x50, 0xB0, 0x20, 0xE6, 0x20])), vector
        elif 0x70 <= vector <= 0x77:
            assert handler.startswith(bytes([0x50, 0xB0, 0x20, 0xE6, 0xA0])), vector
        else:
            assert handler[0] == 0xCF, vector         # iret


def test_init_stub_ends_with_a_jump_to_the_entry():
    stub = firmware.init_stub(0x00400123)
    assert stub[:2] == bytes([0x89, 0xC2])             # mov edx, eax (kept for the kernel)
    assert stub[-7:] == bytes([0xB9]) + struct.pack("<I", 0x00400123) + bytes([0xFF, 0xE1])
    with pytest.raises(ValueError):
        firmware.init_stub(1 << 32)


def test_bda():
    bda = firmware.bios_data_area()
    assert struct.unpack_from("<H", bda, 0)[0] == 0x3F8
    assert struct.unpack_from("<H", bda, 0x13)[0] == 639
    assert struct.unpack_from("<H", bda, 0x0E)[0] == firmware.EBDA_SEGMENT


def test_guest_entered_through_the_stub_sees_the_bios_state(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        payload = pc.machine.load("pc_firmware", regs={"rax": 0x2BADB002, "rbx": 0x9000,
                                                       "rdi": 20_000_000})
        vcpu = pc.machine.vcpus[0]
        regs = vcpu.get_regs()
        regs.rip = pc.firmware_entry(payload.entry)
        vcpu.set_regs(regs)
        result = pc.run(timeout=30)
    assert result.ok, result.summary()
    got = {r.tag: r.value64 & 0xFFFFFFFF for r in result.reports}
    assert got == {1: 0x2BADB002, 2: 0x9000, 3: 0xFA, 4: 0xFF,
                   5: 1,                               # the PIT ticks into the 8259
                   6: 0xF0000010, 7: 0x3F8}


def test_the_first_run_goes_through_the_stub_by_itself(kvm):
    # A loader that only sets the handover state up (32-bit flat, EAX/EBX) gets the BIOS
    # state too: run() routes the boot vCPU through the stub once.
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        pc.machine.load("pc_firmware", regs={"rax": 0x2BADB002, "rbx": 0x9000,
                                             "rdi": 20_000_000})
        result = pc.run(timeout=30)
    assert result.ok, result.summary()
    got = {r.tag: r.value64 & 0xFFFFFFFF for r in result.reports}
    assert (got[1], got[2], got[3], got[5]) == (0x2BADB002, 0x9000, 0xFA, 1)


def test_bios_false_leaves_the_pic_and_pit_alone(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm, bios=False) as pc:
        pc.machine.load("pc_firmware", regs={"rax": 1, "rbx": 2, "rdi": 3000})
        result = pc.run(timeout=30)
    assert result.ok, result.summary()
    got = {r.tag: r.value64 & 0xFFFFFFFF for r in result.reports}
    assert got[3] != 0xFA and got[5] == 0     # unprogrammed: no BIOS mask, no timer tick
