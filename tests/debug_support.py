# SPDX-License-Identifier: GPL-2.0-or-later
"""What this host's KVM does with guest debugging, for the tests that need a part of it.

Measured, not assumed: `pyvmm.gdb.probe` runs an int3 and a watched store in real mode, and
`cpl3_breakpoints()` here a debug-register breakpoint in the 64-bit user-mode payload. kvm_pvm
(this project's hosts) emulates CPL0 code (single-step and execution breakpoints work there,
int3 and data watchpoints do not) and runs CPL3 code natively (no debug-register breakpoint
fires, a single step becomes the guest's own #DB). Tests of a missing part are skipped here,
naming it, and run on stock KVM in the nested runner:

    python -m pyvmm.testing.nested -- python -m pytest -q -m stock_kvm tests/test_gdb.py
"""

from __future__ import annotations

import functools

import pytest

from pyvmm import Machine, exits
from pyvmm.gdb import probe
from pyvmm.testing import hostinfo
from pyvmm.testing.plugin import CAP_SKIP_PROPERTY

#: The names the skips give (and `pyvmm nested --check-skips` follows).
INT3 = "SET_GUEST_DEBUG int3 intercept"
WATCHPOINTS = "SET_GUEST_DEBUG watchpoints"
CPL3 = "SET_GUEST_DEBUG at CPL3"


@functools.cache
def cpl3_breakpoints() -> bool:
    """Does a debug-register execution breakpoint stop 64-bit CPL3 code here?"""
    with Machine() as m:
        payload = m.load("debugme_user")
        m.vcpus[0].set_guest_debug(hw_breakpoints=[payload.symbol("bump")])
        m.exit_handlers[exits.DebugExit] = lambda exit, vcpu: "stopped"
        result = m.run(timeout=10)
        return isinstance(result.last_exit, exits.DebugExit)


def _works(name: str) -> bool:
    if name == INT3:
        return probe().int3_intercepted
    if name == WATCHPOINTS:
        return probe().watchpoints_fire
    if name == CPL3:
        return cpl3_breakpoints()
    raise ValueError(name)


def need(request, name: str) -> None:
    """Skip the test (as a missing capability `name`) where this host lacks that part."""
    if not _works(name):
        request.node.user_properties.append((CAP_SKIP_PROPERTY, [name]))
        where = hostinfo.kvm_module() or "this host's KVM"
        pytest.skip(f"pyvmm: missing KVM capability {name} on {where} (measured; stock KVM "
                    f"has it: the nested runner runs this test)")
