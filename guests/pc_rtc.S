# SPDX-License-Identifier: GPL-2.0-or-later
# pc_rtc: a guest reads the CMOS clock and bytes through 0x70/0x71, waits for an update
# cycle as kvm-unit-tests' s3 does (UIP rises, then falls), then takes the update-ended
# interrupt on IRQ 8 through the IOAPIC into its LAPIC.
#   tag 1: register B   tag 2: register D   tags 3-9: seconds, minutes, hours, day of month,
#   month, year, century (BCD)   tag 10: 1 when UIP was seen rising and falling
#   tag 11: CMOS 0x34-0x35 (RAM above 16 MiB, 64 KiB units)   tag 12: CMOS 0x5f (CPUs - 1)
#   tag 13: the LAPIC's IRR bit of vector 0x41 after UIE was enabled   tag 14: register C
# It ends through isa-debug-exit, which stops the APs too (they are never started).
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set LAPIC, 0xfee00000
    .set IOAPIC, 0xfec00000
    .set VECTOR, 0x41

# AL = CMOS register `reg` (clobbers AL only).
.macro CMOS_READ reg
    movb $\reg, %al
    outb %al, $0x70
    inb $0x71, %al
.endm

.macro CMOS_REPORT reg, tag
    xorl %eax, %eax
    CMOS_READ \reg
    REPORT %eax, \tag
.endm

    .text
    .code64
    .globl start
start:
    CMOS_REPORT 0x0b, $1
    CMOS_REPORT 0x0d, $2
    CMOS_REPORT 0x00, $3
    CMOS_REPORT 0x02, $4
    CMOS_REPORT 0x04, $5
    CMOS_REPORT 0x07, $6
    CMOS_REPORT 0x08, $7
    CMOS_REPORT 0x09, $8
    CMOS_REPORT 0x32, $9

    movl $20000000, %ecx
1:  CMOS_READ 0x0a
    testb $0x80, %al
    jnz 2f
    decl %ecx
    jnz 1b
    jmp 4f
2:  CMOS_READ 0x0a
    testb $0x80, %al
    jz 3f
    decl %ecx
    jnz 2b
    jmp 4f
3:  REPORT $1, $10
    jmp 5f
4:  REPORT $0, $10
5:
    xorl %eax, %eax
    CMOS_READ 0x35
    shll $8, %eax
    CMOS_READ 0x34
    REPORT %eax, $11
    CMOS_REPORT 0x5f, $12

    cli
    movb $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    movl $LAPIC, %esi
    movl $IOAPIC, %edi
    movl $0x1ff, 0xf0(%rsi)
    movl $(0x10 + 2 * 8 + 1), (%rdi)
    movl $0, 0x10(%rdi)
    movl $(0x10 + 2 * 8), (%rdi)
    movl $VECTOR, 0x10(%rdi)            # edge, active high, unmasked, to APIC 0
    CMOS_READ 0x0c                      # clear pending flags
    CMOS_READ 0x0b
    orb $0x10, %al                      # UIE
    movb %al, %ah
    movb $0x0b, %al
    outb %al, $0x70
    movb %ah, %al
    outb %al, $0x71
    movl $50000000, %ecx
6:  movl 0x200 + (VECTOR / 32) * 0x10(%rsi), %eax
    andl $(1 << (VECTOR % 32)), %eax
    jnz 7f
    decl %ecx
    jnz 6b
7:  shrl $(VECTOR % 32), %eax
    REPORT %eax, $13
    CMOS_REPORT 0x0c, $14
    movl $0, %eax                       # isa-debug-exit: ends every vCPU's run (status 1)
    outl %eax, $0xf4
    FAIL $1
