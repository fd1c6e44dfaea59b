# SPDX-License-Identifier: GPL-2.0-or-later
"""Changing a live memslot: `Vm.move_memory` (a new guest-physical address, KVM's
KVM_MR_MOVE) and `Vm.set_memory_flags` (dirty logging on or off). `Vm` inherits them; the
bookkeeping is `GuestMemory.move` / `GuestMemory.set_flags`. Also the raw
KVM_SET_USER_MEMORY_REGION2, the form of the memslot ioctl that can name a guest_memfd."""

from __future__ import annotations

import threading

from . import ioctls as io
from ._ffi import ffi
from .args import as_index
from .memory import KVM_MEM_GUEST_MEMFD, GuestMemory, MemoryRegion

__all__ = ["KVM_MEM_GUEST_MEMFD", "VmMemoryMethods"]



class VmMemoryMethods:
    """`move_memory()` and `set_memory_flags()`. The class using it provides `memory`,
    `_lock` and `fileno()`."""

    memory: GuestMemory
    _lock: threading.RLock

    def fileno(self) -> int:
        raise NotImplementedError

    def ioctl(self, request: int, arg: object = 0, detail: str | None = None) -> int:
        raise NotImplementedError

    def set_user_memory_region2(self, slot: int, flags: int, gpa: int, size: int, host: int,
                                *, guest_memfd: int = 0, guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2 as is (KVM_CAP_USER_MEMORY2): the slot (address space
        in bits 16-31) with `flags`, `size` bytes at `gpa` backed by host address `host`
        and, with KVM_MEM_GUEST_MEMFD in `flags`, by the guest_memfd fd `guest_memfd` from
        `guest_memfd_offset`. No bookkeeping, as `set_user_memory_region`: the caller owns
        the host memory and the slot number. A refusal is a KvmError with its errno (EINVAL
        for the guest_memfd flag where KVM_CAP_GUEST_MEMFD is absent)."""
        req = ffi.new("struct kvm_userspace_memory_region2 *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size,
            "userspace_addr": host, "guest_memfd_offset": guest_memfd_offset,
            "guest_memfd": guest_memfd})
        self.ioctl(io.KVM_SET_USER_MEMORY_REGION2, req,
                   detail=f"slot {slot:#x} flags {flags:#x} gpa {gpa:#x} size {size:#x}"
                   + (f" guest_memfd {guest_memfd} at {guest_memfd_offset:#x}"
                      if flags & KVM_MEM_GUEST_MEMFD else ""))

    def move_memory(self, region: MemoryRegion, guest_addr: int) -> MemoryRegion:
        """Show `region` at guest-physical `guest_addr` from now on: the same slot, size,
        host memory and flags (read-only, dirty logging) at a new address, in one
        KVM_SET_USER_MEMORY_REGION (KVM's KVM_MR_MOVE). Returns the region, whose
        `guest_addr` (and the VM's address lookups) follow it.

        A vCPU may be running meanwhile: KVM makes it wait for the change, and from then on
        its accesses to the old range are MMIO exits (unless other memory is there) and
        the new range reads the region's memory.

        Checked before any ioctl (ValueError): the region is a live one of this VM, the
        address is page-aligned and the region still ends inside the 52-bit guest-physical
        space, and the new range overlaps no other region of its address space (its own old
        range it may). A region with aliases (`alias_memory`) is refused: the aliases show
        its host memory at their own addresses and would stay behind; remove them first.
        An alias itself may move. Moving a region to where it is does nothing. A kernel
        refusal is a KvmError with its errno, and the region stays where it was."""
        guest_addr = as_index("guest address", guest_addr)
        with self._lock:
            self.fileno()
            self.memory.move(region, guest_addr)
            return region

    def set_memory_flags(self, region: MemoryRegion, *, log_dirty: bool | None = None,
                         readonly: bool | None = None) -> None:
        """Toggle a live region's dirty logging (KVM_MEM_LOG_DIRTY_PAGES) in place with
        KVM_SET_USER_MEMORY_REGION of the same slot; None keeps a flag as it is. Turned on,
        KVM logs guest writes from then on (`dirty_log()`); `set_log_dirty` does the same.

        KVM cannot change KVM_MEM_READONLY of a live memslot (it answers EINVAL): a
        `readonly` different from the region's is a ValueError before any ioctl; remove the
        region and add it again instead. Aliases keep the flags they were made with."""
        with self._lock:
            self.fileno()
            self.memory.set_flags(region, log_dirty=log_dirty, readonly=readonly)
