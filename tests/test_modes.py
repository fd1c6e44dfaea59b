# SPDX-License-Identifier: GPL-2.0-or-later
"""CPU modes: the `modes` payload switches real16 -> prot32 -> long64 -> CPL3 itself and reports
a value computed in each; small payloads started directly in each mode check the state the
host set up (segments, control registers, stack, SSE, the TSS I/O bitmap and RSP0, the
exception stubs)."""

from __future__ import annotations

import pytest

from pyvmm import guests
from pyvmm.guests import layout, ucall


def test_modes_payload_switches_and_computes(kvm):
    r = guests.run("modes", kvm=kvm, timeout=20)
    assert r.ok, str(r)
    assert r.console == "real16 prot32 long64 user3\n"
    got = [(rep.tag, rep.value64, rep.regs["rcx"]) for rep in r.reports]
    assert got == [
        (16, sum(range(1, 101)), 0),                    # real mode
        (32, 479001600, 0),                             # 12!, 32-bit protected mode
        (64, 2432902008176640000, 0),                   # 20!, 64-bit at CPL0
        (3, sum(range(1, 100001)), 3),                  # 64-bit sum at CPL3
    ]
    assert r.reports[0].value == 5050
    # 32-bit value of the long-mode reports is the low half of RAX
    assert r.reports[2].value == 2432902008176640000 & 0xFFFFFFFF


def test_real16_start_state(kvm, payload_source):
    body = """
    movl %cr0, %eax
    movw %ss, %cx
    movw %sp, %dx
    movw %cs, %si
    REPORT_RAX
    DONE
    """
    r = guests.run(payload_source(mode="real16", body=body), kvm=kvm)
    assert r.ok, str(r)
    rep = r.reports[0]
    assert rep.value & 1 == 0                              # CR0.PE clear
    assert rep.regs["rcx"] == layout.REAL_MODE_SS and rep.regs["rdx"] == layout.REAL_MODE_SP
    assert rep.regs["rsi"] == 0


def test_prot32_start_state(kvm, payload_source):
    body = """
    movl %cr0, %eax
    movl %cr4, %ecx
    movw %cs, %dx
    movl %esp, %esi
    movw %ds, %di
    REPORT_RAX
    movl $0x12345678, 0x100000   # flat data segment reaches 1 MiB
    movl 0x100000, %eax
    REPORT_RAX
    DONE
    """
    r = guests.run(payload_source(mode="prot32", body=body), kvm=kvm)
    assert r.ok, str(r)
    regs = r.reports[0].regs
    assert r.reports[0].value & 0x80000001 == 1            # PE, no paging
    assert regs["rcx"] & 0x600 == 0x600                    # OSFXSR | OSXMMEXCPT
    assert regs["rdx"] == layout.SEL_CODE32 and regs["rdi"] == layout.SEL_DATA
    assert regs["rsi"] == layout.STACK_TOP
    assert r.reports[1].value == 0x12345678


def test_long64_start_state_and_sse(kvm, payload_source):
    body = """
    movq %cr0, %rax
    movq %cr4, %rcx
    movq %cr3, %rdx
    movw %cs, %si
    movq %rsp, %rdi
    REPORT_RAX
    movdqu vec, %xmm0            # SSE needs CR4.OSFXSR (else #UD)
    movdqu %xmm0, copy           # moves only: CPL0 is emulated on kvm_pvm, and KVM's
    movq copy+8, %rax            # emulator has no SSE arithmetic (paddq is an emulation
    REPORT_RAX                   # failure, InternalErrorExit suberror 1)
    movl $0xd0000000, %edi       # MMIO above RAM is mapped (identity, 2 MiB pages)
    movl (%rdi), %eax
    REPORT_RAX
    DONE
    """
    data = "vec: .quad 0, 42\ncopy: .quad 0, 0"

    def handler(ex, vcpu):
        assert ex.address == 0xD0000000 and not ex.is_write
        ex.data[:] = (0xFEEDC0DE).to_bytes(len(ex.data), "little")

    r = guests.run(payload_source(body, mode="long64", data=data), kvm=kvm, handler=handler)
    assert r.ok, str(r)
    regs = r.reports[0].regs
    assert regs["rax"] & 0x80000001 == 0x80000001          # PG | PE
    assert regs["rcx"] & 0x620 == 0x620                    # PAE | OSFXSR | OSXMMEXCPT
    assert regs["rdx"] == layout.PML4
    assert regs["rsi"] == layout.SEL_CODE64 and regs["rdi"] == layout.STACK_TOP
    assert r.reports[1].value64 == 42
    assert r.reports[2].value64 == 0xFEEDC0DE


def test_long64_user_start_state(kvm, payload_source):
    """CPL3 from the first instruction: PIO works through the TSS I/O bitmap, SSE works."""
    body = """
    movw %cs, %ax
    movw %ss, %cx
    movq %rsp, %rdx
    REPORT_RAX
    movq $5, %rax
    movq %rax, %xmm1
    paddq %xmm1, %xmm1
    movq %xmm1, %rax
    REPORT_RAX
    movw $0x1234, %dx            # a port no one else uses: allowed by the bitmap
    inb %dx, %al
    REPORT %eax
    DONE
    """

    def handler(ex, vcpu):
        assert ex.port == 0x1234 and not ex.is_write
        ex.data[:] = b"\x5a"

    r = guests.run(payload_source(body), kvm=kvm, handler=handler)
    assert r.ok, str(r)
    regs = r.reports[0].regs
    # CPL3 in CS and SS. The selector values read by the guest are ours (0x2b/0x23) on stock
    # KVM; kvm_pvm runs CPL3 code natively with the host's user selectors (0x33/0x2b), so
    # only the RPL is portable.
    assert regs["rax"] & 3 == 3 and regs["rcx"] & 3 == 3
    assert (regs["rax"], regs["rcx"]) in ((layout.SEL_UCODE64, layout.SEL_UDATA), (0x33, 0x2B))
    assert regs["rdx"] == layout.STACK_TOP
    assert r.reports[1].value64 == 10
    assert r.reports[2].value == 0x5A


def test_user_fault_reaches_host_stubs(kvm, payload_source):
    """HLT at CPL3 is #GP: the CPU switches to TSS.RSP0 and the host's stub reports it."""
    p = guests.build(payload_source("nop\n.globl here\nhere: hlt\n"))
    r = guests.run(p, kvm=kvm)
    assert r.stop_reason == "fault", str(r)
    fault = r.events[-1]
    assert isinstance(fault, ucall.Fault)
    assert (fault.vector, fault.name, fault.error_code) == (13, "#GP", 0)
    assert fault.rip == p.symbol("here")
    assert "#GP" in r.detail


def test_user_page_fault(kvm, payload_source):
    body = "movabsq $0x100000000, %rdi\n.globl here\nhere: movl $1, (%rdi)\n"
    p = guests.build(payload_source(mode="long64-user", body=body))
    r = guests.run(p, kvm=kvm)
    fault = r.events[-1]
    assert r.stop_reason == "fault", str(r)
    # not present, write, user: the identity map stops at 4 GiB
    assert (fault.vector, fault.error_code, fault.cr2) == (14, 0x6, 0x100000000)
    assert fault.rip == p.symbol("here")


def test_kernel_ud2(kvm, payload_source):
    p = guests.build(payload_source(mode="long64", body="nop\n.globl here\nhere: ud2\n"))
    r = guests.run(p, kvm=kvm)
    fault = r.events[-1]
    assert (r.stop_reason, fault.vector, fault.name, fault.rip) == \
        ("fault", 6, "#UD", p.symbol("here"))


def test_prot32_exception_is_shutdown(kvm, payload_source):
    """prot32 and real16 have no IDT from the host: an exception is a triple fault."""
    r = guests.run(payload_source(mode="prot32", body="ud2"), kvm=kvm)
    assert r.stop_reason == "shutdown" and r.exits == {"ShutdownExit": 1}


def test_setup_vcpu_regs_and_rsp(kvm, payload_source):
    body = "movq %rsp, %rax\nREPORT_RAX\nmovq %r9, %rax\nREPORT_RAX\nDONE"
    p = guests.build(payload_source(mode="long64", body=body))
    with kvm.create_vm() as vm:
        p.create_memory(vm)
        p.load(vm)
        vcpu = vm.create_vcpu()
        p.setup_vcpu(vcpu, rsp=0x70000, regs={"r9": 0xABCDEF0123})
        result = guests.run_loop(vcpu, guests.GuestResult(p.name))
    assert [r.value64 for r in result.reports] == [0x70000, 0xABCDEF0123]
    with pytest.raises(ValueError, match="unknown mode"):
        guests.modes.setup_vcpu(vcpu, "vm86", 0)
