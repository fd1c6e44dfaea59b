# SPDX-License-Identifier: GPL-2.0-or-later
# pc_reset: a guest resets the PC one of the ways an OS does, picked by RDI:
#   0: the keyboard controller's pulse-reset command (0xfe to port 0x64), after waiting for
#      its input buffer to be empty      1: the reset control register (6 to port 0xcf9)
#   2: System Control Port A's fast reset (bit 0 of port 0x92)
#   3: the keyboard controller's output port written with the reset line low (0xd1, 0xfe)
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .text
    .code64
    .globl start
start:
    cmpq $1, %rdi
    je 1f
    cmpq $2, %rdi
    je 2f
    cmpq $3, %rdi
    je 3f
0:  inb $0x64, %al
    testb $0x02, %al
    jnz 0b
    movb $0xfe, %al
    outb %al, $0x64
    jmp 9f
1:  movw $0xcf9, %dx
    movb $0x06, %al
    outb %al, %dx
    jmp 9f
2:  inb $0x92, %al
    orb $0x01, %al
    outb %al, $0x92
    jmp 9f
3:  movb $0xd1, %al
    outb %al, $0x64
    movb $0xfe, %al
    outb %al, $0x60
9:  FAIL $1                              # not reached: the machine reset
