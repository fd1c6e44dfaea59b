# SPDX-License-Identifier: GPL-2.0-or-later
"""The VT-d model: registers and commands, DMA remapping through root/context/second-level
tables the test builds in a PcPlatform's guest RAM (4 KiB and 2 MiB pages, faults),
interrupt remapping (IRTE -> compatibility MSI, source-id check), the invalidation queue,
and edu's DMA and MSI going through it with the MSI delivered by KVM to a LAPIC."""

from __future__ import annotations

import struct

import pytest

from pyvmm.devices import edu as E
from pyvmm.devices import intel_iommu as V
from pyvmm.errors import GuestError
from pyvmm.kut.config import machine_params
from pyvmm.kut.iommu import EDU_DEVFN, EDU_GSI, add_devices
from pyvmm.platform import PcPlatform

ROOT, CTX, L3, L2, L1, IRT, PAGE, IQ = (0x300000 + i * 0x1000 for i in range(8))
SID = 0x18


@pytest.fixture
def pc(kvm):
    with PcPlatform.create(memory_size=16 << 20, kvm=kvm) as pc:
        yield pc


def q(mem, gpa, *values):
    mem.write(gpa, struct.pack(f"<{len(values)}Q", *values))


def rd(iommu, reg, size=4):
    return int.from_bytes(iommu.read(reg, size), "little")


def wr(iommu, reg, value, size=4):
    iommu.write(reg, value.to_bytes(size, "little"))


def enable(iommu, bit):
    wr(iommu, V.REG_GCMD, rd(iommu, V.REG_GSTS) | bit)


def tables(mem, *, huge=False):
    q(mem, ROOT, CTX | 1, 0)                                    # bus 0
    q(mem, CTX + SID * 16, L3 | 1, 1 | SID << 8)                # 3-level, domain = sid
    q(mem, L3, L2 | 3)
    if huge:
        q(mem, L2 + 8, 0x400000 | 3 | V.PTE_PS)                 # IOVA 2M..4M -> 4M..6M
    q(mem, L2, L1 | 3)
    q(mem, L1, PAGE | 3)                                        # IOVA 0 -> PAGE, RW
    q(mem, L1 + 8, (PAGE + 0x1000) | V.PTE_R)                   # IOVA 4K: read only


def test_identity_registers_and_commands(pc):
    iommu = V.IntelIommu(pc.machine.memory.read, pc.machine.memory.write)
    assert rd(iommu, V.REG_VER) == 0x10
    cap = rd(iommu, V.REG_CAP, 8)
    assert cap & (0x2 << 8) and cap & (3 << 34)                # 39-bit, 2M/1G pages
    assert rd(iommu, V.REG_CAP + 4) == cap >> 32
    assert rd(iommu, V.REG_ECAP, 8) & (V.ECAP_QI | V.ECAP_IR) == V.ECAP_QI | V.ECAP_IR
    wr(iommu, V.REG_RTADDR, ROOT | 0xABC, 8)
    assert rd(iommu, V.REG_RTADDR, 8) == ROOT
    assert rd(iommu, V.REG_GSTS) == 0
    for bit in (V.GCMD_QIE, V.GCMD_SRTP, V.GCMD_SIRTP, V.GCMD_TE, V.GCMD_IRE):
        enable(iommu, bit)
        assert rd(iommu, V.REG_GSTS) & bit
    assert iommu.root == ROOT
    wr(iommu, V.REG_GCMD, V.GCMD_SRTP)                          # TE, IRE, QIE off again
    assert rd(iommu, V.REG_GSTS) & (V.GCMD_TE | V.GCMD_IRE | V.GCMD_QIE) == 0
    with pytest.raises(GuestError):
        iommu.read(0x02, 2)


def test_dma_remapping_walks_the_tables(pc):
    mem = pc.machine.memory
    iommu = V.IntelIommu(mem.read, mem.write)
    tables(mem, huge=True)
    assert iommu.translate(SID, 0x1234, True) == 0x1234         # translation off: identity
    wr(iommu, V.REG_RTADDR, ROOT, 8)
    enable(iommu, V.GCMD_SRTP)
    enable(iommu, V.GCMD_TE)
    assert iommu.translate(SID, 0x10, True) == PAGE + 0x10
    assert iommu.translate(SID, 0x1010, False) == PAGE + 0x1010
    assert iommu.translate(SID, 0x200000 + 0x12345, False) == 0x400000 + 0x12345
    mem.write(PAGE + 0xFFE, b"ab")
    mem.write(PAGE + 0x1000, b"cd")
    assert iommu.dma_read(SID, 0xFFE, 4) == b"abcd"             # crosses a page
    iommu.dma_write(SID, 0x8, b"xyz")
    assert mem.read(PAGE + 8, 3) == b"xyz"
    for sid, iova, write in ((SID, 0x1000, True),               # read-only page
                             (SID, 0x2000, False),              # not mapped
                             (SID + 1, 0, False),               # no context entry
                             (SID, 1 << 39, False)):            # beyond 39 bits
        with pytest.raises(GuestError):
            iommu.translate(sid, iova, write)
    assert iommu.faults == 4 and rd(iommu, V.REG_FSTS) & V.FSTS_PPF
    wr(iommu, V.REG_FSTS, V.FSTS_PPF)
    assert rd(iommu, V.REG_FSTS) == 0


def irte(vector, dest=0, sid=SID, level=False, present=True):
    low = int(present) | int(level) << 4 | vector << 16 | dest << 40
    return low, sid | 1 << 18                                  # SVT 1: full source-id check


def test_interrupt_remapping(pc):
    mem = pc.machine.memory
    iommu = V.IntelIommu(mem.read, mem.write)
    q(mem, IRT + 16, *irte(0xEE, dest=3))
    q(mem, IRT + 32, *irte(0x41, level=True))
    q(mem, IRT + 48, *irte(0x42, present=False))
    handle = lambda h: 0xFEE00000 | 1 << 4 | (h & 0x7FFF) << 5 | (h >> 15) << 2
    assert iommu.remap_msi(SID, handle(1), 0) == (handle(1), 0)    # IR off: unchanged
    wr(iommu, V.REG_IRTA, IRT | 0x7, 8)                         # 256 entries
    enable(iommu, V.GCMD_SIRTP)
    enable(iommu, V.GCMD_IRE)
    assert iommu.remap_msi(SID, handle(1), 0) == (0xFEE03000, 0xEE)
    assert iommu.remap_msi(SID, handle(2), 0) == (0xFEE00000, 0x41 | 1 << 15 | 1 << 14)
    assert iommu.remap_msi(SID, 0xFEE00000 | 1 << 4 | 1 << 3 | 1 << 5, 1) == \
        (0xFEE00000, 0x41 | 1 << 15 | 1 << 14)                   # SHV: handle 1 + subhandle 1
    assert iommu.remap_msi(SID, 0xFEE01000, 0x30) == (0xFEE01000, 0x30)   # compatibility
    for sid, addr in ((SID, handle(3)), (SID + 8, handle(1)), (SID, handle(300))):
        with pytest.raises(GuestError):
            iommu.remap_msi(sid, addr, 0)


def test_invalidation_queue_wait_descriptor_writes_its_status(pc):
    mem = pc.machine.memory
    iommu = V.IntelIommu(mem.read, mem.write)
    wr(iommu, V.REG_IQA, IQ, 8)
    enable(iommu, V.GCMD_QIE)
    q(mem, IQ, 0x2 | 1 << 4, 0)                                 # IOTLB invalidation
    q(mem, IQ + 16, 0x5 | 1 << 5 | 0xC0FFEE << 32, PAGE + 0x40)  # wait, status write
    wr(iommu, V.REG_IQT, 32, 8)
    assert rd(iommu, V.REG_IQH, 8) == 32
    assert mem.read(PAGE + 0x40, 4) == (0xC0FFEE).to_bytes(4, "little")


def test_kut_params_and_edu_through_the_iommu(pc):
    params = machine_params("-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,"
                            "eim=off -device edu")
    assert params.devices == ["intel-iommu", "edu"] and not params.unsupported
    assert machine_params("-device intel-iommu,caching-mode=on").unsupported
    added = add_devices(pc, params.devices)
    iommu, dev = added["intel-iommu"], added["edu"]
    assert isinstance(dev, E.Edu) and dev.config[0x3C] == EDU_GSI
    mem, mmio = pc.machine.memory, pc.machine.mmio
    assert mmio.find(V.BASE, 4) is not None
    tables(mem)
    wr(iommu, V.REG_RTADDR, ROOT, 8)
    for bit in (V.GCMD_SRTP, V.GCMD_TE):
        enable(iommu, bit)
    mem.write(PAGE, b"\x78\x56\x34\x12")
    base = dev.bar_address(0)
    put = lambda reg, v, size=8: mmio.write(base + reg, v.to_bytes(size, "little"))
    put(E.REG_DMA_SRC, 0)                                       # IOVA 0 -> PAGE
    put(E.REG_DMA_DST, E.DMA_BUFFER)
    put(E.REG_DMA_COUNT, 4)
    put(E.REG_DMA_CMD, E.CMD_START, 4)
    assert dev.regs.buffer[:4] == b"\x78\x56\x34\x12"
    # MSI in remappable format, handle 1 -> vector 0xee on APIC 0
    q(mem, IRT + 16, *irte(0xEE, sid=EDU_DEVFN))
    wr(iommu, V.REG_IRTA, IRT | 0x7, 8)
    for bit in (V.GCMD_SIRTP, V.GCMD_IRE):
        enable(iommu, bit)
    vcpu = pc.machine.vcpus[0]
    lapic = vcpu.get_lapic()
    for i, byte in enumerate((0x1FF).to_bytes(4, "little")):
        lapic.regs[0xF0 + i] = bytes([byte])                   # software-enable the LAPIC
    vcpu.set_lapic(lapic)
    dev.config_write(E.MSI_CAP + E.MSI_ADDRESS_LO, 0xFEE00000 | 1 << 4 | 1 << 5, 4)
    dev.config_write(E.MSI_CAP + E.MSI_DATA, 0, 2)
    dev.config_write(E.MSI_CAP + E.MSI_CONTROL, E.MSI_ENABLE, 2)
    put(E.REG_INTR_RAISE, 1, 4)
    irr = int.from_bytes(vcpu.get_lapic().to_bytes()[0x200 + 0x10 * (0xEE // 32):][:4],
                         "little")
    assert irr >> (0xEE % 32) & 1


def _irr(vcpu, vector):
    raw = vcpu.get_lapic().to_bytes()[0x200 + 0x10 * (vector // 32):][:4]
    return int.from_bytes(raw, "little") >> (vector % 32) & 1


def test_edu_intx_through_a_remappable_ioapic_entry(pc):
    from pyvmm.state.vm_state import IRQCHIP_IOAPIC

    added = add_devices(pc, ["intel-iommu", "edu"])
    iommu, dev = added["intel-iommu"], added["edu"]
    mem, vm, vcpu = pc.machine.memory, pc.vm, pc.machine.vcpus[0]
    lapic = vcpu.get_lapic()
    for i, byte in enumerate((0x1FF).to_bytes(4, "little")):
        lapic.regs[0xF0 + i] = bytes([byte])
    vcpu.set_lapic(lapic)
    q(mem, IRT + 2 * 16, *irte(0xE1, sid=EDU_DEVFN))
    wr(iommu, V.REG_IRTA, IRT | 0x7, 8)
    for bit in (V.GCMD_SIRTP, V.GCMD_IRE):
        enable(iommu, bit)
    ioapic = vm.get_irqchip(IRQCHIP_IOAPIC)
    # remappable format: handle 2 in bits 63:49, format bit 48; vector field 0x33 (what
    # KVM's IOAPIC alone would deliver), edge, unmasked
    ioapic.redirtbl[EDU_GSI] = 0x33 | 1 << 48 | 2 << 49
    vm.set_irqchip(IRQCHIP_IOAPIC, ioapic)
    dev.regs.write(E.REG_INTR_RAISE, (1).to_bytes(4, "little"))
    assert _irr(vcpu, 0xE1) == 1 and _irr(vcpu, 0x33) == 0
    dev.regs.write(E.REG_INTR_ACK, (1).to_bytes(4, "little"))
    # a compatibility-format entry goes to KVM's IOAPIC pin as it is
    ioapic.redirtbl[EDU_GSI] = 0x34
    vm.set_irqchip(IRQCHIP_IOAPIC, ioapic)
    dev.regs.write(E.REG_INTR_RAISE, (1).to_bytes(4, "little"))
    assert _irr(vcpu, 0x34) == 1
