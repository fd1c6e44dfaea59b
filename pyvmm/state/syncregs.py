# SPDX-License-Identifier: GPL-2.0-or-later
"""Typed sync_regs: the register copies KVM keeps in the vCPU's kvm_run page (`s.regs`).

With KVM_CAP_SYNC_REGS, KVM writes the register sets named in `kvm_valid_regs` into kvm_run at
every exit, and on the next KVM_RUN loads the sets named in `kvm_dirty_regs` from there (then
clears that mask), so an exit handler reads and changes registers without a GET/SET ioctl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._ffi import ffi
from ..caps import Cap
from ..errors import MissingCapability
from ..structs import Regs, Sregs, VcpuEvents

if TYPE_CHECKING:
    from ..vcpu import Vcpu

__all__ = ["SYNC_ALL", "SYNC_EVENTS", "SYNC_REGS", "SYNC_SREGS", "SyncedRegs",
           "get_synced_regs", "put_synced_regs", "set_sync_regs", "sync_regs_mask"]

SYNC_REGS, SYNC_SREGS, SYNC_EVENTS = 1, 2, 4
SYNC_ALL = SYNC_REGS | SYNC_SREGS | SYNC_EVENTS


@dataclass
class SyncedRegs:
    """Copies of what KVM left in kvm_run at the last exit; None for a set not asked for."""

    regs: Regs | None = None
    sregs: Sregs | None = None
    events: VcpuEvents | None = None


def _run(vcpu: Vcpu):
    run = vcpu.kvm_run
    if run is None:
        vcpu.fileno()  # raises ClosedError
    return run


def _check_mask(vcpu: Vcpu, mask: int) -> None:
    if not isinstance(mask, int) or mask < 0:
        raise ValueError(f"sync_regs mask {mask!r} must be an int >= 0")
    offered = vcpu.host.check_extension(Cap.SYNC_REGS)
    if mask & ~offered:
        if not offered:
            raise MissingCapability(Cap.SYNC_REGS, "KVM_RUN", vcpu.role,
                                    "this host does not sync registers through kvm_run")
        raise ValueError(f"sync_regs mask {mask:#x} has bits this host does not offer "
                         f"(KVM_CAP_SYNC_REGS = {offered:#x})")


def set_sync_regs(vcpu: Vcpu, mask: int) -> None:
    """Ask KVM to fill these register sets (SYNC_REGS|SYNC_SREGS|SYNC_EVENTS) into kvm_run at
    every exit from now on; 0 turns it off."""
    _check_mask(vcpu, mask)
    _run(vcpu).kvm_valid_regs = mask


def sync_regs_mask(vcpu: Vcpu) -> int:
    """The register sets KVM fills at each exit (kvm_valid_regs)."""
    return int(_run(vcpu).kvm_valid_regs)


def _copy(cls, src):
    obj = cls()
    ffi.memmove(obj._c, ffi.addressof(src), ffi.sizeof(cls.ctype))
    return obj


def get_synced_regs(vcpu: Vcpu) -> SyncedRegs:
    """Copies of the register sets KVM synced at the last exit (those in kvm_valid_regs)."""
    run = _run(vcpu)
    valid = run.kvm_valid_regs
    s = run.s.regs
    return SyncedRegs(regs=_copy(Regs, s.regs) if valid & SYNC_REGS else None,
                      sregs=_copy(Sregs, s.sregs) if valid & SYNC_SREGS else None,
                      events=_copy(VcpuEvents, s.events) if valid & SYNC_EVENTS else None)


def put_synced_regs(vcpu: Vcpu, *, regs: Regs | None = None, sregs: Sregs | None = None,
                    events: VcpuEvents | None = None) -> None:
    """Write register sets into kvm_run and mark them dirty: the next KVM_RUN loads them into
    the vCPU (no SET ioctl). Call between exits, never while the vCPU runs."""
    mask = (SYNC_REGS if regs is not None else 0) | (SYNC_SREGS if sregs is not None else 0) \
        | (SYNC_EVENTS if events is not None else 0)
    _check_mask(vcpu, mask)
    run = _run(vcpu)
    s = run.s.regs
    for cls, value, dst in ((Regs, regs, "regs"), (Sregs, sregs, "sregs"),
                            (VcpuEvents, events, "events")):
        if value is not None:
            value = cls.cast(value)
            ffi.memmove(ffi.addressof(s, dst), value._c, ffi.sizeof(cls.ctype))
    run.kvm_dirty_regs |= mask
