# SPDX-License-Identifier: GPL-2.0-or-later
# smm: System Management Mode round trips, from real mode and from 64-bit paged long mode.
#
# The host copies the handler (smm_handler .. smm_handler_end) into SMRAM, a memslot in address
# space 1, at SMBASE+0x8000 for SMBASE 0x30000 and SMM_NEW_SMBASE, and may put the decoy
# (smm_decoy .. smm_decoy_end, a FAIL) at the same addresses of normal RAM: it runs only if
# KVM fetched the handler from the wrong address space.
#
# Stages (EBX = SMM_TAG_STAGE, EAX = stage); "SMI" marks where the host injects one (KVM_SMI)
# after the report, and the handler then reports (EBX = SMM_TAG_HANDLER) and returns with RSM:
#   1  real mode                                                        SMI
#   2  real mode, ESI = SMM_SENTINEL (the host may rewrite the saved RSI) SMI
#   3  real mode, ESI as restored by RSM; EDI = SMM_NEW_SMBASE asks the
#      handler to relocate SMBASE                                       SMI
#   4  real mode; the next SMI enters at the new SMBASE                 SMI
#      EBP & SMM_FLAG_REAL_ONLY: done here
#   5  64-bit long mode with paging; R12/R13/R14 = CR0/CR4/EFER         SMI
#   6  after RSM: RCX/RDX/RSI = CR0/CR4/EFER again (checked equal, FAIL 0x60 otherwise),
#      R15 = a 64-bit constant only 64-bit code can load
#      EBP & SMM_FLAG_SELF_SMI:
#   7  about to write the local APIC ICR: SMI to self (the handler reports, no host SMI)
#   8  after that SMI's RSM
#   done (status 0)
# pyvmm: mode=real16 load=0x1000 entry=start memory=0x200000
.include "pyvmm.inc"
.include "smm.inc"

    .text
    .code16
    .globl start
start:
    xorl %edi, %edi                 # no SMBASE relocation requested
    xorl %esi, %esi
    REPORT $1, $SMM_TAG_STAGE
    .globl after_stage1
after_stage1:
    movl $SMM_SENTINEL, %esi
    REPORT $2, $SMM_TAG_STAGE
    movl $SMM_NEW_SMBASE, %edi      # the handler moves SMBASE on the next SMI (and keeps it)
    REPORT $3, $SMM_TAG_STAGE
    REPORT $4, $SMM_TAG_STAGE
    testl $SMM_FLAG_REAL_ONLY, %ebp
    jz to_long
    DONE $0

to_long:
    ENTER_PROT32 gdt_desc, prot32

    .code32
prot32:
    FLAT_DATA_SEGMENTS
    movl $PYVMM_STACK_TOP, %esp
    ENTER_LONG64 long64

    .code64
long64:
    lidt PYVMM_IDTR                 # exceptions now reach the host's stubs (port 0xED)
    movq %cr0, %r12
    movq %cr4, %r13
    movl $PYVMM_MSR_EFER, %ecx
    rdmsr
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %r14
    REPORT $5, $SMM_TAG_STAGE
    .globl after_stage5
after_stage5:
    movq %cr0, %rcx
    movq %cr4, %rdx
    movq %rdx, %r8
    movq %rcx, %r9
    movl $PYVMM_MSR_EFER, %ecx
    rdmsr
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %rsi
    movq %r9, %rcx
    movq %r8, %rdx
    cmpq %r12, %rcx
    jne bad_state
    cmpq %r13, %rdx
    jne bad_state
    cmpq %r14, %rsi
    jne bad_state
    movabsq $0x0123456789ABCDEF, %r15
    REPORT $6, $SMM_TAG_STAGE

    testl $SMM_FLAG_SELF_SMI, %ebp
    jz finish
    movl $SMM_APIC_SVR, %eax        # software-enable the local APIC
    movl $0x1FF, (%rax)
    movl $SMM_APIC_ICR_HIGH, %eax
    movl $0, (%rax)
    REPORT $7, $SMM_TAG_STAGE
    movl $SMM_APIC_ICR_LOW, %eax
    movl $SMM_ICR_SELF_SMI, (%rax)  # SMI to self: taken before the next instruction
    REPORT $8, $SMM_TAG_STAGE
finish:
    DONE $0

bad_state:
    FAIL $0x60

# ---- the SMI handler, copied by the host to SMBASE+0x8000 in SMRAM. Position-independent:
# relative jumps only, the save area through CS (base = SMBASE). RSM restores every register.
    .code16
    .globl smm_handler, smm_handler_end
smm_handler:
    movw %cs, %ax
    movzwl %ax, %eax
    shll $4, %eax                   # SMBASE (CS selector = SMBASE >> 4)
    movl %cs:SMM_SAVE_REVISION, %ecx
    movl $SMM_TAG_HANDLER, %ebx
    outl %eax, $PYVMM_PORT_REPORT
    testl %edi, %edi                # the interrupted code's EDI: a new SMBASE, or 0
    jz 2f
    cmpb $0x64, %cl                 # revision 0x00020064: the 64-bit layout
    je 1f
    movl %edi, %cs:SMM_SAVE_SMBASE32
    jmp 2f
1:  movl %edi, %cs:SMM_SAVE_SMBASE64
2:  rsm
smm_handler_end:

# ---- the decoy: what normal RAM holds at the handler's address
    .globl smm_decoy, smm_decoy_end
smm_decoy:
    movl $0xDEC0, %eax
    outl %eax, $PYVMM_PORT_FAIL
    hlt
smm_decoy_end:

    .section .rodata
gdt_desc:
    .word PYVMM_GDT_LIMIT
    .long PYVMM_GDT
