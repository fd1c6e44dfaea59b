# SPDX-License-Identifier: GPL-2.0-or-later
"""fw_cfg over its legacy ports: register semantics through read()/write(), and a guest that
reads the platform's items the way kvm-unit-tests' lib/x86/fwcfg.c does."""

from __future__ import annotations

import struct

import pytest

from pyvmm.devices import fw_cfg as fc
from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.platform import PcPlatform


def select(dev: FwCfg, key: int, offset: int = 0) -> None:
    dev.write(offset, key.to_bytes(2, "little"))


def data(dev: FwCfg, n: int, offset: int = 1) -> bytes:
    return b"".join(dev.read(offset, 1) for _ in range(n))


def test_signature_id_and_machine_items():
    dev = FwCfg(cpus=4, ram_size=256 << 20)
    select(dev, fc.SIGNATURE)
    assert data(dev, 4) == b"QEMU"
    select(dev, fc.ID)
    assert int.from_bytes(data(dev, 4), "little") == fc.ID_TRADITIONAL  # no DMA interface
    select(dev, fc.NB_CPUS)
    assert data(dev, 2) == (4).to_bytes(2, "little")
    select(dev, fc.MAX_CPUS)
    assert data(dev, 2) == (4).to_bytes(2, "little")
    select(dev, fc.RAM_SIZE)
    assert int.from_bytes(data(dev, 8), "little") == 256 << 20
    select(dev, fc.MAX_RAM)
    assert data(dev, 8) == bytes(8)     # no limit: kvm-unit-tests treats 0 as "none"


def test_selecting_rewinds_and_reads_past_the_end_are_zero():
    dev = FwCfg()
    select(dev, fc.SIGNATURE)
    assert data(dev, 2) == b"QE"
    assert data(dev, 6) == b"MU\0\0\0\0"
    select(dev, fc.SIGNATURE)          # a new selection starts at offset 0 again
    assert data(dev, 1) == b"Q"


def test_either_port_reads_data_and_only_16_bit_writes_select():
    dev = FwCfg(cpus=2)
    select(dev, fc.SIGNATURE, offset=1)  # a 16-bit OUT to 0x511 selects too
    assert dev.read(0, 1) == b"Q"        # an 8-bit IN from 0x510 reads data too
    dev.write(0, b"\x05")                # an 8-bit OUT is a data write: no new selection
    assert dev.selected == fc.SIGNATURE
    assert data(dev, 1) == b"E"
    dev.write(0, b"\x05\x00\x00\x00")    # 32 bits: not accepted, dropped
    assert dev.selected == fc.SIGNATURE
    assert dev.read(1, 2) == b"\xff\xff" and dev.read(0, 4) == b"\xff" * 4
    assert data(dev, 1) == b"M"          # a refused wide read does not advance the offset


def test_unknown_keys_and_the_write_channel_bit():
    dev = FwCfg(cpus=3)
    for key in (0x1234, 0x3FFF, 0x8000, 0xFFFF, 0x7):
        select(dev, key)
        assert data(dev, 4) == bytes(4), hex(key)
    select(dev, fc.WRITE_CHANNEL | fc.NB_CPUS)   # bit 14 asks for writing: still readable
    assert dev.selected == fc.NB_CPUS
    assert data(dev, 2) == b"\x03\x00"
    dev.write(1, b"\x09")                         # and data writes change nothing
    select(dev, fc.NB_CPUS)
    assert data(dev, 2) == b"\x03\x00"


def test_arch_local_items_are_their_own_keys():
    dev = FwCfg()
    dev.add_u32(fc.ARCH_LOCAL | 2, 1)      # x86's IRQ0 override item
    select(dev, fc.ARCH_LOCAL | 2)
    assert data(dev, 4) == b"\x01\0\0\0"
    select(dev, 2)
    assert data(dev, 4) == bytes(4)


def test_file_directory_is_big_endian_and_lists_files_in_key_order():
    dev = FwCfg()
    select(dev, fc.FILE_DIR)
    assert data(dev, 4) == bytes(4)       # no files yet
    k1 = dev.add_file("etc/acpi/rsdp", b"x" * 20)
    k2 = dev.add_file("opt/pyvmm/hello", b"hi")
    assert (k1, k2) == (fc.FILE_FIRST, fc.FILE_FIRST + 1)
    select(dev, fc.FILE_DIR)
    raw = data(dev, 4 + 2 * 64)
    assert struct.unpack(">I", raw[:4]) == (2,)
    entries = [struct.unpack(">IHH56s", raw[4 + 64 * i: 4 + 64 * (i + 1)]) for i in range(2)]
    assert [(s, k, r, n.rstrip(b"\0")) for s, k, r, n in entries] == [
        (20, k1, 0, b"etc/acpi/rsdp"), (2, k2, 0, b"opt/pyvmm/hello")]
    select(dev, k2)
    assert data(dev, 3) == b"hi\0"


@pytest.mark.parametrize("name", ["", "x" * 56, "a\0b"])
def test_bad_file_names_are_refused(name):
    with pytest.raises(ValueError):
        FwCfg().add_file(name, b"")


def test_bad_construction_and_items_are_refused():
    dev = FwCfg()
    dev.add_file("a", b"")
    with pytest.raises(ValueError, match="already"):
        dev.add_file("a", b"")
    for kwargs in ({"cpus": 0}, {"cpus": 1 << 16}, {"cpus": 4, "max_cpus": 2},
                   {"ram_size": -1}, {"ram_size": 1 << 64}):
        with pytest.raises(ValueError):
            FwCfg(**kwargs)
    for key in (-1, 0x10000, 0x4001, 0x3FFF):
        with pytest.raises(ValueError):
            dev.add_item(key, b"")
    with pytest.raises(ValueError):
        dev.add_u16(1, 1 << 16)


def test_guest_reads_items_through_the_ports(kvm):
    with PcPlatform.create(vcpus=3, memory_size=64 << 20, kvm=kvm) as pc:
        pc.fw_cfg.add_file("opt/pyvmm/a", b"")
        pc.machine.load("pc_fwcfg", regs={"rdi": 0})
        result = pc.run(timeout=30)
    assert result.stop == "done", result.summary()
    got = {r.tag: r.value64 for r in result.reports}
    assert got == {
        1: int.from_bytes(b"QEMU", "little"),
        2: 3,
        3: 64 << 20,
        4: 1 << 24,          # the big-endian count 1, read as little-endian bytes
        5: 0,
        6: 3,
        7: 3,                # the 2-byte item, then zeros
    }
    assert pc.exit_status == 1
