# SPDX-License-Identifier: GPL-2.0-or-later
# pingpong: a virtio-like notify/complete cycle, RCX times. Each round the guest rings a PIO
# doorbell (an ioeventfd on the host), then waits in `sti; hlt` until the device's interrupt
# (an irqfd on IOAPIC pin R9, vector 0x40) arrives; the handler counts it and sends EOI.
# Needs the in-kernel irqchip. Parameters: RCX rounds, R8 doorbell port, R9 IOAPIC pin.
# Reports (tag 0x99) the interrupts handled, with the TSC cycles of the whole loop in RCX.
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set VECTOR, 0x40
    .set LAPIC_SVR, 0xfee000f0
    .set LAPIC_EOI, 0xfee000b0
    .set IOAPIC, 0xfec00000

    .text
    .code64
    .globl start
start:
    movq %rcx, %r12                 # rounds wanted
    movb $0xff, %al                 # mask both 8259s, or IRQs also arrive as ExtINT
    outb %al, $0x21
    outb %al, $0xa1
    movl $LAPIC_SVR, %eax           # software-enable the local APIC
    movl $0x1ff, (%rax)
    movl $IOAPIC, %edi              # redirection entry of pin R9: fixed, physical, edge,
    leal 0x10(,%r9d,2), %eax        # unmasked, vector VECTOR, to APIC 0
    movl %eax, (%rdi)
    movl $VECTOR, 0x10(%rdi)
    incl %eax
    movl %eax, (%rdi)
    movl $0, 0x10(%rdi)

    leaq irq_handler(%rip), %rax    # a 64-bit interrupt gate for VECTOR
    movl $PYVMM_IDT + VECTOR * 16, %edi
    movw %ax, (%rdi)
    movw $PYVMM_SEL_CODE64, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    movl $0, 12(%rdi)
    lidt idtr(%rip)

    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r14                 # start TSC
    xorl %r13d, %r13d               # rounds done
    testq %r12, %r12
    jz finish
round:
    cli
    movw %r8w, %dx
    outb %al, %dx                   # notify
    sti
    hlt                             # STI's shadow: the interrupt cannot slip in before HLT
    cli
    incq %r13
    cmpq irq_count(%rip), %r13      # exactly one interrupt per round
    jne mismatch
    cmpq %r12, %r13
    jb round
finish:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq %r14, %rax
    movq %rax, %rcx                 # cycles
    movq irq_count(%rip), %rax
    movl $0x99, %ebx
    REPORT_RAX
    DONE
mismatch:
    movq irq_count(%rip), %rsi
    FAIL $0x9901

irq_handler:
    pushq %rax
    incq irq_count(%rip)
    movl $LAPIC_EOI, %eax
    movl $0, (%rax)
    popq %rax
    iretq

    .data
    .balign 8
irq_count:
    .quad 0
idtr:
    .word VECTOR * 16 + 15
    .quad PYVMM_IDT
