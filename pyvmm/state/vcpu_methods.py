# SPDX-License-Identifier: GPL-2.0-or-later
"""The x86-state methods of `Vcpu` (it inherits this class): thin faces of pyvmm.state's
functions, which hold the ioctl and struct work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from . import cpu, syncregs, vcpu_state

if TYPE_CHECKING:
    from ..vcpu import Vcpu

__all__ = ["VcpuStateMethods"]


def _vcpu(obj: Any) -> Vcpu:
    return cast("Vcpu", obj)


class VcpuStateMethods:
    """get/set_xsave, get/set_xcrs, get/set_debugregs, get/set_tsc_khz, kvmclock_ctrl,
    get/set_nested_state, the typed sync_regs, save_state/load_state."""

    __slots__ = ()

    def get_xsave(self, *, xsave2: bool | None = None):
        """KVM_GET_XSAVE2 (KVM_CAP_XSAVE2's size) or KVM_GET_XSAVE: a `pyvmm.state.Xsave`."""
        return cpu.get_xsave(_vcpu(self), xsave2=xsave2)

    def set_xsave(self, xsave) -> None:
        """KVM_SET_XSAVE of a `pyvmm.state.Xsave`."""
        cpu.set_xsave(_vcpu(self), xsave)

    def get_xcrs(self):
        """KVM_GET_XCRS: a `pyvmm.state.Xcrs` (XCR0 and any others)."""
        return cpu.get_xcrs(_vcpu(self))

    def set_xcrs(self, xcrs) -> None:
        """KVM_SET_XCRS."""
        cpu.set_xcrs(_vcpu(self), xcrs)

    def get_debugregs(self):
        """KVM_GET_DEBUGREGS: a `pyvmm.state.DebugRegs` (db[0..3], dr6, dr7)."""
        return cpu.get_debugregs(_vcpu(self))

    def set_debugregs(self, regs) -> None:
        """KVM_SET_DEBUGREGS."""
        cpu.set_debugregs(_vcpu(self), regs)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency in kHz."""
        return cpu.get_tsc_khz(_vcpu(self))

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (needs KVM_CAP_TSC_CONTROL unless `khz` is already the rate)."""
        cpu.set_tsc_khz(_vcpu(self), khz)

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest's kvmclock the host paused it."""
        cpu.kvmclock_ctrl(_vcpu(self))

    def get_nested_state(self) -> bytes:
        """KVM_GET_NESTED_STATE (where the host has KVM_CAP_NESTED_STATE)."""
        return cpu.get_nested_state(_vcpu(self))

    def set_nested_state(self, data: bytes) -> None:
        """KVM_SET_NESTED_STATE."""
        cpu.set_nested_state(_vcpu(self), data)

    def set_sync_regs(self, mask: int) -> None:
        """Have KVM fill kvm_run's s.regs at every exit with these sets (pyvmm.state.SYNC_*)."""
        syncregs.set_sync_regs(_vcpu(self), mask)

    def get_synced_regs(self):
        """Copies of the register sets KVM synced at the last exit (`SyncedRegs`)."""
        return syncregs.get_synced_regs(_vcpu(self))

    def put_synced_regs(self, *, regs=None, sregs=None, events=None) -> None:
        """Write register sets into kvm_run for the next KVM_RUN to load (kvm_dirty_regs)."""
        syncregs.put_synced_regs(_vcpu(self), regs=regs, sregs=sregs, events=events)

    def save_state(self, *, complete_io: bool = True):
        """Everything KVM needs to resume this vCPU: a picklable `pyvmm.state.VcpuState`."""
        return vcpu_state.save_vcpu_state(_vcpu(self), complete_io=complete_io)

    def load_state(self, state) -> None:
        """Load a VcpuState into this fresh vCPU, in the order KVM requires."""
        vcpu_state.load_vcpu_state(_vcpu(self), state)
