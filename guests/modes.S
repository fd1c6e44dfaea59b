# SPDX-License-Identifier: GPL-2.0-or-later
# modes: starts in real mode and switches itself real16 -> prot32 -> long64 (CPL0) -> CPL3,
# using the GDT, page tables, IDT and TSS the host put in the system area (pyvmm.inc).
# At each stage it prints the stage name and reports a value computed there, tagged (EBX)
# with the stage, with the CPL in ECX:
#   tag 16  real16       sum 1..100                  = 5050
#   tag 32  prot32       12!                         = 479001600
#   tag 64  long64 CPL0  20! (64-bit, in RAX)        = 2432902008176640000
#   tag 3   long64 CPL3  sum 1..100000 (64-bit)      = 5000050000   (native at CPL3 on kvm_pvm)
# CPL0 code is emulated one instruction at a time on kvm_pvm, so those loops stay short.
# pyvmm: mode=real16 load=0x1000 entry=start memory=0x200000
.include "pyvmm.inc"

    .text
    .code16
    .globl start
start:
    PUTS name16, 7
    xorl %eax, %eax
    movl $100, %ecx
1:  addl %ecx, %eax
    loop 1b
    xorl %ecx, %ecx                 # CPL 0
    REPORT %eax, $16

    ENTER_PROT32 gdt_desc, prot32

    .code32
prot32:
    FLAT_DATA_SEGMENTS
    movl $PYVMM_STACK_TOP, %esp
    PUTS name32, 7
    movl $1, %eax
    movl $12, %ecx
1:  imull %ecx, %eax
    loop 1b
    xorl %ecx, %ecx
    REPORT %eax, $32

    # to long mode: PAE, CR3 = the host's identity map, EFER.LME, then paging
    ENTER_LONG64 long64

    .code64
long64:
    PUTS name64, 7
    movl $1, %eax
    movl $20, %ecx
1:  imulq %rcx, %rax
    loop 1b
    movw %cs, %cx
    andl $3, %ecx
    movl $64, %ebx
    REPORT_RAX

    # exceptions to the host's stubs, TR for RSP0 and the I/O bitmap, then iretq to CPL3
    lidt PYVMM_IDTR
    movw $PYVMM_SEL_TSS, %ax
    ltr %ax
    pushq $PYVMM_SEL_UDATA
    pushq $PYVMM_STACK_TOP
    pushq $0x2
    pushq $PYVMM_SEL_UCODE64
    pushq $user
    iretq

user:
    PUTS name3, 6
    xorl %eax, %eax
    movl $100000, %ecx
1:  addq %rcx, %rax
    decl %ecx
    jnz 1b
    movw %cs, %cx
    andl $3, %ecx
    movl $3, %ebx
    REPORT_RAX
    DONE $0

    .section .rodata
gdt_desc:
    .word PYVMM_GDT_LIMIT
    .long PYVMM_GDT
name16: .ascii "real16 "
name32: .ascii "prot32 "
name64: .ascii "long64 "
name3:  .ascii "user3\n"
