# SPDX-License-Identifier: GPL-2.0-or-later
"""The SMM state-save area (SMBASE+0xFE00): its 32-bit (Intel SDM P6) and 64-bit (AMD APM)
layouts as KVM implements them, read and written by field name. `pyvmm.smm` shows these
names with the rest of the SMM helpers."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_SMBASE", "GPR_ORDER", "REVISION_32", "REVISION_64", "REVISION_OFFSET",
           "SEGMENTS", "SMRAM_ADDRESS_SPACE", "STATE_SAVE_OFFSET", "STATE_SAVE_SIZE",
           "SaveSegment", "StateSave", "StateSave32", "StateSave64", "state_save"]

DEFAULT_SMBASE = 0x30000          # SMBASE after reset
STATE_SAVE_OFFSET = 0xFE00        # the state-save area: SMBASE+0xFE00 .. SMBASE+0xFFFF
STATE_SAVE_SIZE = 0x200
SMRAM_ADDRESS_SPACE = 1
REVISION_32 = 0x00020000          # bit 17: SMBASE relocation supported
REVISION_64 = 0x00020064
REVISION_OFFSET = 0xFEFC          # the same offset in both layouts


@dataclass(frozen=True)
class SaveSegment:
    """A segment as saved in SMRAM. `attributes` is bits 8-23 of a descriptor's high dword,
    shifted down by 8, as KVM stores them in both layouts (type 0-3, S 4, DPL 5-6, P 7, AVL 12,
    L 13, D/B 14, G 15): the 64-bit layout's u16 attributes field, the 32-bit layout's flags
    field >> 8. GDTR/IDTR have only base and limit; the 32-bit layout keeps no selector for
    them (None)."""

    selector: int | None
    base: int
    limit: int
    attributes: int

    @property
    def type(self) -> int:
        return self.attributes & 0xF

    @property
    def s(self) -> int:
        return self.attributes >> 4 & 1

    @property
    def dpl(self) -> int:
        return self.attributes >> 5 & 3

    @property
    def present(self) -> int:
        return self.attributes >> 7 & 1

    @property
    def avl(self) -> int:
        return self.attributes >> 12 & 1

    @property
    def l(self) -> int:  # noqa: E743 - the architectural name
        return self.attributes >> 13 & 1

    @property
    def db(self) -> int:
        return self.attributes >> 14 & 1

    @property
    def g(self) -> int:
        return self.attributes >> 15 & 1


# natural register order (the KVM_REG_* numbering): RAX RCX RDX RBX RSP RBP RSI RDI R8..R15
GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr", "gdtr", "idtr")


class StateSave:
    """The state-save area of one SMBASE, read and written in SMRAM through ``vm.memory``.

        save = smm.state_save(vm)            # layout picked from the revision field
        save["rip"], save["cr0"], save.segment("cs")
        save["rsi"] = 0xC0FFEE                # the guest has it after RSM

    Named fields (``fields()``) are integers; registers use the 64-bit names in both layouts
    (the 32-bit layout also accepts eax, eip, eflags...). Writes while the vCPU is in SMM reach
    the guest on RSM.
    """

    layout = 0
    revision = 0
    #: name -> (offset from SMBASE, struct format)
    FIELDS: dict[str, tuple[int, str]] = {}
    ALIASES: dict[str, str] = {}

    def __init__(self, vm: Any, smbase: int = DEFAULT_SMBASE, *,
                 address_space: int = SMRAM_ADDRESS_SPACE) -> None:
        self.vm = vm
        self.smbase = smbase
        self.address_space = address_space

    # raw access
    def read_bytes(self) -> bytes:
        """The whole 512-byte area."""
        return self.vm.memory.read(self.smbase + STATE_SAVE_OFFSET, STATE_SAVE_SIZE,
                                   address_space=self.address_space)

    def _get(self, offset: int, fmt: str) -> int:
        size = struct.calcsize("<" + fmt)
        data = self.vm.memory.read(self.smbase + offset, size, address_space=self.address_space)
        return struct.unpack("<" + fmt, data)[0]

    def _put(self, offset: int, fmt: str, value: int) -> None:
        size = struct.calcsize("<" + fmt)
        value &= (1 << (8 * size)) - 1
        self.vm.memory.write(self.smbase + offset, struct.pack("<" + fmt, value),
                             address_space=self.address_space)

    @classmethod
    def _field(cls, name: str) -> tuple[int, str]:
        name = cls.ALIASES.get(name, name)
        try:
            return cls.FIELDS[name]
        except KeyError:
            raise KeyError(f"the {cls.layout}-bit state-save area has no field {name!r}") from None

    @classmethod
    def offset(cls, name: str) -> int:
        """Offset of a field from SMBASE (e.g. 0xFF00 for the 64-bit layout's smbase)."""
        return cls._field(name)[0]

    @classmethod
    def fields(cls) -> list[str]:
        return list(cls.FIELDS)

    def __getitem__(self, name: str) -> int:
        return self._get(*self._field(name))

    def __setitem__(self, name: str, value: int) -> None:
        offset, fmt = self._field(name)
        self._put(offset, fmt, value)

    def __contains__(self, name: object) -> bool:
        return name in self.FIELDS or name in self.ALIASES

    def __iter__(self) -> Iterator[str]:
        return iter(self.FIELDS)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: self[name] for name in self.FIELDS}
        for seg in SEGMENTS:
            out[seg] = self.segment(seg)
        return out

    def segment(self, name: str) -> SaveSegment:
        raise NotImplementedError

    def regs(self) -> dict[str, int]:
        """The saved general registers, rip and rflags, by their 64-bit names."""
        names = [n for n in GPR_ORDER if n in self] + ["rip", "rflags"]
        return {n: self[n] for n in names}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(smbase={self.smbase:#x}, revision={self['revision']:#x}, "
                f"rip={self['rip']:#x})")


class StateSave32(StateSave):
    """KVM's 32-bit save layout (Intel P6 style), used when the guest CPUID lacks long mode."""

    layout = 32
    revision = REVISION_32
    FIELDS = {
        "smbase": (0xFEF8, "I"),
        "revision": (0xFEFC, "I"),
        "io_inst_restart": (0xFF00, "H"),
        "auto_hlt_restart": (0xFF02, "H"),
        "cr4": (0xFF14, "I"),
        "es_sel": (0xFFA8, "I"), "cs_sel": (0xFFAC, "I"), "ss_sel": (0xFFB0, "I"),
        "ds_sel": (0xFFB4, "I"), "fs_sel": (0xFFB8, "I"), "gs_sel": (0xFFBC, "I"),
        "ldtr_sel": (0xFFC0, "I"), "tr_sel": (0xFFC4, "I"),
        "dr7": (0xFFC8, "I"),
        "dr6": (0xFFCC, "I"),
        **{name: (0xFFD0 + 4 * i, "I") for i, name in enumerate(GPR_ORDER[:8])},
        "rip": (0xFFF0, "I"),
        "rflags": (0xFFF4, "I"),
        "cr3": (0xFFF8, "I"),
        "cr0": (0xFFFC, "I"),
    }
    ALIASES = {"e" + n[1:]: n for n in GPR_ORDER[:8]} | {"eip": "rip", "eflags": "rflags"}
    # each descriptor: flags (descriptor high dword: type << 8 .. G << 23), limit, base
    SEGMENT_OFFSETS = {"ds": 0xFF2C, "fs": 0xFF38, "gs": 0xFF44, "idtr": 0xFF50, "tr": 0xFF5C,
                       "gdtr": 0xFF6C, "ldtr": 0xFF78, "es": 0xFF84, "cs": 0xFF90, "ss": 0xFF9C}

    def segment(self, name: str) -> SaveSegment:
        off = self.SEGMENT_OFFSETS[name]
        flags, limit, base = struct.unpack("<III", self.vm.memory.read(
            self.smbase + off, 12, address_space=self.address_space))
        selector = None if name in ("gdtr", "idtr") else self[f"{name}_sel"]
        return SaveSegment(selector, base, limit, (flags >> 8) & 0xFFFF)


class StateSave64(StateSave):
    """KVM's 64-bit save layout (AMD64 style), used when the guest CPUID has long mode,
    whatever mode the vCPU was in."""

    layout = 64
    revision = REVISION_64
    FIELDS = {
        "io_restart_rip": (0xFEA0, "Q"),
        "io_restart_rcx": (0xFEA8, "Q"),
        "io_restart_rsi": (0xFEB0, "Q"),
        "io_restart_rdi": (0xFEB8, "Q"),
        "io_restart_dword": (0xFEC0, "I"),
        "io_inst_restart": (0xFEC8, "B"),
        "auto_hlt_restart": (0xFEC9, "B"),
        "efer": (0xFED0, "Q"),
        "svm_guest_flag": (0xFED8, "Q"),
        "svm_guest_vmcb_gpa": (0xFEE0, "Q"),
        "revision": (0xFEFC, "I"),
        "smbase": (0xFF00, "I"),
        "cr4": (0xFF48, "Q"),
        "cr3": (0xFF50, "Q"),
        "cr0": (0xFF58, "Q"),
        "dr7": (0xFF60, "Q"),
        "dr6": (0xFF68, "Q"),
        "rflags": (0xFF70, "Q"),
        "rip": (0xFF78, "Q"),
        # R15 first at 0xFF80, RAX last at 0xFFF8
        **{name: (0xFFF8 - 8 * i, "Q") for i, name in enumerate(GPR_ORDER)},
    }
    ALIASES = {"eip": "rip", "eflags": "rflags"}
    # each: selector u16, attributes u16, limit u32, base u64
    SEGMENT_OFFSETS = {name: 0xFE00 + 0x10 * i for i, name in enumerate(
        ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr"))}

    def segment(self, name: str) -> SaveSegment:
        off = self.SEGMENT_OFFSETS[name]
        selector, attributes, limit, base = struct.unpack("<HHIQ", self.vm.memory.read(
            self.smbase + off, 16, address_space=self.address_space))
        return SaveSegment(selector, base, limit, attributes)


def state_save(vm: Any, smbase: int = DEFAULT_SMBASE, *, layout: int | None = None,
               address_space: int = SMRAM_ADDRESS_SPACE) -> StateSave:
    """The state-save area at `smbase`: layout 32 or 64, or None to pick it from the revision
    KVM wrote (valid once an SMI has been taken at this SMBASE)."""
    if layout is None:
        revision = int.from_bytes(vm.memory.read(smbase + REVISION_OFFSET, 4,
                                                 address_space=address_space), "little")
        # the high half holds feature bits (bit 17: SMBASE relocation), never 0
        if revision >> 16 and revision & 0xFFFF == REVISION_64 & 0xFFFF:
            layout = 64
        elif revision >> 16 and revision & 0xFFFF == REVISION_32 & 0xFFFF:
            layout = 32
        else:
            raise ValueError(f"no SMM state-save area at SMBASE {smbase:#x} (revision "
                             f"{revision:#x}); give layout=32 or 64")
    if layout == 64:
        return StateSave64(vm, smbase, address_space=address_space)
    if layout == 32:
        return StateSave32(vm, smbase, address_space=address_space)
    raise ValueError(f"layout must be 32 or 64, not {layout!r}")
