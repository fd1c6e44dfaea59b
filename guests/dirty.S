# SPDX-License-Identifier: GPL-2.0-or-later
# dirty: keeps writing memory, for live migration. At CPL3 (native on kvm_pvm) it makes RCX
# writes into a buffer of RDI pages at RSI (guest-physical = virtual, identity-mapped),
# visiting page (i * 7) mod RDI at step i, adding the step number to a qword of that page
# picked by the step number, and spins RDX times between two writes (the dirtying rate).
# Then it sums every qword of the buffer. Reports (tag in EBX): 1 the buffer's sum, 2 the sum
# of the step numbers, then done. RDI must not be a multiple of 7.
# pyvmm: mode=long64-user load=0x1000 entry=start
.include "pyvmm.inc"

    .text
    .code64
    .globl start
start:
    xorl %r10d, %r10d               # page index
    xorl %eax, %eax                 # sum of the steps
    movl $1, %r8d                   # step number
1:  movq %r10, %r11
    shlq $12, %r11
    addq %rsi, %r11
    movq %r8, %r9
    andl $0xff8, %r9d
    addq %r9, %r11
    addq %r8, (%r11)
    addq %r8, %rax
    addq $7, %r10
2:  cmpq %rdi, %r10
    jb 3f
    subq %rdi, %r10
    jmp 2b
3:  movq %rdx, %r12
    testq %r12, %r12
    jz 5f
4:  decq %r12
    jnz 4b
5:  incq %r8
    decq %rcx
    jnz 1b

    movq %rax, %r13                 # the steps' sum, kept
    xorl %eax, %eax
    movq %rsi, %r11
    movq %rdi, %rcx
    shlq $9, %rcx                   # qwords in the buffer
6:  addq (%r11), %rax
    addq $8, %r11
    decq %rcx
    jnz 6b
    movl $1, %ebx
    REPORT_RAX
    movq %r13, %rax
    movl $2, %ebx
    REPORT_RAX
    DONE $0
