# SPDX-License-Identifier: GPL-2.0-or-later
"""Dirty-page rings (KVM_CAP_DIRTY_LOG_RING), the ring mode of the selftests' dirty_log_test:
each page the guest writes is in its vCPU's ring, once harvested and reset it is logged again
only when written again, and a full ring stops the vCPU (DirtyRingFullExit) until it is
harvested."""

from __future__ import annotations

import pytest
from helpers import LOAD, code, expect, guest, protected_mode

from pyvmm import Cap, exits
from pyvmm.state.dirty_ring import DirtyRing, enable_dirty_ring, reset_dirty_rings

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms

BASE = 0x20000


@pytest.mark.requires_cap(Cap.DIRTY_LOG_RING)
def test_ring_holds_the_written_pages_and_resets(kvm):
    with kvm.create_vm() as vm:
        assert vm.enable_dirty_ring(4096) == 256
        region = vm.add_memory(BASE, 16 * 0x1000, log_dirty=True)
        vcpu = guest(vm, """
            mov $0x2000, %ax
            mov %ax, %es
            movb $1, %es:0x1000      # page 1
            movw $3, %es:0x3ffe      # page 3
            out %al, $0x10
            movb $2, %es:0x3000      # page 3 again
            movb $7, %es:0x7000      # page 7
            hlt
        """)
        with DirtyRing(vcpu, 4096) as ring:
            expect(vcpu, exits.IoExit)
            assert sorted(set(ring.harvest())) == [(region.kernel_slot, 1),
                                                   (region.kernel_slot, 3)]
            assert ring.harvest() == []
            assert vm.reset_dirty_rings() >= 2
            expect(vcpu, exits.HltExit)
            assert sorted(set(ring.harvest())) == [(region.kernel_slot, 3),
                                                   (region.kernel_slot, 7)]


@pytest.mark.requires_cap(Cap.DIRTY_LOG_RING)
def test_full_ring_exits_until_harvested(kvm):
    # Far more pages than a 256-entry ring takes. KVM stops a vCPU whose ring is nearly full
    # when it next enters the guest; kvm_pvm's instruction emulator does not pass that point
    # between instructions, so the guest goes through KVM_RUN (an OUT) every 16 pages, well
    # within the 64 entries KVM keeps in reserve.
    pages = 600
    with kvm.create_vm() as vm:
        entries = enable_dirty_ring(vm, 4096)
        region = vm.add_memory(BASE, 1024 * 0x1000, log_dirty=True)
        vm.add_memory(0, 0x10000)
        vm.memory.write(LOAD, code(f"""
            mov ${BASE:#x}, %ebx
            mov ${pages}, %ecx
        1:  movb $1, (%ebx)
            add $0x1000, %ebx        # the next page
            test $0xf000, %bx
            jnz 2f
            out %al, $0x10           # every 16 pages, a trip through KVM_RUN's entry
        2:  loop 1b
            hlt
        """, bits=32))
        vcpu = vm.create_vcpu()
        protected_mode(vcpu)
        seen, full = set(), 0
        with DirtyRing(vcpu, 4096) as ring:
            for _ in range(200):
                ex = vcpu.run(timeout=10)
                seen.update(ring.harvest())
                if isinstance(ex, exits.HltExit):
                    break
                if isinstance(ex, exits.IoExit) and ex.port == 0x10:
                    continue
                assert isinstance(ex, exits.DirtyRingFullExit), ex
                full += 1
                reset_dirty_rings(vm)
        assert full >= 1 and entries < pages
        assert seen == {(region.kernel_slot, p) for p in range(pages)}


@pytest.mark.requires_cap(Cap.DIRTY_LOG_RING)
def test_ring_arguments_are_checked(kvm):
    with kvm.create_vm() as vm:
        for bad in (100, 4096 + 1, 1 << 40):
            with pytest.raises(ValueError):
                enable_dirty_ring(vm, bad)
        vm.create_vcpu()
        with pytest.raises(ValueError, match="before creating vCPUs"):
            enable_dirty_ring(vm, 4096)
