"""Thin Python faces for the register structs: attribute access goes straight to the cffi
struct (`regs.rip = 0x1000`, `sregs.cs.base = 0`), and repr/equality/copy work."""

from __future__ import annotations

from typing import Any

from ._ffi import ffi


def _to_py(value: Any) -> Any:
    if isinstance(value, ffi.CData):
        kind = ffi.typeof(value).kind
        if kind == "struct" or kind == "union":
            return {name: _to_py(getattr(value, name)) for name, _ in ffi.typeof(value).fields}
        if kind == "array":
            return [_to_py(v) for v in value]
    return value


class CStruct:
    """Owns one `struct X` allocated by cffi."""

    __slots__ = ("_c",)
    ctype = ""

    def __init__(self, _c=None, **fields: Any) -> None:
        object.__setattr__(self, "_c", _c if _c is not None else ffi.new(self.ctype + " *"))
        for name, value in fields.items():
            setattr(self._c, name, value)

    @classmethod
    def cast(cls, value: Any):
        """Accept an instance, a cdata pointer of the right type, or None (fresh, zeroed)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, ffi.CData) and ffi.typeof(value) == ffi.typeof(cls.ctype + " *"):
            return cls(value)
        raise TypeError(f"expected {cls.__name__} or {cls.ctype} *, got {type(value).__name__}")

    @property
    def cdata(self) -> Any:
        """The `struct X *` this object owns (what an ioctl takes)."""
        return self._c

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._c, name, value)

    def to_dict(self) -> dict[str, Any]:
        return _to_py(self._c[0])

    def to_bytes(self) -> bytes:
        return bytes(ffi.buffer(self._c))

    def copy(self):
        new = type(self)()
        ffi.memmove(new._c, self._c, ffi.sizeof(self.ctype))
        return new

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_bytes() == other.to_bytes()  # type: ignore

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = []
        for name, value in self.to_dict().items():
            if name.startswith("pad") or name == "reserved":
                continue
            parts.append(f"{name}={value:#x}" if isinstance(value, int) else f"{name}={value}")
        return f"{type(self).__name__}({', '.join(parts)})"


class Regs(CStruct):
    """General registers: rax..r15, rip, rflags."""

    __slots__ = ()
    ctype = "struct kvm_regs"


class Sregs(CStruct):
    """Segments (cs ds es fs gs ss tr ldt), gdt/idt, cr0 cr2 cr3 cr4 cr8, efer, apic_base."""

    __slots__ = ()
    ctype = "struct kvm_sregs"


class Fpu(CStruct):
    __slots__ = ()
    ctype = "struct kvm_fpu"


class VcpuEvents(CStruct):
    """Pending exceptions, interrupts, NMI and SMM state (struct kvm_vcpu_events)."""

    __slots__ = ()
    ctype = "struct kvm_vcpu_events"


class LapicState(CStruct):
    __slots__ = ()
    ctype = "struct kvm_lapic_state"
