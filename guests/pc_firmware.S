# SPDX-License-Identifier: GPL-2.0-or-later
# pc_firmware: entered through the platform's firmware init stub (32-bit flat mode), as a
# multiboot kernel is. Checks what a BIOS would have left (EDI: polls to wait for a tick):
#   tag 1: EAX as the loader set it   tag 2: EBX   tag 3: master 8259 mask   tag 4: slave mask
#   tag 5: 1 once the PIT's channel 0 raised IRQ 0 (the master's IRR bit 0, read with OCW3)
#   tag 6: the IVT entry of vector 8 (segment:offset)   tag 7: the BDA's COM1 port
# pyvmm: mode=prot32 load=0x1000 entry=start
.include "pyvmm.inc"

    .text
    .code32
    .globl start
start:
    movl %ebx, %esi
    REPORT %eax, $1
    REPORT %esi, $2
    xorl %eax, %eax
    inb $0x21, %al
    REPORT %eax, $3
    xorl %eax, %eax
    inb $0xa1, %al
    REPORT %eax, $4
    movl %edi, %ecx                     # how long to wait for a tick (the host says)
1:  movb $0x0a, %al                     # OCW3: read the IRR next
    outb %al, $0x20
    inb $0x20, %al
    testb $1, %al
    jnz 2f
    decl %ecx
    jnz 1b
    REPORT $0, $5
    jmp 3f
2:  REPORT $1, $5
3:  REPORT 0x20, $6
    xorl %eax, %eax
    movw 0x400, %ax
    REPORT %eax, $7
    DONE $0
