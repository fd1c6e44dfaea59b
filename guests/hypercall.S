# SPDX-License-Identifier: GPL-2.0-or-later
# hypercall: KVM hypercalls from 64-bit kernel mode (CPL0), answered by KVM or by the host.
# Parameters (host-set registers):
#   R12  0 = VMCALL, 1 = VMMCALL (see hypercall.inc)
#   R13  bit 0: the host sent KVM_HC_MAP_GPA_RANGE to userspace (KVM_CAP_EXIT_HYPERCALL) and
#        answers it with HC_MAGIC_RET after checking the arguments HC_ARG_*; clear: KVM
#        answers it itself with -KVM_ENOSYS
# Reports (tag: value in RAX; every one is also checked here, FAIL code = the tag):
#   1  an unknown hypercall number (HC_UNKNOWN_NR): -1000 (-KVM_ENOSYS), from KVM
#   2  MAP_GPA_RANGE(HC_ARG_GPA, HC_ARG_NPAGES, HC_ARG_ATTRS): HC_MAGIC_RET from the host,
#      or -1000 when R13 bit 0 is clear
#   with R13 bit 0 only, requests KVM refuses itself (-22 = -KVM_EINVAL, no exit):
#   3  unaligned gpa     4  npages 0     5  gfn + npages wraps the 64-bit space
# On kvm_pvm the first VMCALL never returns (the run's timeout ends it); with the
# fix-hypercall quirk disabled the other vendor's instruction raises #UD (a fault report).
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"
.include "hypercall.inc"

    .set HC_UNKNOWN_NR,  0x7fff1234
    .set HC_ARG_GPA,     0x123000
    .set HC_ARG_NPAGES,  0x45
    .set HC_ARG_ATTRS,   0x11            # private, 2M page-size hint
    .set HC_MAGIC_RET,   0x0123456789abcdef
    .globl HC_UNKNOWN_NR, HC_ARG_GPA, HC_ARG_NPAGES, HC_ARG_ATTRS, HC_MAGIC_RET

    .text
    .code64
    .globl start
start:
    movl $HC_UNKNOWN_NR, %eax
    xorl %ebx, %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    call hypercall
    EXPECT $-KVM_ENOSYS, $1

    movl $KVM_HC_MAP_GPA_RANGE, %eax
    movl $HC_ARG_GPA, %ebx
    movl $HC_ARG_NPAGES, %ecx
    movl $HC_ARG_ATTRS, %edx
    call hypercall
    testl $1, %r13d
    jz .Lno_exit
    movabsq $HC_MAGIC_RET, %rsi
    EXPECT %rsi, $2

    movl $KVM_HC_MAP_GPA_RANGE, %eax     # unaligned gpa
    movl $HC_ARG_GPA + 1, %ebx
    movl $1, %ecx
    xorl %edx, %edx
    call hypercall
    EXPECT $-KVM_EINVAL, $3

    movl $KVM_HC_MAP_GPA_RANGE, %eax     # npages 0
    movl $HC_ARG_GPA, %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    call hypercall
    EXPECT $-KVM_EINVAL, $4

    movl $KVM_HC_MAP_GPA_RANGE, %eax     # gfn 1 + (2^64 - 1) pages wraps
    movl $0x1000, %ebx
    movq $-1, %rcx
    xorl %edx, %edx
    call hypercall
    EXPECT $-KVM_EINVAL, $5
    DONE $0

.Lno_exit:
    EXPECT $-KVM_ENOSYS, $2
    DONE $0

    HYPERCALL_FUNCTIONS
