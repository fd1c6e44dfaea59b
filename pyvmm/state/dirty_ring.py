# SPDX-License-Identifier: GPL-2.0-or-later
"""Dirty-page rings (KVM_CAP_DIRTY_LOG_RING): instead of a bitmap per memslot, KVM appends
each page a vCPU dirties to that vCPU's ring, a shared array of struct kvm_dirty_gfn mmapped
from the vCPU fd. Userspace harvests entries in order (flags DIRTY), marks them harvested
(flags RESET), and KVM_RESET_DIRTY_RINGS re-protects those pages and frees the entries. A
vCPU whose ring is nearly full exits with DirtyRingFullExit until it is harvested.

The ring is enabled on the VM before its first vCPU exists, in bytes (a power of two, at
least a page, at most what KVM_CAP_DIRTY_LOG_RING says); slots must log dirty pages.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

from .. import ioctls as io
from .._ffi import ffi
from ..caps import Cap
from ..errors import MissingCapability

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from ..vm import Vm

__all__ = ["DirtyRing", "enable_dirty_ring", "reset_dirty_rings"]

PAGE = 4096
DIRTY_LOG_PAGE_OFFSET = 64      # the ring's page offset in the vCPU mmap
GFN_DIRTY, GFN_RESET = 1, 2
ENTRY = 16                      # sizeof(struct kvm_dirty_gfn)


def enable_dirty_ring(vm: Vm, size: int) -> int:
    """Give every vCPU of `vm` (created after this) a dirty ring of `size` bytes; returns the
    number of entries per ring."""
    offered = vm.check_extension(Cap.DIRTY_LOG_RING)
    if not offered:
        raise MissingCapability(Cap.DIRTY_LOG_RING, "KVM_ENABLE_CAP", vm.role,
                                "this host has no dirty-page rings (use dirty_log())")
    if size < PAGE or size & (size - 1) or size > offered:
        raise ValueError(f"a dirty ring is a power of two of {PAGE}..{offered} bytes, "
                         f"not {size}")
    if vm.vcpus:
        raise ValueError("enable the dirty ring before creating vCPUs")
    vm.enable_cap(Cap.DIRTY_LOG_RING, size)
    return size // ENTRY


def reset_dirty_rings(vm: Vm) -> int:
    """KVM_RESET_DIRTY_RINGS: re-protect the pages of every harvested entry (flags RESET) of
    every vCPU and free those entries; returns how many were reset."""
    return vm.ioctl(io.KVM_RESET_DIRTY_RINGS)


class DirtyRing:
    """One vCPU's dirty ring, mapped from its fd. `harvest()` returns the pages dirtied since
    the last harvest as (slot, page offset in the slot), in the order KVM logged them."""

    def __init__(self, vcpu: Vcpu, size: int) -> None:
        if size < PAGE or size & (size - 1):
            raise ValueError(f"dirty ring size {size} is not a power of two >= {PAGE}")
        self.entries = size // ENTRY
        self._map = mmap.mmap(vcpu.fileno(), size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=DIRTY_LOG_PAGE_OFFSET * PAGE)
        self._ring = ffi.from_buffer("struct kvm_dirty_gfn[]", self._map,
                                     require_writable=True)
        self._next = 0  # the next entry to harvest (KVM fills in order, wrapping)

    def harvest(self) -> list[tuple[int, int]]:
        """Take every entry KVM has published (flags DIRTY) and mark it harvested (RESET);
        call reset_dirty_rings() afterwards to let KVM reuse them."""
        if self._ring is None:
            raise ValueError("the dirty ring is closed")
        out = []
        ring, n = self._ring, self.entries
        while True:
            entry = ring[self._next % n]
            if not entry.flags & GFN_DIRTY:
                break
            out.append((int(entry.slot), int(entry.offset)))
            entry.flags = GFN_RESET  # x86 stores are ordered: the reads above come first
            self._next += 1
        return out

    def close(self) -> None:
        """Unmap the ring."""
        if self._ring is not None:
            ffi.release(self._ring)
            self._ring = None
            self._map.close()

    def __enter__(self) -> DirtyRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
