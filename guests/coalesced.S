# SPDX-License-Identifier: GPL-2.0-or-later
# coalesced: a burst of guest writes for coalesced MMIO/PIO zones (64-bit, CPL0).
#   RCX  number of writes (0: none)
#   R8   0: 4-byte MMIO stores (`movl`) of the value to RDI, RDI += R9 after each
#        1: first one store of each size to RDI: 1 byte 0x12 at +0, 2 bytes 0x3456 at +2,
#           4 bytes 0x789abcde at +4, 8 bytes 0x0123456789abcdef at +8; then as mode 0
#        2: 4-byte port writes (`outl`) of the value to port DX
#   R10  the first value written; each write adds 1
#   R11  a status port (0: none): after the burst, a 4-byte IN from it, reported (tag 1)
#   then DONE 0
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .text
    .code64
    .globl start
start:
    movl %r10d, %eax
    cmpq $1, %r8
    jne 1f
    movb $0x12, (%rdi)
    movw $0x3456, 2(%rdi)
    movl $0x789abcde, 4(%rdi)
    movabsq $0x0123456789abcdef, %rbx
    movq %rbx, 8(%rdi)
1:  testq %rcx, %rcx
    jz 4f
2:  cmpq $2, %r8
    je 3f
    movl %eax, (%rdi)
    addq %r9, %rdi
    incl %eax
    decq %rcx
    jnz 2b
    jmp 4f
3:  outl %eax, %dx
    incl %eax
    decq %rcx
    jnz 3b
4:  testq %r11, %r11
    jz 5f
    movq %r11, %rdx
    inl %dx, %eax
    movl $1, %ebx
    REPORT_RAX
5:  DONE $0
