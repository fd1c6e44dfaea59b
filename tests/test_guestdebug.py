# SPDX-License-Identifier: GPL-2.0-or-later
"""vcpu.set_guest_debug (KVM_SET_GUEST_DEBUG), DebugExit's fields and vcpu.translate
(KVM_TRANSLATE), through the Python API against the real /dev/kvm.

Small real-mode guests (CPL0: emulated on kvm_pvm, which single-steps them and checks their
execution breakpoints) and the debugme payloads for paging. What differs by host (int3
intercept, data watchpoints) is checked against what pyvmm.gdb.probe measured; CPL3
single-stepping, which kvm_pvm lacks, is skipped by name and runs in the nested runner.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from debug_support import need_cpl3_single_step
from helpers import LOAD, code, expect, guest

from pyvmm import Machine, exits
from pyvmm.errors import ClosedError
from pyvmm.gdb import probe
from pyvmm.guestdebug import (KVM_SET_GUEST_DEBUG, KVM_TRANSLATE, HwBreakpoint, Translation,
                              debug_control, dr7_value)

# Three movs, a store to DATA, a load from it, then an OUT the test sees as the end.
PROGRAM = """
    movw $1, %ax
    movw $2, %bx
    movw $3, %cx
    movw %ax, 0x3000
    movw 0x3000, %dx
    outb %al, $0x80
    hlt
"""
DATA = 0x3000


def _addresses() -> list[int]:
    """The address of each instruction of PROGRAM, from the assembled prefixes."""
    lines = [line for line in PROGRAM.strip().splitlines()]
    return [LOAD + len(code("\n".join(lines[:k]) + "\n")) if k else LOAD
            for k in range(len(lines))]


# ---------------------------------------------------------------------------------- arguments

def test_dr7_encoding():
    assert dr7_value([]) == 0x400
    assert dr7_value([HwBreakpoint(0x1000)]) == 0x400 | 0b10                 # G0, R/W0=exec
    # slot 1: G1, R/W1 = 01 (write) at bit 20, LEN1 = 11 (4 bytes) at bit 22
    assert dr7_value([HwBreakpoint(0x1000), HwBreakpoint(0x2000, "write", 4)]) == \
        0x400 | 0b10 | 0b1000 | 0b01 << 20 | 0b11 << 22
    # slot 3: access (11), 8 bytes (LEN 10)
    bps = [HwBreakpoint(0x1000)] * 3 + [HwBreakpoint(0x2000, "access", 8)]
    assert dr7_value(bps) >> 28 == 0b1011


def test_control_word():
    assert debug_control(single_step=False, sw_breakpoints=False, hw_breakpoints=False) == 0
    assert debug_control(single_step=True, sw_breakpoints=False, hw_breakpoints=False) == 0x3
    assert debug_control(single_step=False, sw_breakpoints=True, hw_breakpoints=True,
                         inject=3) == 0x1 | 0x10000 | 0x20000 | 0x80000
    # interrupts blocked only while stepping
    assert debug_control(single_step=True, sw_breakpoints=False, hw_breakpoints=False,
                         block_irqs=True) == 0x100003
    assert debug_control(single_step=False, sw_breakpoints=True, hw_breakpoints=False,
                         block_irqs=True) == 0x10001
    with pytest.raises(ValueError, match="#DB"):
        debug_control(single_step=False, sw_breakpoints=False, hw_breakpoints=False, inject=14)


@pytest.mark.parametrize("kwargs, message", [
    ({"address": 0x1000, "kind": "read"}, "kind"),
    ({"address": 0x1000, "kind": "write", "length": 3}, "length"),
    ({"address": 0x1000, "kind": "exec", "length": 4}, "length 1"),
    ({"address": 0x1002, "kind": "write", "length": 4}, "aligned"),
    ({"address": 1 << 64}, "64 bits"),
])
def test_bad_breakpoints(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HwBreakpoint(**kwargs)


def test_bad_guest_debug_arguments(vm):
    vcpu = vm.create_vcpu()
    with pytest.raises(ValueError, match="4 debug address registers"):
        vcpu.set_guest_debug(hw_breakpoints=[0x1000, 0x1001, 0x1002, 0x1003, 0x1004])
    with pytest.raises(ValueError, match="HwBreakpoint or an address"):
        vcpu.set_guest_debug(hw_breakpoints=["bump"])
    with pytest.raises(ValueError, match="only #DB"):
        vcpu.set_guest_debug(inject=6)
    with pytest.raises(ValueError, match="64 bits"):
        vcpu.translate(-1)
    vcpu.close()
    with pytest.raises(ClosedError):
        vcpu.set_guest_debug(single_step=True)


def test_ioctl_numbers_match_the_kernel(tmp_path):
    """The two ioctls live outside pyvmm.ioctls (the ABI test's list): check them here
    against <linux/kvm.h>, with the control bits."""
    if shutil.which("gcc") is None or not __import__("os").path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("gcc and linux-libc-dev are needed to compare with <linux/kvm.h>")
    src = tmp_path / "probe.c"
    src.write_text("#include <stdio.h>\n#include <linux/kvm.h>\nint main(void){printf(\"%lu "
                   "%lu %lu %lu %d %d %d %d %d %d\\n\", (unsigned long)KVM_SET_GUEST_DEBUG, "
                   "(unsigned long)KVM_TRANSLATE, sizeof(struct kvm_guest_debug), "
                   "sizeof(struct kvm_translation), KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,"
                   " KVM_GUESTDBG_USE_SW_BP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_INJECT_DB, "
                   "KVM_GUESTDBG_INJECT_BP); return 0;}\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "probe"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert [int(x) for x in out] == [KVM_SET_GUEST_DEBUG, KVM_TRANSLATE, 72, 24, 1, 2,
                                     0x10000, 0x20000, 0x40000, 0x80000]


# ------------------------------------------------------------------------------------ CPL0

def test_single_step_reports_every_instruction(vm):
    vcpu = guest(vm, PROGRAM)
    vcpu.set_guest_debug(single_step=True)
    pcs = []
    for _ in range(3):
        ex = expect(vcpu, exits.DebugExit)
        assert ex.exception == 1 and ex.single_step and ex.breakpoints == ()
        assert ex.pc == vcpu.get_regs().rip
        pcs.append(ex.pc)
    assert pcs == _addresses()[1:4]            # each stop is after one more instruction
    assert vcpu.get_regs().rcx & 0xFFFF == 3 and vm.memory.read(DATA, 2) == b"\0\0"
    vcpu.set_guest_debug()                      # off: the guest runs to its OUT
    out = expect(vcpu, exits.IoExit)
    assert out.port == 0x80 and vcpu.get_regs().rdx & 0xFFFF == 1


def test_execution_breakpoints_name_their_slot(vm):
    """They fire at CPL0 on kvm_pvm (its emulator checks them) and on stock KVM, but not on
    kvm_amd under QEMU TCG, which applies no VMCB DR7: checked against the probe there."""
    vcpu = guest(vm, PROGRAM)
    addrs = _addresses()
    vcpu.set_guest_debug(hw_breakpoints=[HwBreakpoint(addrs[4]), addrs[2]])
    ex = vcpu.run(timeout=5)
    assert isinstance(ex, exits.DebugExit) == probe().exec_breakpoints_fire
    if not probe().exec_breakpoints_fire:
        assert isinstance(ex, exits.IoExit) and ex.port == 0x80
        return
    # Execution breakpoints stop before the instruction: the third mov has not run.
    assert (ex.exception, ex.pc, ex.breakpoints, ex.single_step) == (1, addrs[2], (1,), False)
    assert vcpu.get_regs().rcx & 0xFFFF == 0
    vcpu.set_guest_debug(hw_breakpoints=[addrs[4]])   # drop the one we stand on
    ex = expect(vcpu, exits.DebugExit)
    assert (ex.pc, ex.breakpoints) == (addrs[4], (0,))
    vcpu.set_guest_debug()
    assert expect(vcpu, exits.IoExit).port == 0x80


def test_injected_debug_exception_reaches_the_guest(vm):
    """inject=1: the guest takes a #DB of its own, through its IVT (vector 1 at 0x4)."""
    vcpu = guest(vm, PROGRAM)
    vm.memory.write(0x2000, code("outb %al, $0x81\nhlt\n", base=0x2000))
    vm.memory.write(4, (0x2000).to_bytes(2, "little") + b"\0\0")
    vcpu.set_guest_debug(single_step=True)
    expect(vcpu, exits.DebugExit)
    vcpu.set_guest_debug(inject=1)
    ex = expect(vcpu, exits.IoExit)
    assert ex.port == 0x81                      # the guest's handler, not the program's OUT
    ip = vm.memory.read(0x7000 - 6, 2)          # the IRET frame: IP of the next instruction
    assert int.from_bytes(ip, "little") == _addresses()[1]


# ------------------------------------------------------------------------------- translate

def test_translate_real_mode_is_identity(vm):
    vcpu = guest(vm, PROGRAM)
    t = vcpu.translate(0x1234)
    assert isinstance(t, Translation) and (t.gpa, t.valid) == (0x1234, True)


def test_translate_long_mode_follows_the_page_tables(kvm):
    with Machine(kvm=kvm) as m:
        payload = m.load("debugme")
        vcpu = m.vcpus[0]
        bump = payload.symbol("bump")
        assert vcpu.translate(bump) == Translation(bump, True, True, False)
        # The host's page tables map the low 4 GiB only.
        assert not vcpu.translate(1 << 40).valid
        assert not vcpu.translate(0xFFFF_8000_0000_0000).valid


# ------------------------------------------- parts that differ by host (measured, then checked)

@pytest.mark.parametrize("kind", ["write", "access"])
def test_watchpoints_fire_where_the_probe_says(vm, kind):
    vcpu = guest(vm, PROGRAM)
    vcpu.set_guest_debug(hw_breakpoints=[HwBreakpoint(DATA, kind, 2)])
    ex = vcpu.run(timeout=5)
    assert isinstance(ex, exits.DebugExit) == probe().watchpoints_fire
    addrs = _addresses()
    if isinstance(ex, exits.DebugExit):
        # A data breakpoint is a trap: the store has happened, RIP is past it.
        assert (ex.exception, ex.breakpoints, ex.pc) == (1, (0,), addrs[4])
        assert vm.memory.read(DATA, 2) == b"\x01\x00"
        if kind == "access":                    # the load stops too
            ex = expect(vcpu, exits.DebugExit)
            assert (ex.breakpoints, ex.pc) == ((0,), addrs[5])
        vcpu.set_guest_debug()
        ex = vcpu.run(timeout=5)
    assert isinstance(ex, exits.IoExit) and ex.port == 0x80
    assert vm.memory.read(DATA, 2) == b"\x01\x00" and vcpu.get_regs().rdx & 0xFFFF == 1


def test_int3_is_intercepted_where_the_probe_says(kvm):
    """The probe tries real mode; this is 64-bit CPL0: an int3 planted at bump."""
    with Machine(kvm=kvm) as m:
        payload = m.load("debugme")
        bump = payload.symbol("bump")
        m.memory.write(bump, b"\xcc")
        m.vcpus[0].set_guest_debug(sw_breakpoints=True)
        m.exit_handlers[exits.DebugExit] = lambda ex, vcpu: "stopped"
        result = m.run(timeout=10)
    intercepted = isinstance(result.last_exit, exits.DebugExit)
    assert intercepted == probe().int3_intercepted
    if intercepted:
        assert (result.last_exit.exception, result.last_exit.pc) == (3, bump)
    else:                                       # the guest got it, or the emulator gave up
        assert not result.ok


@pytest.mark.stock_kvm
def test_cpl3_single_step(request, kvm):
    need_cpl3_single_step(request)
    with Machine(kvm=kvm) as m:
        payload = m.load("debugme_user")
        vcpu = m.vcpus[0]
        stops = []
        m.exit_handlers[exits.DebugExit] = lambda ex, v: stops.append(ex) or "stopped"
        vcpu.set_guest_debug(single_step=True)
        for _ in range(3):
            m.run(timeout=30)
        start, loop_top = payload.symbol("start"), payload.symbol("loop_top")
        # testl %esi, %esi; jz 1f (taken: ESI = 0); 1: movl $10, %ecx; loop_top
        assert [ex.pc for ex in stops] == [start + 2, loop_top - 5, loop_top]
        assert all(ex.single_step for ex in stops)
        assert vcpu.get_regs().rcx == 10
        vcpu.set_guest_debug()
        result = m.run(timeout=30)
        assert result.ok and result.values == [55]
