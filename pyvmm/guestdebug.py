# SPDX-License-Identifier: GPL-2.0-or-later
"""Guest debugging: KVM_SET_GUEST_DEBUG (single-step, software and hardware breakpoints,
watchpoints) and KVM_TRANSLATE (guest-virtual to guest-physical addresses).

These are plain functions of a `Vcpu`, through its public `fileno()`; `Vcpu.set_guest_debug`
and `Vcpu.translate` are the thin methods users call.

How a stop arrives: with guest debugging on, KVM ends KVM_RUN with KVM_EXIT_DEBUG
(`exits.DebugExit`) for a single step or a hardware breakpoint (exception 1, #DB, the cause in
DR6) and for an `int3` executed by the guest (exception 3, #BP, `pc` at the int3). A #DB or #BP
that belongs to the guest itself (its own int3, its own debug registers) is given back with
`set_guest_debug(..., inject=DB_VECTOR | BP_VECTOR)`, which queues the exception for the next
entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ioctl_opt import IOC, IOC_READ, IOC_WRITE

from . import ioctls
from ._ffi import constants, ffi

if TYPE_CHECKING:
    from .vcpu import Vcpu

__all__ = [
    "BP_VECTOR",
    "DB_VECTOR",
    "DR6_BS",
    "GUESTDBG_BLOCKIRQ",
    "GUESTDBG_ENABLE",
    "GUESTDBG_INJECT_BP",
    "GUESTDBG_INJECT_DB",
    "GUESTDBG_SINGLESTEP",
    "GUESTDBG_USE_HW_BP",
    "GUESTDBG_USE_SW_BP",
    "HW_BREAKPOINT_SLOTS",
    "KVM_SET_GUEST_DEBUG",
    "KVM_TRANSLATE",
    "HwBreakpoint",
    "Translation",
    "debug_control",
    "dr7_value",
    "set_guest_debug",
    "translate",
]

_GUESTDBG = constants("KVM_GUESTDBG_")
GUESTDBG_ENABLE = _GUESTDBG["ENABLE"]
GUESTDBG_SINGLESTEP = _GUESTDBG["SINGLESTEP"]
GUESTDBG_USE_SW_BP = _GUESTDBG["USE_SW_BP"]
GUESTDBG_USE_HW_BP = _GUESTDBG["USE_HW_BP"]
GUESTDBG_INJECT_DB = _GUESTDBG["INJECT_DB"]
GUESTDBG_INJECT_BP = _GUESTDBG["INJECT_BP"]
GUESTDBG_BLOCKIRQ = _GUESTDBG["BLOCKIRQ"]

KVM_TRANSLATE = IOC(IOC_READ | IOC_WRITE, ioctls.KVMIO, 0x85, ffi.sizeof("struct kvm_translation"))
KVM_SET_GUEST_DEBUG = IOC(IOC_WRITE, ioctls.KVMIO, 0x9B, ffi.sizeof("struct kvm_guest_debug"))
# Named in KvmError messages like every other ioctl.
ioctls.NAMES.setdefault(KVM_TRANSLATE, "KVM_TRANSLATE")
ioctls.NAMES.setdefault(KVM_SET_GUEST_DEBUG, "KVM_SET_GUEST_DEBUG")

DB_VECTOR = 1   #: debug exception (single step, hardware breakpoint)
BP_VECTOR = 3   #: breakpoint exception (int3)

#: DR0..DR3: at most four hardware breakpoints and watchpoints at a time.
HW_BREAKPOINT_SLOTS = 4
#: DR6 bits: B0..B3 say which debug register matched; BS a single step.
DR6_BS = 1 << 14
DR6_HIT_MASK = 0xF

#: DR7 R/W field of each kind (two bits per slot from bit 16).
_RW = {"exec": 0b00, "write": 0b01, "access": 0b11}
#: DR7 LEN field of each length (two bits per slot from bit 18; 8 bytes is 0b10).
_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
KINDS = tuple(_RW)
_DR7_FIXED = 1 << 10   # reads as 1 on every x86


@dataclass(frozen=True)
class HwBreakpoint:
    """One debug-register breakpoint: `kind` "exec" (an instruction fetch at `address`),
    "write" (a store to `length` bytes there) or "access" (a load or store). Data addresses
    must be aligned to `length` (1, 2, 4 or 8); execution breakpoints have length 1."""

    address: int
    kind: str = "exec"
    length: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _RW:
            raise ValueError(f"hardware breakpoint kind {self.kind!r} is not one of "
                             f"{', '.join(KINDS)}")
        if self.length not in _LEN:
            raise ValueError(f"hardware breakpoint length {self.length} is not 1, 2, 4 or 8")
        if self.kind == "exec" and self.length != 1:
            raise ValueError("an execution breakpoint has length 1")
        if not 0 <= self.address < 1 << 64:
            raise ValueError(f"breakpoint address {self.address:#x} does not fit in 64 bits")
        if self.address % self.length:
            raise ValueError(f"a {self.length}-byte watchpoint needs an address aligned to "
                             f"{self.length}, not {self.address:#x}")


def dr7_value(breakpoints: Iterable[HwBreakpoint]) -> int:
    """DR7 enabling `breakpoints` in DR0.. in order (global enable bits, R/W and LEN)."""
    dr7 = _DR7_FIXED
    for slot, bp in enumerate(breakpoints):
        dr7 |= 1 << (2 * slot + 1)                                   # Gn
        dr7 |= (_RW[bp.kind] | _LEN[bp.length] << 2) << (16 + 4 * slot)
    return dr7


def debug_control(*, single_step: bool, sw_breakpoints: bool, hw_breakpoints: bool,
                  inject: int | None = None, block_irqs: bool = False) -> int:
    """The kvm_guest_debug.control word; 0 (debugging off) when nothing is asked for."""
    control = 0
    if single_step:
        control |= GUESTDBG_SINGLESTEP
        if block_irqs:
            control |= GUESTDBG_BLOCKIRQ
    if sw_breakpoints:
        control |= GUESTDBG_USE_SW_BP
    if hw_breakpoints:
        control |= GUESTDBG_USE_HW_BP
    if inject is not None:
        if inject == DB_VECTOR:
            control |= GUESTDBG_INJECT_DB
        elif inject == BP_VECTOR:
            control |= GUESTDBG_INJECT_BP
        else:
            raise ValueError(f"only #DB (1) and #BP (3) can be injected, not {inject!r}")
    return control | GUESTDBG_ENABLE if control else 0


def _as_breakpoints(hw_breakpoints: Iterable[HwBreakpoint | int]) -> list[HwBreakpoint]:
    out = []
    for bp in hw_breakpoints:
        if isinstance(bp, bool) or not isinstance(bp, (int, HwBreakpoint)):
            raise ValueError(f"a hardware breakpoint is an HwBreakpoint or an address, not "
                             f"{bp!r}")
        out.append(bp if isinstance(bp, HwBreakpoint) else HwBreakpoint(bp))
    if len(out) > HW_BREAKPOINT_SLOTS:
        raise ValueError(f"{len(out)} hardware breakpoints asked for; x86 has "
                         f"{HW_BREAKPOINT_SLOTS} debug address registers")
    return out


def set_guest_debug(vcpu: Vcpu, *, single_step: bool = False, sw_breakpoints: bool = False,
                    hw_breakpoints: Iterable[HwBreakpoint | int] = (),
                    inject: int | None = None, block_irqs: bool = False) -> None:
    """KVM_SET_GUEST_DEBUG: the whole debug configuration of `vcpu` at once (each call
    replaces the last; all defaults turn debugging off). `hw_breakpoints` are HwBreakpoint
    (or plain addresses, for execution breakpoints). `inject` queues a #DB (1) or #BP (3) for
    the guest on the next entry. `block_irqs` keeps interrupts from being taken while single
    stepping (KVM_GUESTDBG_BLOCKIRQ, where KVM_CAP_SET_GUEST_DEBUG2 lists it)."""
    bps = _as_breakpoints(hw_breakpoints)
    req = ffi.new("struct kvm_guest_debug *")
    req.control = debug_control(single_step=single_step, sw_breakpoints=sw_breakpoints,
                                hw_breakpoints=bool(bps), inject=inject,
                                block_irqs=block_irqs)
    for slot, bp in enumerate(bps):
        req.arch.debugreg[slot] = bp.address
    if bps:
        req.arch.debugreg[7] = dr7_value(bps)
    ioctls.ioctl(vcpu.fileno(), KVM_SET_GUEST_DEBUG, req, vcpu.role, f"vCPU {vcpu.id}")


@dataclass(frozen=True)
class Translation:
    """KVM_TRANSLATE's answer for one guest-virtual (linear) address, with the vCPU's current
    paging: the guest-physical address, and whether the mapping is present, writable and
    user-accessible."""

    gpa: int
    valid: bool
    writeable: bool
    usermode: bool


def translate(vcpu: Vcpu, gva: int) -> Translation:
    """KVM_TRANSLATE of the linear address `gva` on `vcpu`."""
    if not 0 <= gva < 1 << 64:
        raise ValueError(f"guest address {gva:#x} does not fit in 64 bits")
    req = ffi.new("struct kvm_translation *", {"linear_address": gva})
    ioctls.ioctl(vcpu.fileno(), KVM_TRANSLATE, req, vcpu.role, f"vCPU {vcpu.id}")
    return Translation(int(req.physical_address), bool(req.valid), bool(req.writeable),
                       bool(req.usermode))


class GuestDebugMixin:
    """The guest-debugging methods of `pyvmm.Vcpu` (kept here with the ioctls they wrap)."""

    __slots__ = ()

    def set_guest_debug(self, *, single_step: bool = False, sw_breakpoints: bool = False,
                        hw_breakpoints=(), inject: int | None = None,
                        block_irqs: bool = False) -> None:
        """KVM_SET_GUEST_DEBUG: stop with a DebugExit after every instruction
        (`single_step`), at the guest's int3 (`sw_breakpoints`), at up to four debug-register
        breakpoints and watchpoints (`hw_breakpoints`: `guestdebug.HwBreakpoint`s or
        addresses). Every call replaces the whole configuration; no arguments turn it off.
        `inject=1` or `3` gives the guest a #DB or #BP of its own on the next run();
        `block_irqs` steps without taking interrupts (KVM_GUESTDBG_BLOCKIRQ)."""
        set_guest_debug(cast("Vcpu", self), single_step=single_step,
                        sw_breakpoints=sw_breakpoints, hw_breakpoints=hw_breakpoints,
                        inject=inject, block_irqs=block_irqs)

    def translate(self, gva: int) -> Translation:
        """KVM_TRANSLATE: the guest-physical address of the linear address `gva` under the
        vCPU's current paging, as a `guestdebug.Translation(gpa, valid, writeable,
        usermode)`."""
        return translate(cast("Vcpu", self), gva)
