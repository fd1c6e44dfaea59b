# SPDX-License-Identifier: GPL-2.0-or-later
# pc_fwcfg: a guest reads the PC platform's fw_cfg items the way kvm-unit-tests does (a 16-bit
# OUT of the key to 0x510, then 8-bit INs from 0x511), then ends the run through isa-debug-exit
# at 0xf4 with the value the host passed in RDI.
#   tag 1: the signature item (4 bytes)       tag 2: NB_CPUS (2 bytes)
#   tag 3: RAM_SIZE (8 bytes, 64-bit report)   tag 4: the file directory's count (4 bytes, BE)
#   tag 5: 4 bytes of a key with no item       tag 6: 2 bytes of NB_CPUS read from port 0x510
#   tag 7: 8 bytes of NB_CPUS: past the item's end the device answers 0
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set FW_CFG_CTL, 0x510
    .set FW_CFG_DATA, 0x511
    .set DEBUG_EXIT, 0xf4

# Select `key`, then read `n` bytes from `port` into buf; RAX = buf (little-endian).
.macro FWCFG key, n, port=FW_CFG_DATA
    movw $FW_CFG_CTL, %dx
    movw $\key, %ax
    outw %ax, %dx
    movq $0, buf
    movw $\port, %dx
    movl $buf, %edi
    movl $\n, %ecx
    cld
    rep insb
    movq buf, %rax
.endm

    .text
    .code64
    .globl start
start:
    movq %rdi, %r12
    FWCFG 0x00, 4
    movl $1, %ebx
    REPORT_RAX
    FWCFG 0x05, 2
    movl $2, %ebx
    REPORT_RAX
    FWCFG 0x03, 8
    movl $3, %ebx
    REPORT_RAX
    FWCFG 0x19, 4
    movl $4, %ebx
    REPORT_RAX
    FWCFG 0x1234, 4
    movl $5, %ebx
    REPORT_RAX
    FWCFG 0x05, 2, FW_CFG_CTL
    movl $6, %ebx
    REPORT_RAX
    FWCFG 0x05, 8
    movl $7, %ebx
    REPORT_RAX
    movl %r12d, %eax
    outl %eax, $DEBUG_EXIT
    # Not reached when the host ends the run at the write.
    FAIL $0xdead

    .data
    .balign 8
buf:
    .quad 0
