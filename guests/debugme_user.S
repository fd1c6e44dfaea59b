# SPDX-License-Identifier: GPL-2.0-or-later
# debugme_user: the debugme body (debugme.inc: a loop calling bump, a spin a debugger releases, a
# report of 55) in 64-bit user mode (CPL3, native on kvm_pvm), for the gdb stub's tests.
# pyvmm: mode=long64-user load=0x1000 entry=start
    .code64
.include "debugme.inc"
