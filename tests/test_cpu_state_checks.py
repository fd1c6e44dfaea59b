# SPDX-License-Identifier: GPL-2.0-or-later
"""The scenarios of the KVM selftests' sync_regs_test, set_sregs_test and xapic_state_test,
written for pyvmm: registers through kvm_run's sync area, special registers that KVM must
refuse or keep, and local APIC state that survives save/load and reaches the guest."""

from __future__ import annotations

import errno

import pytest
from helpers import expect, guest

from pyvmm import Cap, KvmError, exits
from pyvmm.state import SYNC_ALL, SYNC_EVENTS, SYNC_REGS, SYNC_SREGS

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms

# -- sync_regs ---------------------------------------------------------------------------------

SYNC_GUEST = """
    out %al, $0x10
    mov %bx, %ax
    out %ax, $0x11
    hlt
"""


def test_sync_regs_filled_at_exit_and_loaded_at_entry(vm):
    assert vm.check_extension(Cap.SYNC_REGS) & SYNC_ALL == SYNC_ALL
    vcpu = guest(vm, SYNC_GUEST, rbx=0x1111)
    vcpu.set_sync_regs(SYNC_ALL)
    expect(vcpu, exits.IoExit)
    synced = vcpu.get_synced_regs()
    assert synced.regs == vcpu.get_regs()
    assert synced.sregs == vcpu.get_sregs()
    assert synced.events.flags == vcpu.get_events().flags
    assert synced.regs.rbx == 0x1111
    regs = synced.regs
    regs.rbx = 0xBEEF
    vcpu.put_synced_regs(regs=regs)
    ex = expect(vcpu, exits.IoExit)
    assert ex.port == 0x11 and bytes(ex.data) == (0xBEEF).to_bytes(2, "little")
    assert vcpu.kvm_run.kvm_dirty_regs == 0                   # consumed by KVM_RUN
    assert vcpu.get_regs().rbx == 0xBEEF


def test_sync_regs_only_what_was_asked(vm):
    vcpu = guest(vm, SYNC_GUEST)
    vcpu.set_sync_regs(SYNC_SREGS)
    expect(vcpu, exits.IoExit)
    synced = vcpu.get_synced_regs()
    assert synced.regs is None and synced.events is None and synced.sregs is not None
    vcpu.set_sync_regs(0)
    assert vcpu.get_synced_regs().sregs is None


def test_sync_regs_bad_masks(vm):
    vcpu = guest(vm, SYNC_GUEST)
    for bad in (8, -1, 1 << 40):
        with pytest.raises(ValueError):
            vcpu.set_sync_regs(bad)
    # KVM itself refuses a mask with an unknown bit at KVM_RUN (what the Python check spares).
    vcpu.kvm_run.kvm_valid_regs = 8
    with pytest.raises(KvmError) as err:
        vcpu.run(timeout=5)
    assert err.value.errno == errno.EINVAL
    vcpu.set_sync_regs(SYNC_REGS | SYNC_EVENTS)
    expect(vcpu, exits.IoExit)


# -- set_sregs -----------------------------------------------------------------------------------

CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 9, 1 << 10


def test_set_sregs_refuses_reserved_cr4_bits_and_keeps_state(vm):
    vcpu = vm.create_vcpu()
    vcpu.set_supported_cpuid()
    before = vcpu.get_sregs()
    for bit in (15, 63):                                      # reserved in every CPU
        bad = before.copy()
        bad.cr4 |= 1 << bit
        with pytest.raises(KvmError) as err:
            vcpu.set_sregs(bad)
        assert err.value.errno == errno.EINVAL
        assert vcpu.get_sregs() == before                     # nothing of it was taken
    good = before.copy()
    good.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT
    vcpu.set_sregs(good)
    assert vcpu.get_sregs().cr4 == good.cr4


def test_sregs_apic_base_of_bsp_and_ap(vm):
    vm.create_irqchip()
    bsp, ap = vm.create_vcpu(), vm.create_vcpu()
    assert bsp.get_sregs().apic_base == 0xFEE00900           # enabled, BSP
    assert ap.get_sregs().apic_base == 0xFEE00800             # enabled, not BSP


# -- xapic_state ---------------------------------------------------------------------------------

APIC_TPR, APIC_SVR, APIC_LVTT, APIC_ICR_LO, APIC_ICR_HI = 0x80, 0xF0, 0x320, 0x300, 0x310


def _reg(lapic, offset: int) -> int:
    return int.from_bytes(lapic.to_bytes()[offset:offset + 4], "little")


def _set_reg(lapic, offset: int, value: int) -> None:
    for i, byte in enumerate(value.to_bytes(4, "little")):
        lapic.regs[offset + i] = bytes([byte])


def test_xapic_state_survives_save_load_and_reaches_the_guest(kvm):
    with kvm.create_vm() as src, kvm.create_vm() as dst:
        for v in (src, dst):
            v.create_irqchip()
        vcpu = guest(src, """
            mov %fs:0x80, %eax        # TPR, through FS based at the LAPIC page
            out %eax, $0x10
            hlt
        """)
        sregs = vcpu.get_sregs()
        sregs.fs.base = 0xFEE00000
        vcpu.set_sregs(sregs)
        lapic = vcpu.get_lapic()
        _set_reg(lapic, APIC_SVR, 0x1FF)                      # software-enabled, spurious 0xff
        _set_reg(lapic, APIC_TPR, 0x30)
        _set_reg(lapic, APIC_LVTT, 0x10000 | 0xEF)            # masked timer, vector 0xef
        _set_reg(lapic, APIC_ICR_HI, 0x03000000)
        _set_reg(lapic, APIC_ICR_LO, 0x000000F1)
        vcpu.set_lapic(lapic)
        got = vcpu.get_lapic()
        for off, want in ((APIC_SVR, 0x1FF), (APIC_TPR, 0x30), (APIC_LVTT, 0x100EF),
                          (APIC_ICR_HI, 0x03000000), (APIC_ICR_LO, 0xF1)):
            assert _reg(got, off) == want, hex(off)
        state = vcpu.save_state(complete_io=False)
        dst.add_memory(0, 0x10000)
        dst.memory.write(0, src.memory.read(0, 0x10000))
        moved = dst.create_vcpu()
        moved.load_state(state)
        assert _reg(moved.get_lapic(), APIC_LVTT) == 0x100EF
        assert _reg(moved.get_lapic(), APIC_ICR_HI) == 0x03000000
        ex = expect(moved, exits.IoExit)
        assert int.from_bytes(bytes(ex.data), "little") == 0x30
