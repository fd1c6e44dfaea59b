# SPDX-License-Identifier: GPL-2.0-or-later
"""What `-device intel-iommu` and `-device edu` add to a kvm-unit-tests machine: the VT-d
register block at 0xfed90000 and the edu PCI device at 00:03.0, whose DMA goes through the
IOMMU's translation and whose MSIs through its interrupt remapping before KVM delivers them
(KVM_SIGNAL_MSI). edu's INTx is an IOAPIC-only pin (`EDU_GSI`, one of the PCI pins 16-23),
written into its interrupt line register as firmware would.

pyvmm keeps KVM's in-kernel IOAPIC (QEMU's `kernel-irqchip=split` moves it to userspace so
that its messages can go through the IOMMU; KVM's own IOAPIC would read an entry written in
remappable format as a compatibility one). So while interrupt remapping is on, a rising
edu INTx reads its pin's redirection entry back from KVM (KVM_GET_IRQCHIP): an unmasked
edge-triggered entry in remappable format becomes the MSI its IRTE says, sent by
KVM_SIGNAL_MSI in place of the IOAPIC's own message; any other entry (compatibility
format, level-triggered: KVM keeps its remote-IRR/EOI state) goes to the IOAPIC pin.
"""

from __future__ import annotations

from ..devices.edu import Edu
from ..devices.intel_iommu import BASE, SIZE, IntelIommu
from ..devices.pci import INTERRUPT_LINE
from ..state.vm_state import IRQCHIP_IOAPIC

__all__ = ["EDU_DEVFN", "EDU_GSI", "add_devices"]

EDU_SLOT = 3
EDU_DEVFN = EDU_SLOT << 3
EDU_GSI = 19


def add_devices(pc, names: list[str]) -> dict[str, object]:
    """Put the devices `names` ("intel-iommu", "edu") on PcPlatform `pc`; {name: device}."""
    memory, mmio, vm = pc.machine.memory, pc.machine.mmio, pc.vm
    added: dict[str, object] = {}
    iommu = None
    if "intel-iommu" in names:
        iommu = IntelIommu(memory.read, memory.write)
        mmio.register(BASE, SIZE, iommu)
        added["intel-iommu"] = iommu
    if "edu" in names:
        sid = EDU_DEVFN          # bus 0
        if iommu is not None:
            unit = iommu
            edu = Edu(dma_read=lambda a, n: unit.dma_read(sid, a, n),
                      dma_write=lambda a, d: unit.dma_write(sid, a, d),
                      set_intx=lambda level: _intx(vm, unit, level),
                      msi=lambda a, d: vm.signal_msi(*unit.remap_msi(sid, a, d)))
        else:
            edu = Edu(dma_read=memory.read, dma_write=memory.write,
                      set_intx=lambda level: vm.irq_line(EDU_GSI, level),
                      msi=vm.signal_msi)
        edu.config[INTERRUPT_LINE] = EDU_GSI
        pc.pci.add(EDU_SLOT, 0, edu)
        added["edu"] = edu
    return added


_EDGE_MASK = 1 << 15 | 1 << 16     # redirection entry: trigger mode (level), mask


def _intx(vm, iommu: IntelIommu, level: bool) -> None:
    if level and iommu.remapping_interrupts:
        entry = vm.get_irqchip(IRQCHIP_IOAPIC).redirtbl[EDU_GSI]
        message = None if entry & _EDGE_MASK else iommu.remap_ioapic(entry)
        if message is not None:
            vm.signal_msi(*message)
            return
    vm.irq_line(EDU_GSI, level)
