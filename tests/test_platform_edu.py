# SPDX-License-Identifier: GPL-2.0-or-later
"""edu (QEMU's educational PCI device): identity and MSI capability through config cycles,
the BAR's registers, DMA to and from a PcPlatform's guest RAM, INTx levels and MSI messages
(delivered by KVM into a vCPU's LAPIC)."""

from __future__ import annotations

import pytest

from pyvmm.devices import edu as E
from pyvmm.devices.bus import MmioBus, PioBus
from pyvmm.devices.pci import PciBus
from pyvmm.errors import GuestError
from pyvmm.platform import PcPlatform

from test_platform_pci import Cfg


@pytest.fixture
def rig():
    ram = bytearray(0x10000)
    intx, msis = [], []
    dev = E.Edu(dma_read=lambda a, n: bytes(ram[a: a + n]),
                dma_write=lambda a, d: ram.__setitem__(slice(a, a + len(d)), d),
                set_intx=intx.append, msi=lambda a, d: msis.append((a, d)))
    pio, mmio = PioBus(), MmioBus()
    bus = PciBus(pio, mmio)
    bus.attach()
    bus.add(3, 0, dev)
    return dev, mmio, Cfg(pio), ram, intx, msis


def rd(mmio, base, reg, size=4):
    return int.from_bytes(mmio.read(base + reg, size), "little")


def wr(mmio, base, reg, value, size=4):
    mmio.write(base + reg, value.to_bytes(size, "little"))


def test_identity_bar_and_msi_capability(rig):
    dev, mmio, cfg, *_ = rig
    assert cfg.read(3, 0) == 0x11E8_1234
    assert cfg.read(3, 0x08) >> 8 == E.CLASS_OTHERS and cfg.read(3, 0x08) & 0xFF == 0x10
    assert cfg.read(3, 0x3D, 1) == 1                       # INTA
    assert cfg.read(3, 0x06, 2) & E.STATUS_CAP_LIST
    cap = cfg.read(3, E.CAP_LIST, 1)
    assert cfg.read(3, cap, 1) == E.CAP_ID_MSI and cfg.read(3, cap + 1, 1) == 0
    assert cfg.read(3, cap + 2, 2) == E.MSI_64BIT          # 64-bit, one vector, disabled
    cfg.write(3, 0x10, 0xFFFFFFFF)
    assert cfg.read(3, 0x10) == (~(E.BAR_SIZE - 1)) & 0xFFFFFFFF     # 1 MiB memory BAR


def test_registers(rig):
    dev, mmio, cfg, *_ = rig
    base = dev.bar_address(0)
    assert base and mmio.find(base, 4) is not None
    assert rd(mmio, base, E.REG_ID) == 0x010000ED
    wr(mmio, base, E.REG_ALIVE, 0x12345678)
    assert rd(mmio, base, E.REG_ALIVE) == 0xEDCBA987
    wr(mmio, base, E.REG_FACTORIAL, 10)
    assert rd(mmio, base, E.REG_FACTORIAL) == 3628800
    wr(mmio, base, E.REG_FACTORIAL, 13)
    assert rd(mmio, base, E.REG_FACTORIAL) == 6227020800 & 0xFFFFFFFF
    wr(mmio, base, E.REG_DMA_SRC, 0x1122334455667788, 8)
    assert rd(mmio, base, E.REG_DMA_SRC, 8) == 0x1122334455667788
    assert rd(mmio, base, E.REG_DMA_SRC + 4) == 0x11223344
    wr(mmio, base, E.REG_DMA_SRC + 4, 0xAABBCCDD)
    assert rd(mmio, base, E.REG_DMA_SRC, 8) == 0xAABBCCDD55667788
    # 2-byte and 8-byte-below-0x80 accesses are the guest's error, answered all ones
    assert mmio.read(base + E.REG_ID, 2) == b"\xff\xff"
    assert mmio.read(base + E.REG_ALIVE - 4, 8) == b"\xff" * 8
    assert mmio.guest_error_count == 2


def test_dma_to_and_from_the_device_buffer(rig):
    dev, mmio, cfg, ram, intx, _ = rig
    base = dev.bar_address(0)
    ram[0x1000:0x1004] = (0x12345678).to_bytes(4, "little")
    for reg, value in ((E.REG_DMA_SRC, 0x1000), (E.REG_DMA_DST, E.DMA_BUFFER),
                       (E.REG_DMA_COUNT, 4)):
        wr(mmio, base, reg, value, 8)
    wr(mmio, base, E.REG_DMA_CMD, E.CMD_START)
    assert rd(mmio, base, E.REG_DMA_CMD) & E.CMD_START == 0    # done at the write
    assert dev.regs.buffer[:4] == ram[0x1000:0x1004]
    for reg, value in ((E.REG_DMA_SRC, E.DMA_BUFFER), (E.REG_DMA_DST, 0x1004)):
        wr(mmio, base, reg, value, 8)
    wr(mmio, base, E.REG_DMA_CMD, E.CMD_START | E.CMD_FROM_DEVICE | E.CMD_IRQ)
    assert ram[0x1004:0x1008] == ram[0x1000:0x1004]
    assert rd(mmio, base, E.REG_INTR_STATUS) == E.IRQ_DMA and intx == [True]
    # outside the 4 KiB buffer: refused, nothing copied
    wr(mmio, base, E.REG_DMA_SRC, E.DMA_BUFFER + 4094, 8)
    wr(mmio, base, E.REG_DMA_CMD, E.CMD_START | E.CMD_FROM_DEVICE)
    assert mmio.guest_error_count == 1 and "outside the buffer" in str(mmio.guest_errors[0])


def test_intx_level_follows_the_status_and_msi_replaces_it(rig):
    dev, mmio, cfg, ram, intx, msis = rig
    base = dev.bar_address(0)
    wr(mmio, base, E.REG_INTR_RAISE, 0x5)
    wr(mmio, base, E.REG_INTR_RAISE, 0x2)
    assert rd(mmio, base, E.REG_INTR_STATUS) == 0x7 and intx == [True]
    wr(mmio, base, E.REG_INTR_ACK, 0x5)
    assert intx == [True]
    wr(mmio, base, E.REG_INTR_ACK, 0x2)
    assert intx == [True, False]
    cap = E.MSI_CAP
    cfg.write(3, cap + E.MSI_ADDRESS_LO, 0xFEE00003)      # the low 2 bits are reserved
    cfg.write(3, cap + E.MSI_ADDRESS_HI, 0)
    cfg.write(3, cap + E.MSI_DATA, 0x40EE, 2)
    cfg.write(3, cap + E.MSI_CONTROL, 0xFFFF, 2)          # only the enable bit sticks
    assert cfg.read(3, cap + E.MSI_CONTROL, 2) == E.MSI_64BIT | E.MSI_ENABLE
    wr(mmio, base, E.REG_INTR_RAISE, 1)
    assert msis == [(0xFEE00000, 0x40EE)] and intx == [True, False]
    wr(mmio, base, E.REG_STATUS, E.STATUS_IRQ_FACTORIAL)
    wr(mmio, base, E.REG_FACTORIAL, 3)
    assert len(msis) == 2 and rd(mmio, base, E.REG_INTR_STATUS) == 1


def test_on_a_platform_dma_hits_guest_ram_and_msi_reaches_the_lapic(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        memory, vm = pc.machine.memory, pc.vm
        dev = E.Edu(dma_read=memory.read, dma_write=memory.write,
                    msi=lambda a, d: sent.append(vm.signal_msi(a, d)))
        sent: list[int] = []
        pc.pci.add(3, 0, dev)
        base = dev.bar_address(0)
        mmio = pc.machine.mmio
        memory.write(0x200000, b"\xde\xad\xbe\xef")
        wr(mmio, base, E.REG_DMA_SRC, 0x200000, 8)
        wr(mmio, base, E.REG_DMA_DST, E.DMA_BUFFER, 8)
        wr(mmio, base, E.REG_DMA_COUNT, 4, 8)
        wr(mmio, base, E.REG_DMA_CMD, E.CMD_START)
        wr(mmio, base, E.REG_DMA_DST, 0x200010, 8)
        wr(mmio, base, E.REG_DMA_SRC, E.DMA_BUFFER, 8)
        wr(mmio, base, E.REG_DMA_CMD, E.CMD_START | E.CMD_FROM_DEVICE)
        assert memory.read(0x200010, 4) == b"\xde\xad\xbe\xef"
        # MSI to APIC id 0, vector 0xee: KVM sets the vector in vCPU 0's IRR (its LAPIC
        # software-enabled first, as a guest does)
        vcpu = pc.machine.vcpus[0]
        lapic = vcpu.get_lapic()
        for i, byte in enumerate((0x1FF).to_bytes(4, "little")):
            lapic.regs[0xF0 + i] = bytes([byte])
        vcpu.set_lapic(lapic)
        dev.config_write(E.MSI_CAP + E.MSI_ADDRESS_LO, 0xFEE00000, 4)
        dev.config_write(E.MSI_CAP + E.MSI_DATA, 0xEE, 2)
        dev.config_write(E.MSI_CAP + E.MSI_CONTROL, E.MSI_ENABLE, 2)
        wr(mmio, base, E.REG_INTR_RAISE, 1)
        assert sent == [1]
        irr = int.from_bytes(vcpu.get_lapic().to_bytes()[0x200 + 0x10 * (0xEE // 32):][:4],
                             "little")
        assert irr >> (0xEE % 32) & 1


def test_bad_accesses_raise_guest_errors():
    dev = E.Edu(dma_read=lambda a, n: b"", dma_write=lambda a, d: None)
    with pytest.raises(GuestError):
        dev.regs.read(0x02, 4)
    with pytest.raises(GuestError):
        dev.regs.write(0x10, b"\0" * 8)
