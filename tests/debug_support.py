# SPDX-License-Identifier: GPL-2.0-or-later
"""What this host's KVM does with guest debugging, for the tests that need a part of it.

Measured, not assumed: `pyvmm.gdb.probe()` runs an int3, an execution breakpoint and a
watched store in real mode; `cpl3_single_step()` here single-steps the 64-bit user-mode
payload. On kvm_pvm (this project's hosts) a CPL3 single step becomes the guest's own #DB;
stock KVM (the nested runner's kvm_amd) stops after the instruction. Tests that need it are
skipped here, naming it, and run in the nested runner:

    python -m pyvmm.testing.nested -- python -m pytest -q -m stock_kvm tests/test_gdb.py

The other parts (int3 intercept, debug-register breakpoints and watchpoints) are missing on
both kvm_pvm and kvm_amd under QEMU TCG (QEMU applies no VMCB DR7 and intercepts no INT3 as
#BP): their tests check that the stub's choice follows what was measured, and where a part
works (stock KVM on hardware) that it behaves as gdb expects.
"""

from __future__ import annotations

import functools

import pytest

from pyvmm import Machine, exits
from pyvmm.testing import hostinfo
from pyvmm.testing.plugin import CAP_SKIP_PROPERTY

#: The name the skip gives (and `pyvmm nested --check-skips` follows).
CPL3_STEP = "SET_GUEST_DEBUG single-step at CPL3"


@functools.cache
def cpl3_single_step() -> bool:
    """Does a single step of 64-bit CPL3 code stop after the instruction, in user code?"""
    with Machine() as m:
        payload = m.load("debugme_user")
        m.vcpus[0].set_guest_debug(single_step=True)
        m.exit_handlers[exits.DebugExit] = lambda exit, vcpu: "stopped"
        result = m.run(timeout=10)
        ex = result.last_exit
        return (isinstance(ex, exits.DebugExit) and ex.single_step
                and payload.load_address < ex.pc < payload.end)


def need_cpl3_single_step(request) -> None:
    """Skip the test (as the missing capability CPL3_STEP) where this host lacks it."""
    if not cpl3_single_step():
        request.node.user_properties.append((CAP_SKIP_PROPERTY, [CPL3_STEP]))
        where = hostinfo.kvm_module() or "this host's KVM"
        pytest.skip(f"pyvmm: missing KVM capability {CPL3_STEP} on {where} (measured: the "
                    f"step reaches the guest as its own #DB; the nested runner runs this)")
