# SPDX-License-Identifier: GPL-2.0-or-later
# pvdma: a PV-DMA session from 64-bit kernel mode (CPL0) against pyvmm.devices.PvDma, over
# whichever transport the device names (its TRANSPORT register): the MAP_GPA_RANGE hypercall,
# or the PIO register block.
# Parameters (host-set registers; PvDma.guest_regs() gives R12 and R14):
#   R12  0 = VMCALL, 1 = VMMCALL          R14  the PV-DMA register block's port
#   R13  guest-physical address of the 2-page DMA buffer (4 KiB aligned); 0 = dma_buf
# A test DMA engine at PVDMA_ENGINE_PORT: a 32-bit OUT of a gpa asks it to write
# PVDMA_ENGINE_BYTES bytes there through the device's mapping: "pyvmmDMA" at +0 and
# "dma-end!" at +PVDMA_ENGINE_BYTES-8 (it refuses if the range is not mapped).
# Reports (tag: RAX), each checked here too (FAIL code = the tag):
#   0x10 the transport (0 PIO, 1 hypercall; not checked)
#   0x11 map(buffer, 2 pages) = 0
#   0x12 first quadword of the buffer after the engine wrote it = "pyvmmDMA" (RCX: last one)
#   0x13 unmap(buffer, 2 pages) = 0
#   0x14 first quadword after asking the engine again, unmapped: still 0
#   bad requests: 0x21 unmap again = -2 (ENOENT)    0x22 unmap of a never-mapped range = -2
#   0x23 map of 0x40000000 (no RAM there) = -14 (EFAULT)
#   0x24 map of 0xfffffffffffff000, 2 pages (wraps the address space) = -22 (EINVAL)
#   0x25 map of an unaligned gpa = -22          0x26 map of 0 pages = -22
#   0x27 map with page-size attribute 3 = -22
# pyvmm: mode=long64 load=0x1000 entry=start
.include "pyvmm.inc"
.include "hypercall.inc"

    .set PVDMA_ENGINE_PORT, 0x5f0
    .set PVDMA_ENGINE_BYTES, 0x2000
    .globl PVDMA_ENGINE_PORT, PVDMA_ENGINE_BYTES

    .text
    .code64
    .globl start
start:
    PVDMA_PROBE $0x01
    REPORT %r15d, $0x10
    movq %r13, %rbp
    testq %rbp, %rbp
    jnz 1f
    movl $dma_buf, %ebp
1:  movq $0, (%rbp)
    movq $0, PVDMA_ENGINE_BYTES-8(%rbp)

    movq %rbp, %rbx                      # map the buffer
    movl $2, %ecx
    xorl %edx, %edx
    call pvdma_call
    EXPECT $0, $0x11

    movl %ebp, %eax                      # the device writes into it
    movw $PVDMA_ENGINE_PORT, %dx
    outl %eax, %dx
    movq PVDMA_ENGINE_BYTES-8(%rbp), %rcx
    movq (%rbp), %rax
    movabsq $0x414d446d6d767970, %rsi    # "pyvmmDMA"
    EXPECT %rsi, $0x12
    movabsq $0x21646e652d616d64, %rsi    # "dma-end!"
    cmpq %rsi, %rcx
    je 1f
    FAIL $0x120
1:
    movq %rbp, %rbx                      # unmap it
    movl $2, %ecx
    movl $KVM_MAP_GPA_RANGE_ENCRYPTED, %edx
    call pvdma_call
    EXPECT $0, $0x13

    movq $0, (%rbp)                      # the device may not write any more
    movl %ebp, %eax
    movw $PVDMA_ENGINE_PORT, %dx
    outl %eax, %dx
    movq (%rbp), %rax
    EXPECT $0, $0x14

    movq %rbp, %rbx                      # unmap twice
    movl $2, %ecx
    movl $KVM_MAP_GPA_RANGE_ENCRYPTED, %edx
    call pvdma_call
    EXPECT $-KVM_ENOENT, $0x21

    movl $0x70000, %ebx                  # unmap of something never mapped
    movl $1, %ecx
    movl $KVM_MAP_GPA_RANGE_ENCRYPTED, %edx
    call pvdma_call
    EXPECT $-KVM_ENOENT, $0x22

    movl $0x40000000, %ebx               # outside RAM
    movl $1, %ecx
    xorl %edx, %edx
    call pvdma_call
    EXPECT $-KVM_EFAULT, $0x23

    movq $0xfffffffffffff000, %rbx       # wraps
    movl $2, %ecx
    xorl %edx, %edx
    call pvdma_call
    EXPECT $-KVM_EINVAL, $0x24

    leaq 1(%rbp), %rbx                   # unaligned
    movl $1, %ecx
    xorl %edx, %edx
    call pvdma_call
    EXPECT $-KVM_EINVAL, $0x25

    movq %rbp, %rbx                      # 0 pages
    xorl %ecx, %ecx
    xorl %edx, %edx
    call pvdma_call
    EXPECT $-KVM_EINVAL, $0x26

    movq %rbp, %rbx                      # unknown page size
    movl $1, %ecx
    movl $3, %edx
    call pvdma_call
    EXPECT $-KVM_EINVAL, $0x27
    DONE $0

    HYPERCALL_FUNCTIONS
    PVDMA_FUNCTIONS

    .bss
    .balign 4096
    .globl dma_buf
dma_buf:
    .skip PVDMA_ENGINE_BYTES
