# SPDX-License-Identifier: GPL-2.0-or-later
"""guest_memfd: memory that belongs to one VM (KVM_CREATE_GUEST_MEMFD), as a handle that owns
its fd, and the names of the VM types and guest_memfd flags the capabilities report.

A guest_memfd is bound to a memslot with KVM_SET_USER_MEMORY_REGION2 and KVM_MEM_GUEST_MEMFD
(`Vm.set_user_memory_region2`, raw: `add_memory` does not take a guest_memfd yet). Whether guest accesses then reach the guest_memfd or the slot's
ordinary host mapping depends on the page's private/shared attribute, which needs
KVM_CAP_MEMORY_ATTRIBUTES; without it every page is shared. A guest_memfd created with
GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED can be mapped by the host, and pyvmm then
uses that mapping as the slot's host memory, so host and guest see the same bytes however KVM
reaches them. Without INIT_SHARED the pages start private and a host access to a mapping of
them raises SIGBUS, so pyvmm never maps such a guest_memfd.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import ioctls as io
from ._ffi import constants, ffi
from .caps import Cap
from .errors import ClosedError, MissingCapability

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["GUEST_MEMFD_FLAG_INIT_SHARED", "GUEST_MEMFD_FLAG_MMAP", "GuestMemfd",
           "create_guest_memfd", "guest_memfd_flag_names", "vm_type_names"]

GUEST_MEMFD_FLAG_MMAP = 1
GUEST_MEMFD_FLAG_INIT_SHARED = 2
PAGE_SIZE = 4096

#: KVM_X86_*_VM type number -> name ("DEFAULT", "SW_PROTECTED", "SEV", ...).
VM_TYPES = {value: name[:-3] for name, value in constants("KVM_X86_").items()
            if name.endswith("_VM")}
_FLAG_NAMES = {value: name for name, value in constants("GUEST_MEMFD_FLAG_").items()}


def _bit_names(mask: int, names: dict[int, str], bitwise: bool) -> list[str]:
    out = []
    for bit in range(64):
        if mask >> bit & 1:
            key = bit if not bitwise else 1 << bit
            out.append(names.get(key, f"bit {bit}"))
    return out


def vm_type_names(mask: int) -> list[str]:
    """The VM types bit n of a KVM_CAP_VM_TYPES mask offers (bit n = KVM_CREATE_VM type n)."""
    return _bit_names(mask, VM_TYPES, bitwise=False)


def guest_memfd_flag_names(mask: int) -> list[str]:
    """The GUEST_MEMFD_FLAG_* names of a KVM_CAP_GUEST_MEMFD_FLAGS mask."""
    return _bit_names(mask, _FLAG_NAMES, bitwise=True)


class GuestMemfd:
    """A guest_memfd of `size` bytes (KVM_CREATE_GUEST_MEMFD on a VM fd). Owns its fd: close()
    (or the context manager, or the VM's close) closes it. A memslot bound to it keeps the
    kernel's file alive after close, so closing the handle never pulls memory from a guest."""

    def __init__(self, fd: int, size: int, flags: int) -> None:
        self._fd = fd
        self.size = size
        self.flags = flags

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedError("guest_memfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def mappable(self) -> bool:
        """Whether the host may map it (MMAP and INIT_SHARED: its pages start shared)."""
        both = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        return self.flags & both == both

    def close(self) -> None:
        """Close the fd (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> GuestMemfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        flags = "|".join(guest_memfd_flag_names(self.flags)) or "0"
        return f"GuestMemfd(fd={self._fd}, size={self.size:#x}, flags={flags})"


def supported_flags(vm: Vm) -> int:
    """The GUEST_MEMFD_FLAG_* bits this VM accepts (0 on kernels before the flags cap)."""
    return vm.check_extension(Cap.GUEST_MEMFD_FLAGS)


def create_guest_memfd(vm: Vm, size: int, flags: int = 0) -> GuestMemfd:
    """KVM_CREATE_GUEST_MEMFD on `vm`: checks the size (a positive multiple of 4 KiB), the
    flags' type, the capability and the flags (those KVM_CAP_GUEST_MEMFD_FLAGS offers), in
    that order, before the ioctl: a bad argument is a ValueError on any host."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"guest_memfd size {size!r} is not a positive multiple of 4 KiB")
    if isinstance(flags, bool) or not isinstance(flags, int) or flags < 0:
        raise ValueError(f"guest_memfd flags {flags!r} must be an int >= 0")
    if not vm.check_extension(Cap.GUEST_MEMFD):
        raise MissingCapability(Cap.GUEST_MEMFD, "KVM_CREATE_GUEST_MEMFD", vm.role,
                                "guest_memfd needs Linux 6.8 or later (stock 6.1 lacks it)")
    offered = supported_flags(vm)
    if flags & ~offered:
        names = "|".join(guest_memfd_flag_names(flags & ~offered))
        raise MissingCapability(Cap.GUEST_MEMFD_FLAGS, "KVM_CREATE_GUEST_MEMFD", vm.role,
                                f"flags {names} are not offered for this VM (it accepts "
                                f"{'|'.join(guest_memfd_flag_names(offered)) or 'none'})")
    req = ffi.new("struct kvm_create_guest_memfd *", {"size": size, "flags": flags})
    fd = vm.ioctl(io.KVM_CREATE_GUEST_MEMFD, req, detail=f"size {size:#x} flags {flags:#x}")
    return GuestMemfd(fd, size, flags)
