# SPDX-License-Identifier: GPL-2.0-or-later
# slotspin_user: spins reading a memslot the host changes while the vCPU runs (64-bit CPL3,
# native where CPL0 is emulated).
#   in:  RDI = the watched address, RSI = the u64 the host put there
#   phase 1: read (RDI) until it is not RSI any more (the slot was moved away or deleted:
#     an MMIO read), report that value with tag 1
#   phase 2: read (RDI) until it is RSI again (the slot is back), report it with tag 2, DONE
#   `spins`: two u64 counters of the loop iterations of phase 1 and phase 2
# pyvmm: mode=long64-user load=0x1000 entry=start
.include "pyvmm.inc"

    .text
    .code64
    .globl start
start:
1:  incq spins(%rip)
    movq (%rdi), %rax
    cmpq %rsi, %rax
    je 1b
    movl $1, %ebx
    REPORT_RAX
2:  incq spins+8(%rip)
    movq (%rdi), %rax
    cmpq %rsi, %rax
    jne 2b
    movl $2, %ebx
    REPORT_RAX
    DONE $0

    .data
    .balign 8
    .globl spins
spins:
    .quad 0, 0
