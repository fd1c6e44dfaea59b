# SPDX-License-Identifier: GPL-2.0-or-later
"""Stock-KVM smoke tests: skipped on kvm_pvm (no SMM), run by ``pyvmm nested`` on kvm_amd.

They keep ``pytest -m stock_kvm`` meaningful before the SMM and hypercall tests exist, and
check that the nested runner really provides what it promises.
"""

import pytest

from pyvmm import Cap


@pytest.mark.requires_cap(Cap.X86_SMM)
def test_smm_vm_has_two_address_spaces(kvm, vm):
    # With SMM, KVM keeps a second memslot address space for SMRAM.
    assert kvm.check_extension(Cap.X86_SMM) == 1
    assert vm.check_extension(Cap.MULTI_ADDRESS_SPACE) == 2


@pytest.mark.requires_cap(Cap.X86_SMM)
def test_smram_slot_in_address_space_1(vm):
    # A slot in address space 1 is accepted only where SMM exists; the same guest address can
    # hold different memory in each space.
    normal = vm.add_memory(0x30000, 0x10000)
    smram = vm.add_memory(0x30000, 0x10000, address_space=1)
    vm.memory.write(0x30000, b"normal")
    vm.memory.write(0x30000, b"smram!", address_space=1)
    assert vm.memory.read(0x30000, 6) == b"normal"
    assert vm.memory.read(0x30000, 6, address_space=1) == b"smram!"
    vm.remove_memory(smram)
    vm.remove_memory(normal)
