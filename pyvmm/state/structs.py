# SPDX-License-Identifier: GPL-2.0-or-later
"""Typed faces of the x86 state structs (attribute access into the cffi struct, like
pyvmm.structs), all picklable: a struct pickles as its bytes, so a saved state can cross a
process boundary or be written to a file."""

from __future__ import annotations

from typing import Any

from .._ffi import ffi
from ..structs import CStruct

__all__ = ["ClockData", "DebugRegs", "IoapicState", "Irqchip", "PicState", "PitState",
           "Xcrs", "Xsave", "from_bytes", "struct_bytes"]


def struct_bytes(struct: CStruct) -> bytes:
    """The raw bytes of any pyvmm CStruct (Regs, Sregs, ... included)."""
    return struct.to_bytes()


def from_bytes(cls: type[CStruct], data: bytes) -> Any:
    """A `cls` (a CStruct subclass) holding `data`, which must be exactly its size."""
    size = ffi.sizeof(cls.ctype)
    if len(data) != size:
        raise ValueError(f"{cls.__name__} needs {size} bytes, got {len(data)}")
    obj = cls()
    ffi.memmove(obj._c, data, size)
    return obj


class _Picklable(CStruct):
    __slots__ = ()

    def __reduce__(self):
        return (from_bytes, (type(self), self.to_bytes()))


class Xcrs(_Picklable):
    """Extended control registers (struct kvm_xcrs): `nr_xcrs` entries of (xcr, value)."""

    __slots__ = ()
    ctype = "struct kvm_xcrs"

    def values(self) -> dict[int, int]:
        """{XCR number: value}; XCR0 is the guest's enabled XSAVE feature set."""
        return {self._c.xcrs[i].xcr: self._c.xcrs[i].value for i in range(self._c.nr_xcrs)}


class DebugRegs(_Picklable):
    """DR0-DR3 (`db[0..3]`), DR6, DR7 (struct kvm_debugregs)."""

    __slots__ = ()
    ctype = "struct kvm_debugregs"


class PicState(_Picklable):
    """One 8259 PIC (struct kvm_pic_state): irr, imr, isr, irq_base, elcr, ..."""

    __slots__ = ()
    ctype = "struct kvm_pic_state"


class IoapicState(_Picklable):
    """The IOAPIC (struct kvm_ioapic_state): base_address, id, irr, redirtbl[24] (u64 each)."""

    __slots__ = ()
    ctype = "struct kvm_ioapic_state"


class Irqchip(_Picklable):
    """struct kvm_irqchip: `chip_id` and the union `chip` (.pic or .ioapic)."""

    __slots__ = ()
    ctype = "struct kvm_irqchip"


class PitState(_Picklable):
    """The in-kernel i8254 PIT (struct kvm_pit_state2): channels[3], flags."""

    __slots__ = ()
    ctype = "struct kvm_pit_state2"


class ClockData(_Picklable):
    """kvmclock's view of the VM's clock (struct kvm_clock_data): clock (ns), flags, and with
    KVM_CLOCK_REALTIME / KVM_CLOCK_HOST_TSC also the host's realtime and TSC it pairs with."""

    __slots__ = ()
    ctype = "struct kvm_clock_data"


# The fields of the legacy FXSAVE area and the XSAVE header (Intel SDM vol. 1, 13.4).
_FCW, _FSW, _MXCSR, _ST0, _XMM0, _XSTATE_BV, _XCOMP_BV = 0, 2, 24, 32, 160, 512, 520
_YMM_HI = 576  # AVX state (upper halves of YMM0-15) in the standard, uncompacted format


class Xsave:
    """The vCPU's XSAVE area as KVM_GET_XSAVE(2) gives it: `data` holds every byte (4096, or
    KVM_CAP_XSAVE2's size when that is larger). A few fields have names; the rest is the
    standard uncompacted layout."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        if len(data) < 4096:
            raise ValueError(f"an XSAVE area has at least 4096 bytes, got {len(data)}")
        self.data = bytearray(data)

    def _u(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def _set(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")

    @property
    def fcw(self) -> int:
        """x87 control word."""
        return self._u(_FCW, 2)

    @property
    def mxcsr(self) -> int:
        """SSE control/status."""
        return self._u(_MXCSR, 4)

    @mxcsr.setter
    def mxcsr(self, value: int) -> None:
        self._set(_MXCSR, 4, value)

    @property
    def xstate_bv(self) -> int:
        """Which state components the area holds (XSAVE header)."""
        return self._u(_XSTATE_BV, 8)

    @xstate_bv.setter
    def xstate_bv(self, value: int) -> None:
        self._set(_XSTATE_BV, 8, value)

    def xmm(self, n: int) -> int:
        """XMM register `n` (0-15) as a 128-bit integer."""
        if not 0 <= n < 16:
            raise ValueError(f"XMM{n} does not exist (0..15)")
        return self._u(_XMM0 + 16 * n, 16)

    def set_xmm(self, n: int, value: int) -> None:
        """Set XMM`n`; marks SSE state present in xstate_bv."""
        if not 0 <= n < 16:
            raise ValueError(f"XMM{n} does not exist (0..15)")
        self._set(_XMM0 + 16 * n, 16, value)
        self.xstate_bv |= 2

    def st(self, n: int) -> bytes:
        """x87 register ST(n)/MMn: its 10 significant bytes."""
        if not 0 <= n < 8:
            raise ValueError(f"ST({n}) does not exist (0..7)")
        return bytes(self.data[_ST0 + 16 * n:_ST0 + 16 * n + 10])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Xsave) and self.data == other.data

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        return (Xsave, (bytes(self.data),))

    def __repr__(self) -> str:
        return (f"Xsave({len(self.data)} bytes, xstate_bv={self.xstate_bv:#x}, "
                f"mxcsr={self.mxcsr:#x})")
