# SPDX-License-Identifier: GPL-2.0-or-later
"""What this host's KVM does with guest debugging, measured on a throwaway VM.

KVM_CAP_SET_GUEST_DEBUG2 lists the control bits a KVM accepts, not what it delivers, and the
KVMs this project runs on differ (measured):

================================  =========  ========================  ==================
                                  kvm_pvm    kvm_amd under QEMU TCG    stock KVM on metal
================================  =========  ========================  ==================
single-step, CPL0                 yes        yes                       yes
single-step, CPL3                 no (#DB    yes                       yes
                                  to guest)
int3 intercepted (USE_SW_BP)      no         no (the guest gets #BP)   yes
debug-register breakpoints, CPL0  yes        no                        yes
debug-register breakpoints, CPL3  no         no                        yes
data watchpoints                  no         no                        yes
================================  =========  ========================  ==================

kvm_pvm emulates CPL0 code (its emulator checks execution breakpoints, cannot run an int3
and never checks data breakpoints) and runs CPL3 code natively without the debug registers;
QEMU's TCG, which runs the nested kvm_amd, does not apply a VMCB's DR7 nor intercept INT3 as
a #BP. So the stub asks the host, once, in real mode (a few emulated instructions):

- `int3_intercepted`: an int3 under KVM_GUESTDBG_USE_SW_BP comes back as a #BP DebugExit;
  gdb's software breakpoints are then int3 bytes in guest memory.
- `exec_breakpoints_fire`: a debug-register execution breakpoint stops the guest; without
  int3, software breakpoints then take debug registers, and without either, the stub
  continues by single steps and stops where a breakpoint is (slow, but it works wherever
  single-stepping does).
- `watchpoints_fire`: a store under a write watchpoint comes back as a #DB DebugExit; without
  it the stub refuses Z2-Z4 and gdb can use software watchpoints
  (`set can-use-hw-watchpoints 0`: gdb single-steps and compares).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..exits import DebugExit, Exit
from ..guestdebug import BP_VECTOR, DB_VECTOR, HwBreakpoint
from ..kvm import Kvm

__all__ = ["DebugSupport", "probe"]

_CODE = 0x1000
_HANDLER = 0x2000
_DATA = 0x3000
_IVT_BP = 3 * 4
_PROBE_PORT = 0x80

# int3; hlt                      (the #BP handler, if the guest gets the exception: out; hlt)
_INT3 = bytes((0xCC, 0xF4))
# mov %al, (0x3000); hlt
_STORE = bytes((0xA2, _DATA & 0xFF, _DATA >> 8, 0xF4))
_GUEST_HANDLER = bytes((0xE6, _PROBE_PORT, 0xF4))


@dataclass(frozen=True)
class DebugSupport:
    """The outcome of `probe()`."""

    int3_intercepted: bool
    exec_breakpoints_fire: bool
    watchpoints_fire: bool


def _run_once(kvm: Kvm, code: bytes, **debug) -> Exit:
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vm.memory.write(_CODE, code)
        vm.memory.write(_HANDLER, _GUEST_HANDLER)
        vm.memory.write(_IVT_BP, (_HANDLER).to_bytes(2, "little") + b"\0\0")
        vcpu = vm.create_vcpu()
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags, regs.rsp = _CODE, 0x2, 0x8000
        vcpu.set_regs(regs)
        vcpu.set_guest_debug(**debug)
        exit = vcpu.run(timeout=2.0)
        return exit.detached()


@functools.cache
def probe() -> DebugSupport:
    """Measure this host's guest debugging (once per process; takes milliseconds)."""
    with Kvm() as kvm:
        bp = _run_once(kvm, _INT3, sw_breakpoints=True)
        wp = _run_once(kvm, _STORE, hw_breakpoints=[HwBreakpoint(_DATA, "write", 1)])
        xp = _run_once(kvm, _STORE, hw_breakpoints=[HwBreakpoint(_CODE + len(_STORE) - 1)])
    int3 = isinstance(bp, DebugExit) and bp.exception == BP_VECTOR
    watch = isinstance(wp, DebugExit) and wp.exception == DB_VECTOR
    exec_ = isinstance(xp, DebugExit) and xp.exception == DB_VECTOR
    return DebugSupport(int3_intercepted=int3, exec_breakpoints_fire=exec_,
                        watchpoints_fire=watch)
