# SPDX-License-Identifier: GPL-2.0-or-later
# debugme32: the debugme body (debugme.inc: a loop calling bump, a spin a debugger releases, a
# report of 55) in 32-bit protected mode, for the gdb stub's tests.
# pyvmm: mode=prot32 load=0x1000 entry=start
    .code32
.include "debugme.inc"
