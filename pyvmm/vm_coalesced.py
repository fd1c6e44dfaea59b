# SPDX-License-Identifier: GPL-2.0-or-later
"""Coalesced MMIO/PIO zones of a VM: KVM_REGISTER_COALESCED_MMIO and
KVM_UNREGISTER_COALESCED_MMIO (struct kvm_coalesced_mmio_zone), and the VM's ring
(`pyvmm.coalesced.CoalescedRing`). `Vm` inherits `CoalescedMethods`.

The kernel accepts zones pyvmm refuses, because they cannot work or cannot be undone: a zero
size or a range past the end of the address space (the kernel registers them), a zone
overlapping another (unregistering removes the first zone that contains the range given, so
with overlaps it could remove the wrong one), and unregistering a zone that was never
registered (the kernel returns success and does nothing). Those are ValueErrors before any
ioctl; a kernel failure (ENOSPC: the VM's I/O bus is full) is a KvmError with its errno.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from . import ioctls as io
from ._ffi import ffi
from .args import as_index
from .caps import Cap
from .coalesced import CoalescedRing
from .errors import MissingCapability

if TYPE_CHECKING:
    from .vcpu import Vcpu

__all__ = ["CoalescedMethods", "CoalescedZone"]

MMIO_SPACE = 1 << 64
PIO_SPACE = 0x10000
MAX_ZONE_SIZE = 0xFFFFFFFF      # zone.size is a u32

#: (address, size, pio) of one registered zone.
CoalescedZone = tuple[int, int, bool]


class CoalescedMethods:
    """`Vm.register_coalesced_mmio()`, `unregister_coalesced_mmio()`, `coalesced_zones`
    and `coalesced_ring()`."""

    role = "vm"
    _coalesced_lock = threading.Lock()   # rare calls: one lock for every VM is enough
    _coalesced_ring: CoalescedRing | None = None

    if TYPE_CHECKING:
        vcpus: dict[int, Vcpu]

        def check_extension(self, cap: int) -> int: ...

        def ioctl(self, request: int, arg: object = 0, detail: str | None = None) -> int: ...

        def add_close_hook(self, hook): ...

    @property
    def coalesced_zones(self) -> list[CoalescedZone]:
        """The zones registered on this VM, as (address, size, pio), in registration order."""
        return list(self.__dict__.get("_zones", ()))

    def _zone_request(self, address: int, size: int, pio: bool):
        address = as_index("coalesced zone address", address)
        size = as_index("coalesced zone size", size)
        if not isinstance(pio, bool):
            raise TypeError(f"pio must be a bool, not {pio!r}")
        space = PIO_SPACE if pio else MMIO_SPACE
        kind = "port" if pio else "MMIO"
        if not 0 < size <= MAX_ZONE_SIZE:
            raise ValueError(f"a coalesced {kind} zone's size must be 1..{MAX_ZONE_SIZE:#x}, "
                             f"not {size:#x}")
        if address < 0 or address + size > space:
            raise ValueError(f"coalesced {kind} zone {address:#x}+{size:#x} is outside the "
                             f"{kind} address space (0..{space - 1:#x})")
        cap = Cap.COALESCED_PIO if pio else Cap.COALESCED_MMIO
        if self.check_extension(cap) <= 0:
            raise MissingCapability(cap, "KVM_REGISTER_COALESCED_MMIO", self.role,
                                    f"this host cannot coalesce {kind} writes")
        req = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": address, "size": size})
        req.pio = 1 if pio else 0
        return (address, size, pio), req

    def register_coalesced_mmio(self, address: int, size: int, *, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO: guest writes to `address`..`address + size - 1`
        (guest-physical, or ports with `pio=True`) no longer exit; KVM appends them to the
        ring (see `coalesced_ring()`). Reads still exit. Zones may not overlap."""
        zone, req = self._zone_request(address, size, pio)
        with self._coalesced_lock:
            zones: list[CoalescedZone] = self.__dict__.setdefault("_zones", [])
            for a, s, p in zones:
                if p == pio and a < address + size and address < a + s:
                    raise ValueError(f"coalesced zone {address:#x}+{size:#x} overlaps the "
                                     f"registered zone {a:#x}+{s:#x}")
            self.ioctl(io.KVM_REGISTER_COALESCED_MMIO, req,
                       detail=f"{'pio' if pio else 'mmio'} zone {address:#x}+{size:#x} "
                       "(ENOSPC: the VM's I/O bus has no room for another device)")
            zones.append(zone)

    def unregister_coalesced_mmio(self, address: int, size: int, *,
                                  pio: bool = False) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO of a zone registered with these arguments: its
        writes exit again. Writes already in the ring stay there until drained."""
        zone, req = self._zone_request(address, size, pio)
        with self._coalesced_lock:
            zones: list[CoalescedZone] = self.__dict__.setdefault("_zones", [])
            if zone not in zones:
                raise ValueError(f"no coalesced {'port' if pio else 'MMIO'} zone "
                                 f"{address:#x}+{size:#x} is registered on this VM "
                                 f"(registered: {[(hex(a), hex(s), p) for a, s, p in zones]})")
            self.ioctl(io.KVM_UNREGISTER_COALESCED_MMIO, req,
                       detail=f"{'pio' if pio else 'mmio'} zone {address:#x}+{size:#x}")
            zones.remove(zone)

    def coalesced_ring(self) -> CoalescedRing:
        """The VM's coalesced-write ring, mapped (once) from any of its vCPUs and unmapped
        when the VM closes. Needs a vCPU and KVM_CAP_COALESCED_MMIO."""
        with self._coalesced_lock:
            ring = self._coalesced_ring
            if ring is not None and not ring.closed:
                return ring
            offset = self.check_extension(Cap.COALESCED_MMIO)
            if offset <= 0:
                raise MissingCapability(Cap.COALESCED_MMIO, "mmap", self.role,
                                        "this host has no coalesced-write ring")
            vcpu = next((v for v in list(self.vcpus.values()) if not v.closed), None)
            if vcpu is None:
                raise ValueError("the coalesced ring is mapped from a vCPU: create one first")
            ring = CoalescedRing(vcpu, offset)
            try:
                self.add_close_hook(lambda vm: ring.close())
            except BaseException:
                ring.close()
                raise
            self._coalesced_ring = ring
            return ring
