# SPDX-License-Identifier: GPL-2.0-or-later
"""The whole x86 state of vCPUs and VMs: the accessors KVM offers for it (XSAVE, XCRs, debug
registers, TSC, nested state, sync_regs, irqchip, PIT, clock), `VcpuState`/`VmState` that
hold everything needed to resume a guest exactly, and their save/load in the order KVM
requires."""

from .structs import ClockData, DebugRegs, IoapicState, PicState, PitState, Xcrs, Xsave
from .syncregs import SYNC_ALL, SYNC_EVENTS, SYNC_REGS, SYNC_SREGS, SyncedRegs
from .vcpu_state import VcpuState, load_vcpu_state, save_vcpu_state
from .vm_state import VmState, load_vm_state, save_vm_state

__all__ = ["SYNC_ALL", "SYNC_EVENTS", "SYNC_REGS", "SYNC_SREGS", "ClockData", "DebugRegs",
           "IoapicState", "PicState", "PitState", "SyncedRegs", "VcpuState", "VmState", "Xcrs",
           "Xsave", "load_vcpu_state", "load_vm_state", "save_vcpu_state", "save_vm_state"]
