# SPDX-License-Identifier: GPL-2.0-or-later
# hello: the smallest payload. Real mode, prints a line on the console port, then done.
# pyvmm: mode=real16 load=0x1000 entry=start memory=0x200000
.include "pyvmm.inc"

    .code16
    .text
    .globl start
start:
    PUTS message, message_len
    DONE $0

    .section .rodata
message:
    .ascii "Hello from real mode\n"
    .set message_len, . - message
