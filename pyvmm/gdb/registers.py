# SPDX-License-Identifier: GPL-2.0-or-later
"""The register files gdb sees, per CPU mode, and the target description XML that names them.

Three layouts: "x86-64" (64-bit mode), "i386" (32-bit protected mode) and "i8086" (real mode:
the i386 registers, with gdb told to disassemble 16-bit code). Each has gdb's standard
`org.gnu.gdb.i386.core` and `org.gnu.gdb.i386.sse` features (general, segment, x87 and SSE
registers, in the order gdb numbers them) and a feature of our own, `org.pyvmm.x86.sys`, with
CR0, CR2, CR3, CR4 and EFER (`p/x $cr3` in gdb). gdb reads the description once per
connection, so the layout is the mode of the vCPU when gdb connects (or the one asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ARCHS", "Register", "RegisterFile", "arch_of", "layout", "target_xml"]

ARCHS = ("x86-64", "i386", "i8086")

CR0_PE = 1 << 0
EFER_LMA = 1 << 10

_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_SYS = ("cr0", "cr2", "cr3", "cr4", "efer")


@dataclass(frozen=True)
class Register:
    """One register of a layout: gdb's name, its size in bits, the XML type and feature, and
    where its value lives (`source`: "regs", "sregs", "seg", "fpu")."""

    name: str
    bits: int
    type: str
    feature: str
    source: str
    field: str

    @property
    def size(self) -> int:
        return self.bits // 8


def _core64() -> list[Register]:
    regs = []
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(
            f"r{i}" for i in range(8, 16)):
        kind = "data_ptr" if name in ("rbp", "rsp") else "int64"
        regs.append(Register(name, 64, kind, "core", "regs", name))
    regs.append(Register("rip", 64, "code_ptr", "core", "regs", "rip"))
    return regs


def _core32() -> list[Register]:
    regs = []
    for name in ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"):
        kind = "data_ptr" if name in ("ebp", "esp") else "int32"
        regs.append(Register(name, 32, kind, "core", "regs", "r" + name[1:]))
    regs.append(Register("eip", 32, "code_ptr", "core", "regs", "rip"))
    return regs


def _common(xmm: int) -> list[Register]:
    regs = [Register("eflags", 32, "i386_eflags", "core", "regs", "rflags")]
    regs += [Register(seg, 32, "int32", "core", "seg", seg) for seg in _SEGMENTS]
    regs += [Register(f"st{i}", 80, "i387_ext", "core", "fpu", f"st{i}") for i in range(8)]
    regs += [Register(name, 32, "int", "core", "fpu", name) for name in _X87_CONTROL]
    regs += [Register(f"xmm{i}", 128, "vec128", "sse", "fpu", f"xmm{i}") for i in range(xmm)]
    regs.append(Register("mxcsr", 32, "i386_mxcsr", "sse", "fpu", "mxcsr"))
    regs += [Register(name, 64, "int64", "sys", "sregs", name) for name in _SYS]
    return regs


_LAYOUTS = {
    "x86-64": tuple(_core64() + _common(16)),
    "i386": tuple(_core32() + _common(8)),
}
_LAYOUTS["i8086"] = _LAYOUTS["i386"]


def layout(arch: str) -> tuple[Register, ...]:
    """The registers of `arch` in gdb's numbering."""
    try:
        return _LAYOUTS[arch]
    except KeyError:
        raise ValueError(f"unknown gdb architecture {arch!r} (one of {', '.join(ARCHS)})") \
            from None


def arch_of(sregs: Any) -> str:
    """The layout for a vCPU's current mode: real mode, 64-bit mode, else 32-bit."""
    if not sregs.cr0 & CR0_PE:
        return "i8086"
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return "x86-64"
    return "i386"


# --- target description -----------------------------------------------------------------------

_FEATURES = {"core": "org.gnu.gdb.i386.core", "sse": "org.gnu.gdb.i386.sse",
             "sys": "org.pyvmm.x86.sys"}
_BFD_ARCH = {"x86-64": "i386:x86-64", "i386": "i386", "i8086": "i8086"}

_EFLAGS = ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), \
    ("IF", 9), ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), \
    ("VIF", 19), ("VIP", 20), ("ID", 21)
_MXCSR = ("IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM", "FZ")

_VEC128 = """\
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v4_float" type="v4f"/>
      <field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/>
      <field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/>
      <field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
"""


def _flags(name: str, bits: Any) -> str:
    fields = "".join(f'      <field name="{n}" start="{b}" end="{b}"/>\n' for n, b in bits)
    return f'    <flags id="{name}" size="4">\n{fields}    </flags>\n'


def target_xml(arch: str) -> str:
    """The target description gdb asks for with qXfer:features:read:target.xml."""
    regs = layout(arch)
    parts = ['<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target>\n',
             f"  <architecture>{_BFD_ARCH[arch]}</architecture>\n"]
    for key, feature in _FEATURES.items():
        parts.append(f'  <feature name="{feature}">\n')
        if key == "core":
            parts.append(_flags("i386_eflags", _EFLAGS))
        elif key == "sse":
            parts.append(_VEC128)
            parts.append(_flags("i386_mxcsr", [(n, i) for i, n in enumerate(_MXCSR)]))
        for reg in regs:
            if reg.feature == key:
                group = ' group="float"' if reg.name in _X87_CONTROL else ""
                parts.append(f'    <reg name="{reg.name}" bitsize="{reg.bits}" '
                             f'type="{reg.type}"{group}/>\n')
        parts.append("  </feature>\n")
    parts.append("</target>\n")
    return "".join(parts)


# --- reading and writing a vCPU's registers -------------------------------------------------

def _full_tag(fpu: Any) -> int:
    """KVM keeps the abridged (FXSAVE) tag byte; gdb shows the full tag word. Valid registers
    are shown as valid (00), empty ones as empty (11)."""
    tag = 0
    for i in range(8):
        if not fpu.ftwx >> i & 1:
            tag |= 0b11 << (2 * i)
    return tag


class RegisterFile:
    """The registers of one vCPU in one layout, read at once (regs, sregs, fpu) and written
    back only where gdb changed something."""

    def __init__(self, vcpu: Any, arch: str) -> None:
        self.vcpu = vcpu
        self.regs = layout(arch)
        self._r = vcpu.get_regs()
        self._s = vcpu.get_sregs()
        self._f = vcpu.get_fpu()
        self._dirty: set[str] = set()

    def get(self, index: int) -> bytes:
        """Register `index` as little-endian bytes of its size."""
        reg = self.regs[index]
        f = self._f
        if reg.source == "regs":
            value = getattr(self._r, reg.field)
        elif reg.source == "sregs":
            value = getattr(self._s, reg.field)
        elif reg.source == "seg":
            value = getattr(self._s, reg.field).selector
        elif reg.field.startswith("st"):
            return bytes(f.fpr[int(reg.field[2:])])[:10]
        elif reg.field.startswith("xmm"):
            return bytes(f.xmm[int(reg.field[3:])])
        else:
            value = {"fctrl": f.fcw, "fstat": f.fsw, "ftag": _full_tag(f), "fiseg": 0,
                     "fioff": f.last_ip, "foseg": 0, "fooff": f.last_dp,
                     "fop": f.last_opcode, "mxcsr": f.mxcsr}[reg.field]
        return (int(value) & ((1 << reg.bits) - 1)).to_bytes(reg.size, "little")

    def read_all(self) -> bytes:
        return b"".join(self.get(i) for i in range(len(self.regs)))

    def set(self, index: int, data: bytes) -> None:
        """Change register `index` (little-endian `data` of its size; shorter is
        zero-extended). Segment selectors change only in real mode (base = selector * 16):
        elsewhere a selector means a descriptor the stub does not load."""
        reg = self.regs[index]
        if len(data) > reg.size:
            raise ValueError(f"{len(data)} bytes for the {reg.bits}-bit register {reg.name}")
        if data == self.get(index)[: len(data)] and len(data) == reg.size:
            return
        value = int.from_bytes(data, "little")
        f = self._f
        if reg.source == "regs":
            setattr(self._r, reg.field, value)
            self._dirty.add("regs")
        elif reg.source == "sregs":
            setattr(self._s, reg.field, value)
            self._dirty.add("sregs")
        elif reg.source == "seg":
            if self._s.cr0 & CR0_PE:
                raise ValueError(f"{reg.name} can be changed only in real mode")
            seg = getattr(self._s, reg.field)
            seg.selector, seg.base = value & 0xFFFF, (value & 0xFFFF) << 4
            self._dirty.add("sregs")
        elif reg.field.startswith("st"):
            row = f.fpr[int(reg.field[2:])]
            for i, byte in enumerate(data.ljust(10, b"\0")):
                row[i] = byte
            self._dirty.add("fpu")
        elif reg.field.startswith("xmm"):
            row = f.xmm[int(reg.field[3:])]
            for i, byte in enumerate(data.ljust(16, b"\0")):
                row[i] = byte
            self._dirty.add("fpu")
        else:
            target = {"fctrl": "fcw", "fstat": "fsw", "fioff": "last_ip", "fooff": "last_dp",
                      "fop": "last_opcode", "mxcsr": "mxcsr"}.get(reg.field)
            if target is None:
                raise ValueError(f"{reg.name} cannot be written")
            setattr(f, target, value)
            self._dirty.add("fpu")

    def write_all(self, data: bytes) -> None:
        """Apply a whole `G` packet's worth of registers (in layout order)."""
        offset = 0
        for index, reg in enumerate(self.regs):
            chunk = data[offset: offset + reg.size]
            offset += reg.size
            if len(chunk) == reg.size and chunk != self.get(index):
                self.set(index, chunk)

    def flush(self) -> None:
        """Write back what changed (KVM_SET_REGS / SET_SREGS / SET_FPU)."""
        if "regs" in self._dirty:
            self.vcpu.set_regs(self._r)
        if "sregs" in self._dirty:
            self.vcpu.set_sregs(self._s)
        if "fpu" in self._dirty:
            self.vcpu.set_fpu(self._f)
        self._dirty.clear()
