# SPDX-License-Identifier: GPL-2.0-or-later
# pc_acpi: a guest finds the ACPI tables as kvm-unit-tests' lib/acpi.c does (the RSDP on a
# 16-byte boundary in 0xe0000-0xfffff, its RSDT, the FACP among the RSDT's tables), reads
# the PM timer at the port the FADT gives, then powers the machine off through PM1a control
# (SLP_TYP 0 = S5, SLP_EN).
#   tag 1: the RSDP's address   tag 2: the RSDT's   tag 3: the FADT's   tag 4: PM_TMR_BLK
#   tag 5: PM timer ticks between two reads (24-bit)   tag 6: PM1A_CNT_BLK
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .text
    .code64
    .globl start
start:
    movl $0xe0000, %esi
    movabsq $0x2052545020445352, %rbx     # "RSD PTR "
1:  cmpq %rbx, (%rsi)
    je 2f
    addl $16, %esi
    cmpl $0x100000, %esi
    jb 1b
    FAIL $1
2:  REPORT %esi, $1
    movl 16(%rsi), %edi                   # RsdtAddress
    REPORT %edi, $2
    movl 4(%rdi), %ecx                    # RSDT length
    leal (%rdi, %rcx), %r8d
    leal 36(%rdi), %r9d
3:  cmpl %r8d, %r9d
    jae 9f
    movl (%r9), %eax
    cmpl $0x50434146, (%rax)              # "FACP"
    je 4f
    addl $4, %r9d
    jmp 3b
4:  movl %eax, %r10d
    REPORT %eax, $3
    movl 76(%r10), %edx                   # PM_TMR_BLK
    REPORT %edx, $4
    movl 76(%r10), %edx
    inl %dx, %eax
    movl %eax, %r11d
    inl %dx, %eax
    subl %r11d, %eax
    andl $0xffffff, %eax
    REPORT %eax, $5
    movl 64(%r10), %edx                   # PM1A_CNT_BLK
    REPORT %edx, $6
    movl 64(%r10), %edx
    movw $0x2000, %ax                     # SLP_EN, SLP_TYP 0
    outw %ax, %dx
    FAIL $2                               # not reached: the machine is off
9:  FAIL $3
