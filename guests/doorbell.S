# SPDX-License-Identifier: GPL-2.0-or-later
# doorbell: ring a PIO or MMIO doorbell RCX times from 64-bit kernel mode (CPL0).
# Parameters and the report: see doorbell.inc. On kvm_pvm, CPL0 code is emulated, so each ring
# also pays for emulating the loop's instructions; doorbell_user runs the same loop natively.
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"
.include "doorbell.inc"

    .text
    .code64
    .globl start
start:
    DOORBELL_LOOP
