# SPDX-License-Identifier: GPL-2.0-or-later
# state_user: the work of state.inc at CPL3 (native on kvm_pvm) with SSE registers live too.
# Parameter: RCX, the number of steps (hundreds of millions take a fraction of a second).
# pyvmm: mode=long64-user load=0x1000 entry=start
.include "pyvmm.inc"
.include "state.inc"

    .text
    .code64
    .globl start
start:
    xorl %r10d, %r10d
    STATE_WORK 1
