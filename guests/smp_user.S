# SPDX-License-Identifier: GPL-2.0-or-later
# smp_user: the work of smp.S in 64-bit user mode (CPL3), which runs natively on kvm_pvm, so
# K can be large and the `lock` updates of the vCPUs really race on the host's cores. The
# host starts every vCPU here (Machine.load(..., start_aps=True)); CPL3 cannot send IPIs.
# Parameters: RDI N, RSI K, R8 the doorbell port, R10 this vCPU's id (see smp.inc).
# pyvmm: mode=long64-user load=0x1000 entry=start
.include "pyvmm.inc"
.include "smp.inc"

    .text
    .code64
    .globl start
start:
    movq %rdi, %r14
    movq %r10, %r13
    SMP_WORK

    SMP_DATA
