# SPDX-License-Identifier: GPL-2.0-or-later
# pio: port I/O exits in 64-bit mode (CPL0).
#   OUT 1, 2, 4 bytes to PIO_PORT: 0x11, 0x2233, 0x44556677
#   IN 1, 2, 4 bytes from PIO_PORT, each value reported back (tags 1, 2, 4)
#   rep outsb of "pyvmm" (5 bytes) to PIO_STR_OUT
#   rep insw of 3 words from PIO_STR_IN into in_words, reported as one 64-bit RAX (tag 6)
#   the host also reads in_words by symbol
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set PIO_PORT, 0x500
    .set PIO_STR_OUT, 0x501
    .set PIO_STR_IN, 0x502
    .globl PIO_PORT, PIO_STR_OUT, PIO_STR_IN

    .text
    .code64
    .globl start
start:
    movw $PIO_PORT, %dx
    movb $0x11, %al
    outb %al, %dx
    movw $0x2233, %ax
    outw %ax, %dx
    movl $0x44556677, %eax
    outl %eax, %dx

    xorl %eax, %eax
    inb %dx, %al
    REPORT %eax, $1
    movw $PIO_PORT, %dx
    xorl %eax, %eax
    inw %dx, %ax
    REPORT %eax, $2
    movw $PIO_PORT, %dx
    inl %dx, %eax
    REPORT %eax, $4

    cld
    movw $PIO_STR_OUT, %dx
    movl $out_str, %esi
    movl $5, %ecx
    rep outsb

    movw $PIO_STR_IN, %dx
    movl $in_words, %edi
    movl $3, %ecx
    rep insw
    movq in_words, %rax
    movl $6, %ebx
    REPORT_RAX
    DONE $0

    .section .rodata
out_str:
    .ascii "pyvmm"

    .data
    .globl in_words
    .balign 8
in_words:
    .quad 0
