# SPDX-License-Identifier: GPL-2.0-or-later
"""What this host's KVM does with guest debugging, measured on a throwaway VM.

KVM_CAP_SET_GUEST_DEBUG2 lists the control bits a KVM accepts, not what it delivers. kvm_pvm
(a nested KVM that emulates CPL0 guest code) accepts them all, yet its instruction emulator
cannot execute an int3 (real mode sends it through the guest's IVT, protected modes end in an
emulation failure) and it never checks data breakpoints. So the stub asks the host once, in
real mode (a few emulated instructions):

- `int3_intercepted`: an int3 with KVM_GUESTDBG_USE_SW_BP comes back as a #BP DebugExit.
  Where it does not, the stub plants gdb's software breakpoints in debug registers instead.
- `watchpoints_fire`: a store under a debug-register write watchpoint comes back as a #DB
  DebugExit. Where it does not, the stub refuses Z2-Z4 and gdb can fall back to software
  watchpoints (`set can-use-hw-watchpoints 0`: single-stepping, which works everywhere).
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
    int3 = isinstance(bp, DebugExit) and bp.exception == BP_VECTOR
    watch = isinstance(wp, DebugExit) and wp.exception == DB_VECTOR
    return DebugSupport(int3_intercepted=int3, watchpoints_fire=watch)
