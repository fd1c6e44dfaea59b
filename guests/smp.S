# SPDX-License-Identifier: GPL-2.0-or-later
# smp: N vCPUs compute 1 + 2 + ... + K together in 64-bit kernel mode (CPL0), adding to
# shared memory with `lock` instructions and each ringing its own doorbell (see smp.inc for
# the work, the reports and what the host checks).
#
# Parameters (registers set by the host on every vCPU it starts):
#   RDI  N, the number of vCPUs          RSI  K              R8  the doorbell port
#   R9   how the APs start:
#        0  the host started every vCPU here (set_mp_state RUNNABLE with the in-kernel
#           irqchip); R10 = this vCPU's id
#        1  only the BSP starts here; it sends INIT-SIPI-SIPI to all the others through its
#           local APIC (needs the in-kernel irqchip). The APs wake in real mode at
#           ap_start16 (CS = vector << 8), switch to long mode themselves with the host's GDT
#           and page tables, take their id from the local APIC ID register and a stack of
#           their own (PYVMM_STACK_TOP - id * 0x1000).
# CPL0 code is emulated one instruction at a time on kvm_pvm: keep K in the thousands.
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"
.include "smp.inc"

    .set LAPIC, 0xfee00000
    .set LAPIC_ID, 0x20
    .set LAPIC_SVR, 0xf0
    .set LAPIC_ICR_LO, 0x300
    .set LAPIC_ICR_HI, 0x310
    .set ICR_ALL_BUT_SELF, 0xc0000      # destination shorthand
    .set ICR_ASSERT, 0x4000
    .set ICR_INIT, 0x500
    .set ICR_STARTUP, 0x600
    .set ICR_PENDING, 0x1000            # delivery status
    .set AP_STACK_SIZE, 0x1000

    .text
    .code64
    .globl start
start:
    movq %rdi, %r14                     # N
    movq %r10, %r13                     # id (host start)
    cmpq $1, %r9
    jne work
    xorl %r13d, %r13d                   # the BSP is vCPU 0
    movq %rdi, smp_n(%rip)              # what the APs will need
    movq %rsi, smp_k(%rip)
    movq %r8, smp_port(%rip)

    movl $LAPIC, %edi
    movl $0x1ff, LAPIC_SVR(%rdi)        # software-enable the local APIC
    movl $0, LAPIC_ICR_HI(%rdi)
    movl $(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT), LAPIC_ICR_LO(%rdi)
    call icr_wait
    leaq ap_start16(%rip), %rax         # the SIPI vector: the trampoline's page number
    shrl $12, %eax
    orl $(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP), %eax
    movl %eax, LAPIC_ICR_LO(%rdi)       # SIPI, and a second one as the MP spec says
    call icr_wait
    movl %eax, LAPIC_ICR_LO(%rdi)
    call icr_wait

work:
    SMP_WORK

icr_wait:                               # until the local APIC has sent the IPI
    testl $ICR_PENDING, LAPIC_ICR_LO(%rdi)
    jnz icr_wait
    ret

# ---- the AP trampoline: real mode, CS = page number << 8, IP = 0
    .balign 4096
    .code16
    .globl ap_start16
ap_start16:
    cli
    movw $(PYVMM_GDTR >> 4), %ax        # the host's GDTR image (limit, base) in the system area
    movw %ax, %ds
    lgdtl PYVMM_GDTR & 0xf
    movl %cr0, %eax
    orl $PYVMM_CR0_PE, %eax
    movl %eax, %cr0
    ljmpl $PYVMM_SEL_CODE32, $ap_prot32

    .code32
ap_prot32:
    movw $PYVMM_SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    ENTER_LONG64 ap_long64

    .code64
ap_long64:
    lidt PYVMM_IDTR                     # exceptions go to the host's reporting stubs
    movl $LAPIC, %eax
    movl LAPIC_ID(%rax), %r13d
    shrl $24, %r13d                     # our id
    movl %r13d, %eax
    imull $AP_STACK_SIZE, %eax
    movl $PYVMM_STACK_TOP, %esp
    subl %eax, %esp
    movq smp_n(%rip), %r14
    movq smp_k(%rip), %rsi
    movq smp_port(%rip), %r8
    jmp work

    SMP_DATA
smp_n:    .quad 0
smp_k:    .quad 0
smp_port: .quad 0
