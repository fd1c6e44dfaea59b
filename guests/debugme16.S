# SPDX-License-Identifier: GPL-2.0-or-later
# debugme16: the debugme body (debugme.inc: a loop calling bump, a spin a debugger releases, a
# report of 55) in real mode, for the gdb stub's tests.
# pyvmm: mode=real16 load=0x1000 entry=start
    .code16
.include "debugme.inc"
