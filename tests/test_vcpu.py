# SPDX-License-Identifier: GPL-2.0-or-later
"""`Vcpu` state: registers, segment registers, FPU, events, MP state, CPUID, SMM, stats."""

from __future__ import annotations

import errno

import pytest
from helpers import LOAD, expect, guest, real_mode

from pyvmm import Cap, CpuidEntry, KvmError, MissingCapability, Regs, Sregs, exits

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def test_regs_round_trip_and_guest_uses_them(vm):
    vcpu = guest(vm, """
        add %ebx, %eax
        imul %ecx, %eax
        hlt
    """)
    regs = vcpu.get_regs()
    assert isinstance(regs, Regs) and regs.rip == LOAD
    for i, name in enumerate(GPRS):
        setattr(regs, name, 0x1111_0000_0000_0000 * (i % 15 + 1) + i)
    regs.rax, regs.rbx, regs.rcx, regs.rsp = 40, 2, 3, 0x7000
    vcpu.set_regs(regs)
    back = vcpu.get_regs()
    assert back == regs and back is not regs
    assert back.to_dict()["r15"] == regs.r15
    expect(vcpu, exits.HltExit)
    after = vcpu.get_regs()
    assert after.rax & 0xFFFFFFFF == (40 + 2) * 3
    assert after.r12 == regs.r12                    # untouched by the guest
    assert after.rip == LOAD + len(b"\x66\x01\xd8" b"\x66\x0f\xaf\xc1") + 1
    # copy() is independent of the original
    c = after.copy()
    c.rax = 0
    assert after.rax != 0


def test_sregs_round_trip_and_segment_base_used(vm):
    vm.add_memory(0, 0x10000)
    vm.memory.write(0x5010, b"\x99\x88")
    vcpu = guest(vm, "movw 0x10, %ax\nhlt")
    sregs = vcpu.get_sregs()
    assert isinstance(sregs, Sregs)
    assert sregs.cr0 & 1 == 0, "real mode"
    assert sregs.cs.base == 0
    sregs.ds.base, sregs.ds.selector = 0x5000, 0x500
    vcpu.set_sregs(sregs)
    back = vcpu.get_sregs()
    assert (back.ds.base, back.ds.selector) == (0x5000, 0x500)
    assert back == sregs
    expect(vcpu, exits.HltExit)
    assert vcpu.get_regs().rax & 0xFFFF == 0x8899   # read through DS base 0x5000
    assert "cr0=" in repr(back)


def test_fpu_round_trip(vm):
    """Host-side round trip only: on kvm_pvm the instruction emulator's x87 ops (fnstcw,
    fninit) do not see the state set with KVM_SET_FPU (measured: fnstcw stores 0x37f after
    SET_FPU with fcw 0x27f, and fninit leaves GET_FPU's fcw alone), so a guest-side check
    would test the host, not pyvmm."""
    vcpu = vm.create_vcpu()
    fpu = vcpu.get_fpu()
    assert fpu.fcw == 0x37F                          # the reset value
    # Stock KVM reports MXCSR (reset 0x1f80) and takes it back; kvm_pvm reads it as 0 and
    # ignores a write (measured with a C probe), so MXCSR is only checked where it is reported.
    mxcsr_works = fpu.mxcsr == 0x1F80
    fpu.fcw = 0x27F                  # double precision instead of the reset 0x37f
    fpu.mxcsr = 0x1F80 | 0x6000      # round toward zero
    for i in range(16):
        fpu.xmm[3][i] = i * 7 & 0xFF
    vcpu.set_fpu(fpu)
    back = vcpu.get_fpu()
    assert back.fcw == 0x27F
    if mxcsr_works:
        assert back.mxcsr == 0x7F80
    assert bytes(back.xmm[3]) == bytes(i * 7 & 0xFF for i in range(16))
    assert back.xmm[2][0] == 0 and back.fsw == fpu.fsw


def test_events_round_trip(vm):
    vcpu = vm.create_vcpu()
    events = vcpu.get_events()
    assert events.exception.injected == 0 and events.nmi.pending == 0
    assert events.smi.smm == 0
    vcpu.set_events(events)
    assert vcpu.get_events() == events
    # An NMI queued with KVM_NMI shows up as pending in the events.
    vcpu.nmi()
    pending = vcpu.get_events()
    assert pending.nmi.pending == 1 or pending.nmi.injected == 1


def test_injected_exception_reaches_guest_handler(vm):
    """KVM_SET_VCPU_EVENTS with a pending #UD: the guest's IVT handler for vector 6 runs."""
    vcpu = guest(vm, """
        movw $handler, (6*4)
        movw $0, (6*4+2)
        out %al, $0x10
        hlt
    handler:
        mov $0x66, %al
        out %al, $0x11
        hlt
    """)
    assert expect(vcpu, exits.IoExit).port == 0x10
    events = vcpu.get_events()
    events.exception.injected = 1
    events.exception.nr = 6
    vcpu.set_events(events)
    ex = expect(vcpu, exits.IoExit)
    assert (ex.port, ex.value) == (0x11, 0x66)


def test_mp_state(vm):
    vcpu = vm.create_vcpu()
    assert vcpu.get_mp_state() == 0                 # RUNNABLE
    vcpu.set_mp_state(0)
    # Without the in-kernel irqchip only RUNNABLE is accepted.
    with pytest.raises(KvmError) as info:
        vcpu.set_mp_state(3)                        # HALTED
    err = info.value
    assert (err.errno, err.ioctl, err.role) == (errno.EINVAL, "KVM_SET_MP_STATE", "vcpu")


def test_mp_state_with_irqchip(vm):
    vm.create_irqchip()
    vcpu = vm.create_vcpu()
    vcpu.set_mp_state(3)
    assert vcpu.get_mp_state() == 3


def test_cpuid_table_seen_by_guest(kvm, vm):
    entries = kvm.supported_cpuid()
    entries = [e for e in entries if e.function != 0x40000000]
    sig = [int.from_bytes(b"pyvmmtest\0\0\0"[i: i + 4], "little") for i in (0, 4, 8)]
    entries.append(CpuidEntry(0x40000000, eax=0x40000001, ebx=sig[0], ecx=sig[1], edx=sig[2]))
    vcpu = guest(vm, """
        mov $0x40000000, %eax
        cpuid
        hlt
    """)
    vcpu.set_cpuid(entries)
    leaf = [e for e in vcpu.get_cpuid() if e.function == 0x40000000]
    assert len(leaf) == 1 and leaf[0].ebx == sig[0]
    expect(vcpu, exits.HltExit)
    r = vcpu.get_regs()
    sig = b"".join((x & 0xFFFFFFFF).to_bytes(4, "little") for x in (r.rbx, r.rcx, r.rdx))
    assert sig == b"pyvmmtest\0\0\0"


def test_no_smm_on_this_host(kvm, vm):
    vcpu = guest(vm, "hlt")
    expect(vcpu, exits.HltExit)
    assert vcpu.in_smm is False
    if vm.check_extension(Cap.X86_SMM):
        pytest.skip("this KVM has SMM: smi() is expected to work (the nested runner tests it)")
    with pytest.raises(MissingCapability) as info:
        vcpu.smi()
    err = info.value
    assert isinstance(err, KvmError)
    assert err.cap == Cap.X86_SMM and "X86_SMM" in str(err)
    assert (err.ioctl, err.role) == ("KVM_SMI", "vcpu")


def test_stats_count_exits(vm):
    vcpu = guest(vm, """
        xor %al, %al
    1:  out %al, $0x10
        inc %al
        cmp $20, %al
        jne 1b
        hlt
    """)
    before = vcpu.stats()
    assert {"exits", "halt_exits", "io_exits", "mmio_exits"} <= before.keys()
    n = 0
    while not isinstance(vcpu.run(timeout=5), exits.HltExit):
        n += 1
    after = vcpu.stats()
    assert n == 20
    delta = after["exits"] - before["exits"]
    # Every exit to userspace is a VM exit; the kernel may take a few more of its own
    # (interrupts, first-touch page faults).
    assert n + 1 <= delta <= n + 1 + 20, delta
    assert after["halt_exits"] - before["halt_exits"] == 1
    # Histograms come as lists when asked for.
    assert any(isinstance(v, list) for v in vcpu.stats(histograms=True).values())


def test_real_mode_helper_sanity(vm):
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu()
    real_mode(vcpu, rip=0x2000, rbx=5)
    assert vcpu.get_regs().rip == 0x2000 and vcpu.get_regs().rbx == 5


def test_complete_io_finishes_an_in_without_running_the_guest(vm):
    """After an IN exit KVM stores the data into AL and moves RIP on the next KVM_RUN;
    complete_io() makes that happen without executing another guest instruction."""
    vcpu = guest(vm, "in $0x10, %al\nout %al, $0x11\nhlt")
    ex = expect(vcpu, exits.IoExit)
    assert not ex.is_write and ex.port == 0x10
    ex.data[:] = b"\x42"
    vcpu.complete_io()
    regs = vcpu.get_regs()
    assert regs.rax & 0xFF == 0x42
    assert regs.rip == LOAD + 2          # past the 2-byte IN, not past the OUT
    assert vcpu.stats()["exits"] >= 1
    out = expect(vcpu, exits.IoExit)     # the guest goes on at the OUT
    assert out.port == 0x11 and out.data == b"\x42"
