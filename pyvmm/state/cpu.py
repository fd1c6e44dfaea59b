# SPDX-License-Identifier: GPL-2.0-or-later
"""The vCPU state ioctls pyvmm.Vcpu does not cover itself: XSAVE (KVM_GET_XSAVE2 where the host
has it), XCRs, debug registers, TSC frequency, KVMCLOCK_CTRL and nested state.

Plain functions of a `Vcpu`, using only its public API (fileno(), role, vm); the thin methods
of the same names on Vcpu call these.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .. import ioctls as io
from .._ffi import ffi
from ..caps import Cap
from ..errors import KvmError, MissingCapability
from .structs import DebugRegs, Xcrs, Xsave

if TYPE_CHECKING:
    from ..vcpu import Vcpu

__all__ = ["get_debugregs", "get_nested_state", "get_tsc_khz", "get_xcrs", "get_xsave",
           "kvmclock_ctrl", "lapic_in_kernel", "nested_state_size", "set_debugregs",
           "set_nested_state", "set_tsc_khz", "set_xcrs", "set_xsave", "xsave_size"]

XSAVE_LEGACY_SIZE = 4096      # sizeof(struct kvm_xsave): what KVM_GET_XSAVE fills
NESTED_HEADER_SIZE = 128      # sizeof(struct kvm_nested_state) without its data


def _ioctl(vcpu: Vcpu, request: int, arg: object = 0, detail: str | None = None) -> int:
    return vcpu.ioctl(request, arg, detail)


def _need(vcpu: Vcpu, cap: Cap, ioctl: str, why: str) -> int:
    value = vcpu.host.check_extension(cap)
    if not value:
        raise MissingCapability(cap, ioctl, vcpu.role, why)
    return value


# -- XSAVE -----------------------------------------------------------------------------------

def xsave_size(vcpu: Vcpu) -> int:
    """Bytes of this vCPU's XSAVE area: KVM_CAP_XSAVE2's size (it grows with the features the
    process has been permitted, e.g. AMX), at least 4096."""
    return max(vcpu.host.check_extension(Cap.XSAVE2), XSAVE_LEGACY_SIZE)


def get_xsave(vcpu: Vcpu, *, xsave2: bool | None = None) -> Xsave:
    """KVM_GET_XSAVE2 (every state component, however large) where KVM_CAP_XSAVE2 is offered,
    else KVM_GET_XSAVE (the first 4096 bytes). `xsave2=False` asks for the old ioctl."""
    if xsave2 is None:
        xsave2 = bool(vcpu.host.check_extension(Cap.XSAVE2))
    if xsave2:
        _need(vcpu, Cap.XSAVE2, "KVM_GET_XSAVE2", "this host has only KVM_GET_XSAVE")
        size = xsave_size(vcpu)
        buf = ffi.new("char[]", size)
        _ioctl(vcpu, io.KVM_GET_XSAVE2, ffi.cast("struct kvm_xsave *", buf))
        return Xsave(ffi.buffer(buf)[:])
    _need(vcpu, Cap.XSAVE, "KVM_GET_XSAVE", "no XSAVE state on this host (use get_fpu())")
    buf = ffi.new("struct kvm_xsave *")
    _ioctl(vcpu, io.KVM_GET_XSAVE, buf)
    return Xsave(ffi.buffer(buf)[:])


def set_xsave(vcpu: Vcpu, xsave: Xsave) -> None:
    """KVM_SET_XSAVE; KVM reads KVM_CAP_XSAVE2's size (or 4096) bytes."""
    if not isinstance(xsave, Xsave):
        raise TypeError(f"expected Xsave, got {type(xsave).__name__}")
    _need(vcpu, Cap.XSAVE, "KVM_SET_XSAVE", "no XSAVE state on this host (use set_fpu())")
    size = xsave_size(vcpu)
    if len(xsave.data) > size and any(xsave.data[size:]):
        raise ValueError(f"the XSAVE area has {len(xsave.data)} bytes; this vCPU takes {size}")
    buf = ffi.new("char[]", size)
    n = min(size, len(xsave.data))
    ffi.memmove(buf, bytes(xsave.data[:n]), n)
    _ioctl(vcpu, io.KVM_SET_XSAVE, ffi.cast("struct kvm_xsave *", buf))


# -- XCRs, debug registers ---------------------------------------------------------------------

def get_xcrs(vcpu: Vcpu) -> Xcrs:
    """KVM_GET_XCRS: the extended control registers (XCR0)."""
    _need(vcpu, Cap.XCRS, "KVM_GET_XCRS", "no XCR state on this host")
    xcrs = Xcrs()
    _ioctl(vcpu, io.KVM_GET_XCRS, xcrs._c)
    return xcrs


def set_xcrs(vcpu: Vcpu, xcrs: Xcrs) -> None:
    """KVM_SET_XCRS."""
    _need(vcpu, Cap.XCRS, "KVM_SET_XCRS", "no XCR state on this host")
    xcrs = Xcrs.cast(xcrs)
    if not 0 <= xcrs.nr_xcrs <= 16:
        raise ValueError(f"nr_xcrs {xcrs.nr_xcrs} is outside 0..16")
    _ioctl(vcpu, io.KVM_SET_XCRS, xcrs._c)


def get_debugregs(vcpu: Vcpu) -> DebugRegs:
    """KVM_GET_DEBUGREGS: DR0-3, DR6, DR7."""
    regs = DebugRegs()
    _ioctl(vcpu, io.KVM_GET_DEBUGREGS, regs._c)
    return regs


def set_debugregs(vcpu: Vcpu, regs: DebugRegs) -> None:
    """KVM_SET_DEBUGREGS (`flags` must be 0; DR6/DR7's upper 32 bits too: KVM says EINVAL)."""
    regs = DebugRegs.cast(regs)
    if regs.flags:
        raise ValueError(f"debugregs flags must be 0, got {regs.flags:#x}")
    _ioctl(vcpu, io.KVM_SET_DEBUGREGS, regs._c)


# -- TSC and kvmclock --------------------------------------------------------------------------

def get_tsc_khz(vcpu: Vcpu) -> int:
    """KVM_GET_TSC_KHZ: the guest TSC frequency in kHz."""
    _need(vcpu, Cap.GET_TSC_KHZ, "KVM_GET_TSC_KHZ", "KVM cannot report the TSC frequency")
    return _ioctl(vcpu, io.KVM_GET_TSC_KHZ)


def set_tsc_khz(vcpu: Vcpu, khz: int) -> None:
    """KVM_SET_TSC_KHZ: scale this vCPU's TSC to `khz`. Needs TSC scaling in hardware
    (KVM_CAP_TSC_CONTROL); a host without it accepts only its own frequency."""
    if not isinstance(khz, int) or not 0 < khz < 1 << 32:
        raise ValueError(f"TSC frequency {khz!r} kHz is outside 1..2**32-1")
    if not vcpu.host.check_extension(Cap.TSC_CONTROL):
        if khz == get_tsc_khz(vcpu):
            return  # nothing to scale: what a host without TSC scaling also accepts
        raise MissingCapability(Cap.TSC_CONTROL, "KVM_SET_TSC_KHZ", vcpu.role,
                                f"no TSC scaling on this host: the TSC stays at "
                                f"{get_tsc_khz(vcpu)} kHz, {khz} kHz was asked for")
    _ioctl(vcpu, io.KVM_SET_TSC_KHZ, khz, detail=f"{khz} kHz")


def kvmclock_ctrl(vcpu: Vcpu) -> None:
    """KVM_KVMCLOCK_CTRL: tell a paused guest's kvmclock that it was stopped by the host (so
    its soft-lockup watchdog does not fire). EINVAL when the guest has not enabled kvmclock."""
    _need(vcpu, Cap.KVMCLOCK_CTRL, "KVM_KVMCLOCK_CTRL", "no KVMCLOCK_CTRL on this host")
    _ioctl(vcpu, io.KVM_KVMCLOCK_CTRL)


# -- nested virtualisation --------------------------------------------------------------------

def nested_state_size(vcpu: Vcpu) -> int:
    """KVM_CAP_NESTED_STATE: the largest nested state in bytes; 0 where there is none."""
    return vcpu.host.check_extension(Cap.NESTED_STATE)


def get_nested_state(vcpu: Vcpu) -> bytes:
    """KVM_GET_NESTED_STATE: the whole struct kvm_nested_state (header and VMX/SVM data), as
    bytes for set_nested_state. Raises MissingCapability where the host has no nested state
    (kvm_pvm; stock kvm_amd/kvm_intel with nested=1 have it)."""
    size = _need(vcpu, Cap.NESTED_STATE, "KVM_GET_NESTED_STATE",
                 "no nested virtualisation state on this host (stock KVM has it: try "
                 "`pyvmm nested`)")
    buf = ffi.new("char[]", max(size, NESTED_HEADER_SIZE))
    state = ffi.cast("struct kvm_nested_state *", buf)
    state.size = max(size, NESTED_HEADER_SIZE)
    _ioctl(vcpu, io.KVM_GET_NESTED_STATE, state)
    return ffi.buffer(buf)[:state.size]


def set_nested_state(vcpu: Vcpu, data: bytes) -> None:
    """KVM_SET_NESTED_STATE with what get_nested_state returned."""
    _need(vcpu, Cap.NESTED_STATE, "KVM_SET_NESTED_STATE",
          "no nested virtualisation state on this host (stock KVM has it: try `pyvmm nested`)")
    if len(data) < NESTED_HEADER_SIZE:
        raise ValueError(f"nested state has at least {NESTED_HEADER_SIZE} bytes, "
                         f"got {len(data)}")
    buf = ffi.new("char[]", bytes(data))
    state = ffi.cast("struct kvm_nested_state *", buf)
    if state.size != len(data):
        raise ValueError(f"nested state header says {state.size} bytes, got {len(data)}")
    _ioctl(vcpu, io.KVM_SET_NESTED_STATE, state)


def lapic_in_kernel(vcpu: Vcpu) -> bool:
    """Whether this vCPU has an in-kernel local APIC (the VM has an irqchip)."""
    try:
        vcpu.get_lapic()
    except KvmError as err:
        if err.errno in (errno.EINVAL, errno.ENXIO):  # no LAPIC in the kernel
            return False
        raise
    return True
