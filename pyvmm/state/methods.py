# SPDX-License-Identifier: GPL-2.0-or-later
"""The x86-state methods of `Vm` (it inherits this class): thin faces of pyvmm.state's
functions, which hold the ioctl and struct work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from . import dirty_ring, vm_state

if TYPE_CHECKING:
    from ..vm import Vm

__all__ = ["VmStateMethods"]


class VmStateMethods:
    """get/set_clock, get/set_irqchip, get/set_pit, set_identity_map_addr, the manual dirty
    log, set_log_dirty, the dirty ring, save_state/load_state. The class using it provides `ioctl`,
    `check_extension`, `enable_cap`, `memory`, `vcpus`, `role` and
    `set_user_memory_region`."""

    memory: Any
    vcpus: dict
    role: str

    def ioctl(self, request: int, arg: object = 0, detail: str | None = None) -> int:
        raise NotImplementedError

    def check_extension(self, cap: int) -> int:
        raise NotImplementedError

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        raise NotImplementedError

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int,
                               host: int) -> None:
        raise NotImplementedError

    def get_clock(self):
        """KVM_GET_CLOCK: a `pyvmm.state.ClockData` (kvmclock ns)."""
        return vm_state.get_clock(cast("Vm", self))

    def set_clock(self, clock, *, realtime: bool = False) -> None:
        """KVM_SET_CLOCK to a ClockData or a number of ns."""
        vm_state.set_clock(cast("Vm", self), clock, realtime=realtime)

    def get_irqchip(self, chip: int):
        """KVM_GET_IRQCHIP: chip 0 PIC master, 1 PIC slave (PicState), 2 IOAPIC (IoapicState)."""
        return vm_state.get_irqchip(cast("Vm", self), chip)

    def set_irqchip(self, chip: int, state) -> None:
        """KVM_SET_IRQCHIP of one controller."""
        vm_state.set_irqchip(cast("Vm", self), chip, state)

    def get_pit(self):
        """KVM_GET_PIT2: a `pyvmm.state.PitState`."""
        return vm_state.get_pit(cast("Vm", self))

    def set_pit(self, state) -> None:
        """KVM_SET_PIT2."""
        vm_state.set_pit(cast("Vm", self), state)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (before creating vCPUs)."""
        vm_state.set_identity_map_addr(cast("Vm", self), addr)

    def enable_manual_dirty_log(self, *, initially_set: bool = False) -> int:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: dirty pages are re-protected by clear_dirty_log."""
        return vm_state.enable_manual_dirty_log(cast("Vm", self), initially_set=initially_set)

    def clear_dirty_log(self, region, first_page: int = 0, num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG of pages of `region` (all by default)."""
        vm_state.clear_dirty_log(cast("Vm", self), region, first_page, num_pages)

    def set_log_dirty(self, region, enabled: bool = True) -> None:
        """Turn dirty-page logging of a live `region` on or off (KVM_SET_USER_MEMORY_REGION
        of the same slot with the flag toggled): turned on, KVM logs writes from now on.
        The same as `set_memory_flags(region, log_dirty=enabled)`."""
        self.memory.set_flags(region, log_dirty=bool(enabled))

    def enable_dirty_ring(self, size: int) -> int:
        """KVM_CAP_DIRTY_LOG_RING of `size` bytes per vCPU (before creating vCPUs); returns
        the entries per ring. Read a vCPU's with `pyvmm.state.dirty_ring.DirtyRing`."""
        return dirty_ring.enable_dirty_ring(cast("Vm", self), size)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect harvested pages and free their ring entries."""
        return dirty_ring.reset_dirty_rings(cast("Vm", self))

    def save_state(self):
        """The VM-wide state (clock, PICs, IOAPIC, PIT): a picklable `pyvmm.state.VmState`."""
        return vm_state.save_vm_state(cast("Vm", self))

    def load_state(self, state) -> None:
        """Load a VmState into this VM (which has the same in-kernel devices)."""
        vm_state.load_vm_state(cast("Vm", self), state)
