# SPDX-License-Identifier: GPL-2.0-or-later
"""VM-wide state: the in-kernel PICs and IOAPIC (GET/SET_IRQCHIP), the PIT (GET/SET_PIT2), the
kvmclock clock (GET/SET_CLOCK), VmState, KVM_SET_IDENTITY_MAP_ADDR and KVM_CLEAR_DIRTY_LOG
with manual dirty-log protection."""

from __future__ import annotations

import errno
import pickle

import pytest
from helpers import expect, guest

from pyvmm import Cap, KvmError, exits
from pyvmm.state import IoapicState, PicState, PitState, VmState

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms


def test_irqchip_round_trip(vm):
    vm.create_irqchip()
    master, slave, ioapic = (vm.get_irqchip(c) for c in (0, 1, 2))
    assert isinstance(master, PicState) and isinstance(ioapic, IoapicState)
    assert ioapic.base_address == 0xFEC00000
    assert all(e & (1 << 16) for e in ioapic.redirtbl)    # every pin starts masked
    master.imr, slave.imr, master.irq_base = 0xFB, 0xFF, 0x20
    ioapic.redirtbl[5] = 0x31 | (1 << 15)                  # vector 0x31, level, unmasked
    ioapic.id = 3
    vm.set_irqchip(0, master)
    vm.set_irqchip(1, slave)
    vm.set_irqchip(2, ioapic)
    assert vm.get_irqchip(0).imr == 0xFB and vm.get_irqchip(0).irq_base == 0x20
    assert vm.get_irqchip(1).imr == 0xFF
    back = vm.get_irqchip(2)
    assert back.redirtbl[5] & 0x1FFFF == 0x31 | (1 << 15) and back.id == 3
    assert pickle.loads(pickle.dumps(back)) == back
    with pytest.raises(ValueError):
        vm.get_irqchip(3)
    with pytest.raises(TypeError):
        vm.set_irqchip(2, master)


def test_irqchip_absent(vm):
    with pytest.raises(KvmError) as err:
        vm.get_irqchip(0)
    assert err.value.errno == errno.ENXIO
    state = vm.save_state()
    assert state.ioapic is None and state.pit is None and not state.irqchip


def test_irq_line_shows_in_the_saved_ioapic(vm):
    vm.create_irqchip()
    vm.irq_line(9, 1)
    assert vm.get_irqchip(2).irr & (1 << 9)
    vm.irq_line(9, 0)


def test_pit_round_trip(vm):
    vm.create_irqchip()
    vm.create_pit()
    pit = vm.get_pit()
    assert isinstance(pit, PitState)
    pit.channels[2].count = 0x1234
    pit.channels[2].mode = 2
    pit.channels[2].gate = 1
    vm.set_pit(pit)
    back = vm.get_pit()
    assert back.channels[2].count == 0x1234 and back.channels[2].mode == 2
    assert pickle.loads(pickle.dumps(back)) == back


def test_pit_programmed_by_the_guest_is_saved(vm):
    """The guest programs PIT channel 0 (mode 2, count 0x2e9b) through its ports; the saved
    state has it."""
    vm.create_irqchip()
    vm.create_pit()
    vcpu = guest(vm, """
        mov $0x34, %al
        out %al, $0x43          # channel 0, lobyte/hibyte, mode 2
        mov $0x9b, %al
        out %al, $0x40
        mov $0x2e, %al
        out %al, $0x40
        out %al, $0x10
    """)
    expect(vcpu, exits.IoExit)
    channel = vm.save_state().pit.channels[0]
    assert channel.count == 0x2E9B and channel.mode == 2


@pytest.mark.requires_cap(Cap.ADJUST_CLOCK)
def test_clock(vm):
    now = vm.get_clock()
    later = vm.get_clock()
    assert later.clock >= now.clock
    vm.set_clock(10**12)
    got = vm.get_clock().clock
    assert 10**12 <= got < 10**12 + 10 * 10**9
    with pytest.raises(ValueError):
        vm.set_clock(-1)
    if now.flags & 4:                                   # KVM_CLOCK_REALTIME
        vm.set_clock(now, realtime=True)                # plus the realtime since it was read
        assert vm.get_clock().clock >= now.clock
    else:
        with pytest.raises(ValueError):
            vm.set_clock(now, realtime=True)


def test_vm_state_moves_to_a_new_vm(kvm):
    with kvm.create_vm() as src, kvm.create_vm() as dst:
        for v in (src, dst):
            v.create_irqchip()
            v.create_pit()
        ioapic = src.get_irqchip(2)
        ioapic.redirtbl[4] = 0x44
        src.set_irqchip(2, ioapic)
        state = pickle.loads(pickle.dumps(src.save_state()))
        assert state.irqchip and state.pit is not None
        assert VmState.decode(state.encode()) == state
        dst.load_state(state)
        assert dst.get_irqchip(2).redirtbl[4] & 0xFF == 0x44
        # KVM restarts each loaded counter at the time of the load (count_load_time).
        strip = [dict(c, count_load_time=0) for c in state.pit.to_dict()["channels"]]
        assert [dict(c, count_load_time=0) for c in dst.get_pit().to_dict()["channels"]] == strip
        assert dst.get_irqchip(0) == state.pic_master
        with kvm.create_vm() as bare:
            with pytest.raises(ValueError, match="irqchip"):
                bare.load_state(state)


def test_identity_map_addr_only_before_vcpus(vm):
    with pytest.raises(ValueError):
        vm.set_identity_map_addr(0xFEFFC001)
    vm.set_identity_map_addr(0xFEFFC000)
    vm.create_vcpu()
    with pytest.raises(KvmError) as err:
        vm.set_identity_map_addr(0xFEFFC000)
    assert err.value.errno == errno.EINVAL


BASE, PAGES = 0x20000, 128


@pytest.mark.parametrize("initially_set", [False, True])
def test_clear_dirty_log(vm, initially_set):
    """With manual protection, reading the log leaves it as it is; clear_dirty_log() resets
    the pages asked for, and only a write after that sets them again."""
    vm.enable_manual_dirty_log(initially_set=initially_set)
    vm.add_memory(0, 0x10000)
    region = vm.add_memory(BASE, PAGES * 0x1000, log_dirty=True)
    if initially_set:
        assert vm.dirty_log(region).pages() == list(range(PAGES))
    vm.clear_dirty_log(region)
    assert vm.dirty_log(region).pages() == []
    vcpu = guest(vm, """
        mov $0x2000, %ax
        mov %ax, %es
        movb $1, %es:0x1000      # page 1
        mov $0x6100, %ax
        mov %ax, %fs
        movb $1, %fs:0           # page 65
        out %al, $0x10
        movb $2, %es:0x1000      # page 1 again
        mov $0x9f00, %ax
        mov %ax, %fs
        movb $2, %fs:0           # page 127
        hlt
    """)
    expect(vcpu, exits.IoExit)
    assert vm.dirty_log(region).pages() == [1, 65]
    assert vm.dirty_log(region).pages() == [1, 65]       # not cleared by reading
    vm.clear_dirty_log(region, 0, 64)                     # only pages 0..63
    assert vm.dirty_log(region).pages() == [65]
    vm.clear_dirty_log(region, 64)                        # 64..127: to the end
    expect(vcpu, exits.HltExit)
    assert vm.dirty_log(region).pages() == [1, 127]
    for bad in ((1, None), (0, 10), (0, 0), (64, 65)):
        with pytest.raises(ValueError):
            vm.clear_dirty_log(region, *bad)
    plain = vm.add_memory(0x100000, 0x1000)
    with pytest.raises(ValueError):
        vm.clear_dirty_log(plain)

