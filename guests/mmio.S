# SPDX-License-Identifier: GPL-2.0-or-later
# mmio: MMIO exits in 64-bit mode (CPL0).
#   stores of 1, 2, 4, 8 bytes to MMIO_BASE+0, +2, +4, +8 (unbacked guest-physical memory):
#     0x12, 0x3456, 0x789abcde, 0x0123456789abcdef
#   loads of 1, 2, 4, 8 bytes from MMIO_BASE+16, +18, +20, +24, each reported (tags 1, 2, 4, 8;
#     the full value in RAX)
#   RO_BASE: a read-only memslot the host adds and fills: a load (tag 0x10), a store of
#     0x0badc0de (an MMIO write exit; memory unchanged), and a load again (tag 0x11)
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set MMIO_BASE, 0xd0000000
    .set RO_BASE, 0x200000
    .globl MMIO_BASE, RO_BASE

    .text
    .code64
    .globl start
start:
    movl $MMIO_BASE, %edi           # zero-extends: 0x00000000d0000000
    movb $0x12, (%rdi)
    movw $0x3456, 2(%rdi)
    movl $0x789abcde, 4(%rdi)
    movabsq $0x0123456789abcdef, %rax
    movq %rax, 8(%rdi)

    movzbl 16(%rdi), %eax
    movl $1, %ebx
    REPORT_RAX
    movzwl 18(%rdi), %eax
    movl $2, %ebx
    REPORT_RAX
    movl 20(%rdi), %eax
    movl $4, %ebx
    REPORT_RAX
    movq 24(%rdi), %rax
    movl $8, %ebx
    REPORT_RAX

    movl $RO_BASE, %esi
    movl (%rsi), %eax
    movl $0x10, %ebx
    REPORT_RAX
    movl $0x0badc0de, (%rsi)
    movl (%rsi), %eax
    movl $0x11, %ebx
    REPORT_RAX
    DONE $0
