# SPDX-License-Identifier: GPL-2.0-or-later
"""`Vm`: memory regions (validation, slots, host accessors, what the guest sees), vCPU
creation and the VM's lifetime."""

from __future__ import annotations

import errno

import pytest
from helpers import expect, guest, ioctl_spy  # noqa: F401  (a fixture)

from pyvmm import ClosedError, KvmError, exits


@pytest.mark.parametrize("addr, size, why", [
    (0x1001, 0x1000, "not page-aligned"),
    (0x800, 0x1000, "not page-aligned"),
    (0x1000, 0x1800, "multiple of 4 KiB"),
    (0x1000, 0, "positive"),
    (0x1000, -0x1000, "positive"),
    (-0x1000, 0x1000, "not page-aligned"),
])
def test_add_memory_rejects_bad_ranges_before_any_ioctl(vm, ioctl_spy, addr, size, why):
    with pytest.raises(ValueError, match=why):
        vm.add_memory(addr, size)
    assert "KVM_SET_USER_MEMORY_REGION" not in ioctl_spy
    assert vm.memory.regions() == []
    # Nothing was consumed: the next good region still gets slot 0.
    assert vm.add_memory(0, 0x1000).slot == 0


@pytest.mark.parametrize("addr, size", [
    (0x10000, 0x10000),   # same range
    (0x8000, 0x10000),    # overlaps the start
    (0x18000, 0x10000),   # overlaps the end
    (0x12000, 0x1000),    # inside
    (0x0, 0x40000),       # around
])
def test_add_memory_rejects_overlap_before_any_ioctl(vm, ioctl_spy, addr, size):
    first = vm.add_memory(0x10000, 0x10000)
    ioctl_spy.clear()
    with pytest.raises(ValueError, match="overlaps"):
        vm.add_memory(addr, size)
    assert "KVM_SET_USER_MEMORY_REGION" not in ioctl_spy
    assert vm.memory.regions() == [first]


def test_adjacent_regions_are_fine(vm):
    a = vm.add_memory(0x10000, 0x10000)
    b = vm.add_memory(0x20000, 0x1000)
    c = vm.add_memory(0xF000, 0x1000)
    assert [r.guest_addr for r in vm.memory.regions()] == [0xF000, 0x10000, 0x20000]
    assert {a.slot, b.slot, c.slot} == {0, 1, 2}


def test_slots_are_allocated_and_reused(vm):
    regions = [vm.add_memory(0x100000 * (i + 1), 0x2000) for i in range(4)]
    assert [r.slot for r in regions] == [0, 1, 2, 3]
    victim = regions[1]
    vm.remove_memory(victim)
    assert victim.closed
    assert vm.memory.find(victim.guest_addr) is None
    with pytest.raises(ValueError):
        vm.memory.read(victim.guest_addr, 1)
    with pytest.raises(ValueError):
        vm.remove_memory(victim)  # already gone
    # The freed slot number comes back first, and the kernel really dropped the old memslot:
    # a different-sized region over the same guest range is accepted (an overlap with a live
    # slot would be EEXIST).
    again = vm.add_memory(victim.guest_addr - 0x1000, 0x4000)
    assert again.slot == 1
    assert vm.add_memory(0x900000, 0x1000).slot == 4


def test_kernel_rejects_what_python_does_not_check(vm):
    """An overlap that bypasses the Python bookkeeping is refused by KVM with EEXIST, and the
    error names the ioctl and the slot."""
    region = vm.add_memory(0x10000, 0x2000)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(7, 0, 0x11000, 0x1000, region.host_addr)
    err = info.value
    assert (err.errno, err.ioctl, err.role) == (errno.EEXIST, "KVM_SET_USER_MEMORY_REGION",
                                                "vm")
    assert "slot 0x7" in str(err)


def test_read_write_view_round_trip_across_regions(vm):
    vm.add_memory(0x10000, 0x1000)
    vm.add_memory(0x11000, 0x2000)
    data = bytes(range(256)) * 2
    gpa = 0x11000 - 100                    # 100 bytes in the first region, the rest in the next
    vm.memory.write(gpa, data)
    assert vm.memory.read(gpa, len(data)) == data
    assert vm.memory.read(0x11000, 4) == data[100:104]
    # A view is zero-copy and writable, both ways.
    view = vm.memory.view(0x11000, 16)
    assert bytes(view) == data[100:116]
    view[0:4] = b"WXYZ"
    assert vm.memory.read(0x11000, 4) == b"WXYZ"
    vm.memory.write(0x11004, b"!!")
    assert bytes(view[4:6]) == b"!!"
    # u64 helpers are little-endian.
    vm.memory.write_u64(0x12000, 0x1122334455667788)
    assert vm.memory.read(0x12000, 8) == bytes.fromhex("8877665544332211")
    assert vm.memory.read_u64(0x12000) == 0x1122334455667788
    # A view must lie inside one region.
    with pytest.raises(ValueError):
        vm.memory.view(0x11000 - 8, 16)


def test_access_outside_any_region(vm):
    vm.add_memory(0x10000, 0x1000)
    with pytest.raises(ValueError, match="not in any memory region"):
        vm.memory.read(0x20000, 1)
    with pytest.raises(ValueError):
        vm.memory.read(0xFFFF, 2)         # starts before the region
    with pytest.raises(ValueError):
        vm.memory.read(0x10FF0, 0x20)     # runs past its end
    # A write that runs past the end changes nothing, not even the part inside.
    with pytest.raises(ValueError):
        vm.memory.write(0x10FFC, b"12345678")
    assert vm.memory.read(0x10FFC, 4) == b"\0\0\0\0"
    with pytest.raises(ValueError):
        vm.memory.view(0x20000, 1)


def test_guest_sees_host_writes_and_host_sees_guest_writes(vm):
    vm.add_memory(0, 0x10000)
    vm.memory.write(0x3000, (0x0BADF00D).to_bytes(4, "little"))
    vcpu = guest(vm, """
        movl 0x3000, %eax        # what the host wrote
        addl $1, %eax
        movl %eax, 0x3004        # host reads this back
        movl $0xdeadbeef, 0x2ffc
        hlt
    """)
    expect(vcpu, exits.HltExit)
    assert vcpu.get_regs().rax & 0xFFFFFFFF == 0x0BADF00E
    assert vm.memory.read(0x3004, 4) == (0x0BADF00E).to_bytes(4, "little")
    assert vm.memory.read_u64(0x2FFC) & 0xFFFFFFFF == 0xDEADBEEF


def test_memory_in_a_second_region_reaches_the_guest(vm):
    """A region added after the vCPU exists is used by the next run: the guest reads it
    through ES (base 0x20000)."""
    vcpu = guest(vm, """
        mov $0x2000, %ax
        mov %ax, %es
        movw %es:0x10, %bx
        movw $0x5a5a, %es:0x12
        hlt
    """)
    vm.add_memory(0x20000, 0x1000)
    vm.memory.write(0x20010, b"\x34\x12")
    expect(vcpu, exits.HltExit)
    assert vcpu.get_regs().rbx & 0xFFFF == 0x1234
    assert vm.memory.read(0x20012, 2) == b"\x5a\x5a"


def test_vcpu_ids(vm):
    a = vm.create_vcpu()
    b = vm.create_vcpu()
    c = vm.create_vcpu(4095)
    assert (a.id, b.id, c.id) == (0, 1, 4095)
    assert vm.vcpus == {0: a, 1: b, 4095: c}
    with pytest.raises(ValueError):
        vm.create_vcpu(4096)
    b.close()
    assert 1 not in vm.vcpus


def test_vcpu_id_of_a_closed_vcpu_is_not_reused(vm):
    """KVM frees a vCPU only with its VM: after close(), its id stays taken in the kernel
    (KVM_CREATE_VCPU with it is EEXIST). Automatic id allocation must skip it."""
    vm.create_vcpu()
    vm.create_vcpu().close()
    vcpu = vm.create_vcpu()          # must not pick id 1 again
    assert vcpu.id == 2
    assert vcpu.get_regs().rflags & 2
    with pytest.raises((ValueError, KvmError)):
        vm.create_vcpu(1)


def test_close_releases_everything(kvm):
    vm = kvm.create_vm()
    region = vm.add_memory(0, 0x1000)
    vcpu = vm.create_vcpu()
    vm_fd, vcpu_fd = vm.fileno(), vcpu.fileno()
    with vm:
        pass
    assert vm.closed and vcpu.closed and region.closed
    assert vm.memory.regions() == []
    for fd in (vm_fd, vcpu_fd):
        with pytest.raises(OSError):
            import os
            os.fstat(fd)
    with pytest.raises(ClosedError):
        vm.add_memory(0x1000, 0x1000)
    with pytest.raises(ClosedError):
        vm.create_vcpu()
    with pytest.raises(ClosedError):
        vcpu.run()
    with pytest.raises(ClosedError):
        vcpu.get_regs()
    vm.close()  # idempotent


def test_enable_cap_error_names_the_cap(vm):
    from pyvmm import Cap
    # KVM_CAP_X86_USER_SPACE_MSR takes a mask of exit reasons; bit 31 is not one.
    with pytest.raises(KvmError) as info:
        vm.enable_cap(Cap.X86_USER_SPACE_MSR, 1 << 31)
    err = info.value
    assert (err.errno, err.ioctl, err.role) == (errno.EINVAL, "KVM_ENABLE_CAP", "vm")
    assert "X86_USER_SPACE_MSR" in str(err)
    with pytest.raises(ValueError):
        vm.enable_cap(Cap.X86_USER_SPACE_MSR, 1, 2, 3, 4, 5)


def test_vm_stats(vm):
    stats = vm.stats()
    assert "remote_tlb_flush" in stats or "pages_4k" in stats, sorted(stats)
    assert all(isinstance(v, int) for v in stats.values())


def test_alias_shows_the_same_host_memory_at_a_second_address(vm):
    """alias_memory in the same address space: one host buffer behind two memslots. A guest
    write through the alias lands in the region; removing goes alias first."""
    ram = vm.add_memory(0, 0x10000)
    alias = vm.alias_memory(ram, 0x20000, offset=0x2000, size=0x2000, address_space=0)
    assert alias.alias_of is ram and alias.host_addr == ram.host_addr + 0x2000
    vcpu = guest(vm, """
        mov $0x2000, %ax
        mov %ax, %es
        movl $0xc0ffee11, %es:0x0010     # 0x20010: through the alias of 0x2010
        movl %es:0x1000, %ebx            # 0x21000: the alias of 0x3000, which the host wrote
        hlt
    """)
    vm.memory.write(0x3000, (0x600DF00D).to_bytes(4, "little"))
    expect(vcpu, exits.HltExit)
    assert vm.memory.read(0x2010, 4) == (0xC0FFEE11).to_bytes(4, "little")
    assert vcpu.get_regs().rbx & 0xFFFFFFFF == 0x600DF00D
    with pytest.raises(ValueError, match="remove them first"):
        vm.remove_memory(ram)
    with pytest.raises(ValueError, match="outside"):
        vm.alias_memory(ram, 0x200000, offset=0x8000, size=0x10000, address_space=0)
    vm.remove_memory(alias)
    vm.remove_memory(ram)
    assert ram.closed and alias.closed
