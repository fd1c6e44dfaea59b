# SPDX-License-Identifier: GPL-2.0-or-later
# slotmove: reads two guest-physical addresses once per step while the host moves a memslot
# between the steps (64-bit, CPL0: a dozen instructions a step).
#   in:  RCX = steps, RDI = first address, RSI = second address
#   each step n: OUT n (32-bit) to SLOTMOVE_PORT_STEP (the host moves the slot there), then
#     the u64 at RDI is reported with tag n and the u64 at RSI with tag 0x100+n (full value
#     in RAX; an address no slot holds is an MMIO read the host answers)
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set SLOTMOVE_PORT_STEP, 0x510
    .globl SLOTMOVE_PORT_STEP

    .text
    .code64
    .globl start
start:
    xorl %ebp, %ebp
    movw $SLOTMOVE_PORT_STEP, %dx
1:  movl %ebp, %eax
    outl %eax, %dx
    movq (%rdi), %rax
    movl %ebp, %ebx
    REPORT_RAX
    movq (%rsi), %rax
    leal 0x100(%rbp), %ebx
    REPORT_RAX
    incl %ebp
    cmpl %ecx, %ebp
    jb 1b
    DONE $0
