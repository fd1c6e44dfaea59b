# SPDX-License-Identifier: GPL-2.0-or-later
# pc_testdev: a guest drives QEMU's pc-testdev as kvm-unit-tests does.
#   tag 1: 32-bit scratch at 0xe0 after outl 0x12345678 and outb 0xab to 0xe1 (0x1234ab78)
#   tag 2: inw from 0xe2 (0x1234)          tag 3: inl from 0xe8, the same register
#   tag 4: 64-bit read of the iomem MMIO at 0xff000010 after two 32-bit writes
#   tag 5: the flush-page port: a page written, flushed through 0xe4, read back (0x5a5a5a5a)
#   tag 6/7: the LAPIC's IRR bit of vector 0x40 before/after raising IRQ line 14 through
#            port 0x200e, the IOAPIC's pin 14 programmed (level, vector 0x40, APIC 0)
#   tag 8: the IOAPIC entry's remote IRR bit after the line is lowered (the interrupt is
#          still unacknowledged: 1)
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set LAPIC, 0xfee00000
    .set IOAPIC, 0xfec00000
    .set VECTOR, 0x40
    .set LINE, 14

    .text
    .code64
    .globl start
start:
    movl $0x12345678, %eax
    outl %eax, $0xe0
    movb $0xab, %al
    outb %al, $0xe1
    inl $0xe0, %eax
    REPORT %eax, $1
    xorl %eax, %eax
    inw $0xe2, %ax
    REPORT %eax, $2
    inl $0xe8, %eax
    REPORT %eax, $3

    movl $0xff000000, %esi          # above 2 GiB: through a register (zero-extended)
    movl $0x11223344, 0x10(%rsi)
    movl $0x55667788, 0x14(%rsi)
    movq 0x10(%rsi), %rax
    movl $4, %ebx
    REPORT_RAX

    movl $0x5a5a5a5a, flushme
    movl $flushme, %eax
    outl %eax, $0xe4
    movl flushme, %eax
    REPORT %eax, $5

    # Interrupts reach the LAPIC only: mask both 8259s, enable the LAPIC (SVR), keep IF=0.
    cli
    movb $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    movl $LAPIC, %esi
    movl $IOAPIC, %edi
    movl $0x1ff, 0xf0(%rsi)
    movl $(0x10 + 2 * LINE + 1), (%rdi)
    movl $0, 0x10(%rdi)
    movl $(0x10 + 2 * LINE), (%rdi)
    movl $(VECTOR | 0x8000), 0x10(%rdi)
    movl 0x200 + (VECTOR / 32) * 0x10(%rsi), %eax
    andl $(1 << (VECTOR % 32)), %eax
    REPORT %eax, $6
    movw $(0x2000 + LINE), %dx
    movb $1, %al
    outb %al, %dx
    movl 0x200 + (VECTOR / 32) * 0x10(%rsi), %eax
    andl $(1 << (VECTOR % 32)), %eax
    REPORT %eax, $7
    movw $(0x2000 + LINE), %dx
    movb $0, %al
    outb %al, %dx
    movl $(0x10 + 2 * LINE), (%rdi)
    movl 0x10(%rdi), %eax
    shrl $14, %eax
    andl $1, %eax
    REPORT %eax, $8
    DONE $0

    .data
    .balign 4096
flushme:
    .fill 4096, 1, 0
