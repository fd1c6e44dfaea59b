# SPDX-License-Identifier: GPL-2.0-or-later
"""MSRs: userspace MSR exits through a filter (data in, data out, #GP injection), and host
get_msrs/set_msrs that the guest observes."""

from __future__ import annotations

import errno

import pytest
from helpers import expect, guest

from pyvmm import Cap, KvmError, exits
from pyvmm.exits import ExitReason

MSR_FILTERED = 0x1A0          # IA32_MISC_ENABLE: denied by the filter below
MSR_UNKNOWN = 0x40001234      # no such MSR: KVM_MSR_EXIT_REASON_UNKNOWN
REASON_UNKNOWN, REASON_FILTER = 2, 4

GUEST = """
    movw $gp_handler, (13*4)     # real-mode IVT entry for #GP
    movw $0, (13*4+2)
    mov $0x1a0, %ecx
    rdmsr                        # exit 1: host supplies the value
    mov %eax, %esi
    mov %edx, %edi
    out %al, $0x10               # exit 2: host checks ESI/EDI
    mov $0x55667788, %eax
    mov $0x11223344, %edx
    wrmsr                        # exit 3: host sees the value
    mov $0x40001234, %ecx
    rdmsr                        # exit 4: unknown MSR
    out %al, $0x11               # exit 5
    mov $0x1a0, %ecx
    rdmsr                        # exit 6: host answers with error -> #GP
    hlt                          # not reached
gp_handler:
    pop %ax                      # real mode #GP: IP of the faulting instruction
    out %ax, $0x0d               # exit 7
    hlt
"""


@pytest.fixture
def filtered_vm(vm):
    if not vm.check_extension(Cap.X86_USER_SPACE_MSR):
        pytest.skip("KVM_CAP_X86_USER_SPACE_MSR absent")
    vm.enable_cap(Cap.X86_USER_SPACE_MSR, 7)        # INVAL | UNKNOWN | FILTER
    vm.set_msr_filter([(1 | 2, MSR_FILTERED, b"\x00")], default_allow=True)
    return vm


def test_userspace_msr_exits(filtered_vm):
    vm = filtered_vm
    vcpu = guest(vm, GUEST)

    ex = expect(vcpu, exits.MsrExit)
    assert (ex.index, ex.is_write, ex.reason) == (MSR_FILTERED, False, REASON_FILTER)
    assert ex.exit_reason == ExitReason.X86_RDMSR
    ex.data = 0x1234_5678_9ABC_DEF0
    assert ex.data == 0x1234_5678_9ABC_DEF0 and ex.error == 0

    ex = expect(vcpu, exits.IoExit)
    assert ex.port == 0x10
    regs = vcpu.get_regs()
    assert (regs.rsi & 0xFFFFFFFF, regs.rdi & 0xFFFFFFFF) == (0x9ABCDEF0, 0x12345678)

    ex = expect(vcpu, exits.MsrExit)
    assert (ex.index, ex.is_write, ex.reason) == (MSR_FILTERED, True, REASON_FILTER)
    assert ex.exit_reason == ExitReason.X86_WRMSR
    assert ex.data == 0x1122334455667788

    ex = expect(vcpu, exits.MsrExit)
    assert (ex.index, ex.is_write, ex.reason) == (MSR_UNKNOWN, False, REASON_UNKNOWN)
    ex.data = 7
    assert expect(vcpu, exits.IoExit).port == 0x11
    assert vcpu.get_regs().rax & 0xFFFFFFFF == 7

    ex = expect(vcpu, exits.MsrExit)
    assert (ex.index, ex.is_write) == (MSR_FILTERED, False)
    fault_ip = vcpu.get_regs().rip
    ex.error = 1
    ex = expect(vcpu, exits.IoExit)
    assert ex.port == 0x0D, "the guest's #GP handler did not run"
    assert ex.value == fault_ip


def test_filter_not_matching_runs_in_kernel(filtered_vm):
    """MSRs the filter allows do not exit: SYSENTER_CS written and read back by the guest."""
    vcpu = guest(filtered_vm, """
        mov $0x174, %ecx
        mov $0x1234, %eax
        xor %edx, %edx
        wrmsr
        xor %eax, %eax
        rdmsr
        hlt
    """)
    expect(vcpu, exits.HltExit)
    assert vcpu.get_regs().rax & 0xFFFFFFFF == 0x1234
    assert vcpu.get_msrs([0x174]) == {0x174: 0x1234}


def test_get_set_msrs_round_trip_seen_by_guest(vm):
    vcpu = guest(vm, """
        mov $0x175, %ecx
        rdmsr                    # the host's SYSENTER_ESP
        mov %eax, %ebx
        mov $0x176, %ecx
        mov $0xabcd, %eax
        xor %edx, %edx
        wrmsr                    # SYSENTER_EIP, for the host to read
        hlt
    """)
    values = {0x174: 0x10, 0x175: 0x7000, 0x176: 0x1000}
    vcpu.set_msrs(values)
    assert vcpu.get_msrs(values) == values
    expect(vcpu, exits.HltExit)
    assert vcpu.get_regs().rbx & 0xFFFFFFFF == 0x7000
    assert vcpu.get_msrs([0x176, 0x174]) == {0x176: 0xABCD, 0x174: 0x10}


def test_bogus_msr_is_named_in_the_error(vm):
    vcpu = vm.create_vcpu()
    with pytest.raises(KvmError) as info:
        vcpu.set_msrs({0x174: 0x8, 0xDEADBEEF: 5})
    err = info.value
    assert (err.errno, err.ioctl, err.role) == (errno.EINVAL, "KVM_SET_MSRS", "vcpu")
    assert "0xdeadbeef" in str(err)
    assert vcpu.get_msrs([0x174]) == {0x174: 0x8}    # entries before the bad one were applied
    with pytest.raises(KvmError) as info:
        vcpu.get_msrs([0x174, 0xDEADBEEF])
    assert info.value.ioctl == "KVM_GET_MSRS" and "0xdeadbeef" in str(info.value)


def test_msr_filter_rejects_too_many_ranges(vm):
    with pytest.raises(ValueError):
        vm.set_msr_filter([(1, i * 8, b"\xff") for i in range(17)])
