# SPDX-License-Identifier: GPL-2.0-or-later
"""Capability masks a VM builds up over several calls (hypercall exits, disabled quirks):
the bookkeeping behind `Vm.enable_hypercall_exits` and `Vm.disable_quirks`, on the VM's
public `check_extension` and `enable_cap`. `Vm` inherits them."""

from __future__ import annotations

import threading

from .caps import Cap
from .errors import MissingCapability

__all__ = ["VmCapsMixin"]


class VmCapsMixin:
    """The masks enabled so far, and the calls that add to them."""

    role = "vm"
    _hypercall_exits = 0      # KVM_CAP_EXIT_HYPERCALL mask enabled so far
    _disabled_quirks = 0      # KVM_CAP_DISABLE_QUIRKS2 mask disabled so far
    _caps_lock = threading.Lock()   # rare calls: one lock for every VM is enough

    def check_extension(self, cap: int) -> int:
        raise NotImplementedError

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        raise NotImplementedError

    def enable_hypercall_exits(self, *numbers: int) -> int:
        """Send the hypercalls `numbers` (KVM_HC_*) to userspace as HypercallExit
        (KVM_CAP_EXIT_HYPERCALL). Adds to the numbers enabled before; returns the whole mask.

        Raises MissingCapability when this host's mask (KVM_CHECK_EXTENSION) lacks one of
        them. Stock KVM offers only KVM_HC_MAP_GPA_RANGE (12); every other hypercall stays in
        the kernel (an unknown number returns -KVM_ENOSYS to the guest). Note that kvm_pvm
        reports the capability but never delivers the exit (a CPL0 hypercall hangs KVM_RUN).
        """
        mask = 0
        for nr in numbers:
            if not 0 <= int(nr) < 64:
                raise ValueError(f"hypercall number {nr} cannot be in the 64-bit exit mask")
            mask |= 1 << int(nr)
        supported = self.check_extension(Cap.EXIT_HYPERCALL)
        if mask & ~supported:
            offered = [n for n in range(64) if supported >> n & 1]
            wanted = [n for n in range(64) if mask >> n & 1 and not supported >> n & 1]
            raise MissingCapability(
                Cap.EXIT_HYPERCALL, "KVM_ENABLE_CAP", self.role,
                f"hypercall number(s) {wanted} cannot exit to userspace; this KVM offers "
                f"{offered or 'none'}")
        with self._caps_lock:
            new = self._hypercall_exits | mask
            self.enable_cap(Cap.EXIT_HYPERCALL, new)
            self._hypercall_exits = new
        return new

    def disable_quirks(self, mask: int) -> int:
        """Turn off KVM quirks (KVM_CAP_DISABLE_QUIRKS2; KVM_X86_QUIRK_* bits of
        kernel_headers/constants.h, e.g. 32 = FIX_HYPERCALL_INSN: without it, the other
        vendor's hypercall instruction raises #UD instead of being patched). Adds to the
        quirks disabled before; returns the whole mask. Raises MissingCapability for a bit
        this KVM cannot disable."""
        if mask < 0:
            raise ValueError("quirk mask must be >= 0")
        supported = self.check_extension(Cap.DISABLE_QUIRKS2)
        if mask & ~supported:
            raise MissingCapability(
                Cap.DISABLE_QUIRKS2, "KVM_ENABLE_CAP", self.role,
                f"quirk bits {mask & ~supported:#x} cannot be disabled; this KVM allows "
                f"{supported:#x}")
        with self._caps_lock:
            new = self._disabled_quirks | mask
            self.enable_cap(Cap.DISABLE_QUIRKS2, new)
            self._disabled_quirks = new
        return new
