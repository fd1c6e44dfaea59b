# SPDX-License-Identifier: GPL-2.0-or-later
# state: the work of state.inc at CPL0 (emulated one instruction at a time on kvm_pvm: keep
# RCX in the thousands), general registers and stack only (SSE arithmetic at CPL0 is not
# emulated there). Parameter: RCX, the number of steps.
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"
.include "state.inc"

    .text
    .code64
    .globl start
start:
    xorl %r10d, %r10d
    STATE_WORK 0
