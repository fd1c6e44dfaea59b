# SPDX-License-Identifier: GPL-2.0-or-later
# doorbell_user: the doorbell loop of doorbell.S as a 64-bit user-mode (CPL3) program, which
# runs natively even where CPL0 code is emulated. Port I/O is allowed by the TSS I/O bitmap.
# pyvmm: mode=long64-user load=0x1000 entry=start
.include "pyvmm.inc"
.include "doorbell.inc"

    .text
    .code64
    .globl start
start:
    DOORBELL_LOOP
