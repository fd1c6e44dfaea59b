# SPDX-License-Identifier: GPL-2.0-or-later
# pc_pci: a guest finds pci-testdev through configuration mechanism #1 and runs its tests
# through both BARs, as kvm-unit-tests' lib/pci-testdev.c does.
#   tag 1: 00:00.0 vendor/device   tag 2: 00:02.0 vendor/device   tag 3: 00:05.0 (no device)
#   tag 4: BAR0 (memory)           tag 5: BAR1 (I/O)              tag 6: BAR0 sized (~0 read back)
#   tag 7: count after 16 matching writes of mmio test 0 (no-eventfd: the device counts)
#   tag 8: count after 16 writes of mmio test 2 (datamatch-eventfd: the kernel takes them)
#   tag 9: count after 16 writes of portio test 1 (wildcard-eventfd)
#   tag 10: the first 4 name bytes of the portio test ("port")
#   tag 11: a byte past the name's NUL (0)
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"

    .set TESTDEV, (2 << 11)         # 00:02.0 as bits 15:8 of the config address (dev << 11)
    .set HDR_OFFSET, 4
    .set HDR_DATA, 8
    .set HDR_COUNT, 12
    .set HDR_NAME, 16

# EAX = the 32-bit config register `reg` of `devfn_bits` (device << 11 | function << 8).
.macro CFG_READ devfn_bits, reg
    movl $(0x80000000 | \devfn_bits | \reg), %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    movw $0xcfc, %dx
    inl %dx, %eax
.endm

.macro CFG_WRITE devfn_bits, reg, value
    movl $(0x80000000 | \devfn_bits | \reg), %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    movl \value, %eax
    movw $0xcfc, %dx
    outl %eax, %dx
.endm

    .text
    .code64
    .globl start
start:
    CFG_READ 0, 0
    REPORT %eax, $1
    CFG_READ TESTDEV, 0
    REPORT %eax, $2
    CFG_READ (5 << 11), 0
    REPORT %eax, $3
    CFG_READ TESTDEV, 0x10
    movl %eax, %r8d
    REPORT %eax, $4
    CFG_READ TESTDEV, 0x14
    movl %eax, %r9d
    andl $~3, %r9d
    REPORT %eax, $5
    CFG_WRITE TESTDEV, 0x10, $0xffffffff
    CFG_READ TESTDEV, 0x10
    REPORT %eax, $6
    CFG_WRITE TESTDEV, 0x10, %r8d

    # mmio test 0 (no-eventfd) through BAR0, 16 writes of its data at its offset
    movb $0, (%r8)
    movl HDR_OFFSET(%r8), %esi
    movl HDR_DATA(%r8), %eax
    movl $16, %ecx
1:  movb %al, (%r8, %rsi)
    decl %ecx
    jnz 1b
    movl HDR_COUNT(%r8), %eax
    REPORT %eax, $7

    # mmio test 2 (datamatch-eventfd)
    movb $2, (%r8)
    movl HDR_OFFSET(%r8), %esi
    movl HDR_DATA(%r8), %eax
    movl $16, %ecx
1:  movb %al, (%r8, %rsi)
    decl %ecx
    jnz 1b
    movl HDR_COUNT(%r8), %eax
    REPORT %eax, $8

    # portio test 1 (wildcard-eventfd) through BAR1
    movw %r9w, %dx
    movb $1, %al
    outb %al, %dx
    leal HDR_OFFSET(%r9d), %edx
    inl %dx, %eax
    leal (%r9d, %eax), %edi         # the port the test writes go to
    leal HDR_DATA(%r9d), %edx
    inl %dx, %eax
    movw %di, %dx
    movl $16, %ecx
1:  outb %al, %dx
    decl %ecx
    jnz 1b
    leal HDR_COUNT(%r9d), %edx
    inl %dx, %eax
    REPORT %eax, $9
    leal HDR_NAME(%r9d), %edx
    inl %dx, %eax
    REPORT %eax, $10
    leal (HDR_NAME + 24)(%r9d), %edx   # "portio-wildcard-eventfd" is 23 bytes + NUL
    xorl %eax, %eax
    inb %dx, %al
    REPORT %eax, $11
    DONE $0
