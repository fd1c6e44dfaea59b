# SPDX-License-Identifier: GPL-2.0-or-later
# pc_s3: a guest suspends to RAM the way kvm-unit-tests' s3 test does: it points the FACS
# waking vector at real-mode code, sets an RTC alarm (every field "don't care": the next
# second) with its interrupt enabled unless RDI is 1, and writes SLP_TYP=1 (S3) | SLP_EN to
# PM1a control. On resume the real-mode code ends the run through isa-debug-exit with the
# dword at address 0 (0x2a), so the run's status is 0x55.
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set FACS_WAKING_VECTOR, 12
    .set RESUME, 0x7000

    .text
    .code64
    .globl start
start:
    movq %rdi, %r12
    # the FACS, through the FADT of the RSDT the RSDP at 0xe0000 points at (the platform's)
    movl $0xe0000, %esi
    movl 16(%rsi), %edi                 # RSDT
    movl 36(%rdi), %edi                 # its first table: the FADT
    movl 36(%rdi), %ebx                 # FIRMWARE_CTRL: the FACS
    movl 64(%rdi), %r13d                # PM1A_CNT_BLK
    movl $RESUME, FACS_WAKING_VECTOR(%rbx)
    # copy the resume code
    movl $resume_start, %esi
    movl $RESUME, %edi
    movl $(resume_end - resume_start), %ecx
    cld
    rep movsb
    movl $0x2a, 0
    # RTC alarm: every field "don't care", interrupt enabled (unless RDI == 1)
    .irp reg, 1, 3, 5
    movb $\reg, %al
    outb %al, $0x70
    movb $0xc0, %al
    outb %al, $0x71
    .endr
    movb $0x0c, %al
    outb %al, $0x70
    inb $0x71, %al
    cmpq $1, %r12
    je 1f
    movb $0x0b, %al
    outb %al, $0x70
    movb $0x22, %al                     # 24-hour, AIE
    outb %al, $0x71
1:  movw %r13w, %dx
    movw $0x2400, %ax                   # SLP_EN | SLP_TYP 1
    outw %ax, %dx
    FAIL $1                             # not reached: the machine sleeps

    .code16
resume_start:
    movl 0x0, %eax
    movw $0xf4, %dx
    outl %eax, %dx
2:  hlt
    jmp 2b
resume_end:
