# SPDX-License-Identifier: GPL-2.0-or-later
"""Put a vCPU in the CPU mode a payload starts in.

Modes:

``real16``       CS=DS=ES=FS=GS=0 (base 0, limit 64 KiB), SS=0x7000 with SP=0xfff0 (linear
                 0x7fff0), CR0.PE=0. CR4.OSFXSR|OSXMMEXCPT are set so SSE works after a switch.
``prot32``       flat 32-bit protected mode from the host GDT: CS=0x08, data 0x10, ESP=0x80000,
                 no paging, no IDT (an exception ends in SHUTDOWN).
``long64``       64-bit mode at CPL0: CS=0x18, data 0x10, paging with the identity map of the
                 low 4 GiB (CR3=0x88000), the exception IDT (faults are reported on port 0xED),
                 TR=0x30. RSP=0x80000.
``long64-user``  the same system state, but CS=0x2b and SS=DS=ES=0x23: the payload starts at
                 CPL3 (natively executed on kvm_pvm). The TSS I/O bitmap allows every port, and
                 TSS.RSP0 = 0x88000 takes exceptions.

All modes: CR4.OSFXSR|OSXMMEXCPT (KVM's reset CR4 is 0 and SSE would raise #UD), RFLAGS=0x2
(interrupts off), the general registers zeroed, and the CPUID table set (long mode needs LM
in the guest CPUID, also for guests that switch modes themselves).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import layout

__all__ = ["MODES", "default_stack", "setup_vcpu"]

MODES = ("real16", "prot32", "long64", "long64-user")

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
         "r13", "r14", "r15")

# segment type nibbles
_CODE = 0xB      # execute/read, accessed
_DATA = 0x3      # read/write, accessed
_TSS_BUSY = 0xB  # busy 32/64-bit TSS (what KVM expects in TR)


_TSS_AVAILABLE = 0x9


def tr_type(vcpu: Any) -> int:
    """The TSS type to load into TR. Intel's VM entry demands a busy TSS (11). AMD's does
    not care, and QEMU's TCG, which runs the nested runner's stock kvm_amd, refuses the I/O
    bitmap of a TR whose type is not 9 (CPL3 port I/O would #GP there), so AMD gets 9."""
    return _TSS_AVAILABLE if vcpu.cpu_vendor in ("AuthenticAMD", "HygonGenuine") else _TSS_BUSY


def default_stack(mode: str) -> int:
    return layout.REAL_MODE_SP if mode == "real16" else layout.STACK_TOP


def _seg(seg: Any, *, selector: int, base: int = 0, limit: int = 0xFFFFFFFF, type: int = _DATA,
         s: int = 1, dpl: int = 0, db: int = 1, l: int = 0, g: int = 1) -> None:
    seg.selector = selector
    seg.base = base
    seg.limit = limit
    seg.type = type
    seg.present = 1
    seg.dpl = dpl
    seg.db = db
    seg.s = s
    seg.l = l
    seg.g = g
    seg.avl = 0
    seg.unusable = 0


def _set_cpuid(vcpu: Any, cpuid: Iterable[Any] | None) -> None:
    if cpuid is None:
        # KVM refuses a different CPUID once a vCPU has run; the one it has stays valid.
        if getattr(vcpu, "cpuid_set", False):
            return
        vcpu.set_supported_cpuid()
        return
    vcpu.set_cpuid(cpuid)


def setup_vcpu(vcpu: Any, mode: str, entry: int, *, rsp: int | None = None,
               regs: Mapping[str, int] | None = None, cpuid: Iterable[Any] | None = None,
               set_cpuid: bool = True) -> None:
    """Set sregs and regs of ``vcpu`` so it starts at ``entry`` in ``mode``.

    The system area (``layout.write_system_area``) must be in guest memory for the protected
    and long modes. ``regs`` sets further registers by name (``{"rdi": 5}``). ``cpuid``: the
    entries for KVM_SET_CPUID2; by default the supported CPUID of the vCPU's ``Kvm``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    if set_cpuid:
        _set_cpuid(vcpu, cpuid)

    s = vcpu.get_sregs()
    if mode == "real16":
        _seg(s.cs, selector=0, limit=0xFFFF, type=_CODE, db=0, g=0)
        for seg in (s.ds, s.es, s.fs, s.gs):
            _seg(seg, selector=0, limit=0xFFFF, db=0, g=0)
        _seg(s.ss, selector=layout.REAL_MODE_SS, base=layout.REAL_MODE_SS << 4, limit=0xFFFF,
             db=0, g=0)
        s.cr0 = (s.cr0 & ~(CR0_PE | CR0_PG)) | CR0_ET
        s.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
        s.efer = 0
        s.idt.base, s.idt.limit = 0, 0x3FF
    else:
        s.gdt.base, s.gdt.limit = layout.GDT, layout.GDT_LIMIT
        _seg(s.tr, selector=layout.SEL_TSS, base=layout.TSS, limit=layout.TSS_LIMIT,
             type=tr_type(vcpu), s=0, db=0, g=0)
        s.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
        if mode == "prot32":
            _seg(s.cs, selector=layout.SEL_CODE32, type=_CODE)
            for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
                _seg(seg, selector=layout.SEL_DATA)
            s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE
            s.efer = 0
            s.idt.base, s.idt.limit = 0, 0
        else:
            user = mode == "long64-user"
            dpl = 3 if user else 0
            _seg(s.cs, selector=layout.SEL_UCODE64 if user else layout.SEL_CODE64, type=_CODE,
                 dpl=dpl, db=0, l=1)
            for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
                _seg(seg, selector=layout.SEL_UDATA if user else layout.SEL_DATA, dpl=dpl)
            s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
            s.cr3 = layout.PML4
            s.cr4 |= CR4_PAE
            s.efer = EFER_LME | EFER_LMA
            s.idt.base, s.idt.limit = layout.IDT, layout.IDT_LIMIT
    vcpu.set_sregs(s)

    r = vcpu.get_regs()
    for name in _GPRS:
        setattr(r, name, 0)
    r.rflags = 0x2
    r.rip = entry
    r.rsp = default_stack(mode) if rsp is None else rsp
    for name, value in (regs or {}).items():
        if not hasattr(r, name):
            raise ValueError(f"no register named {name!r}")
        setattr(r, name, value)
    vcpu.set_regs(r)
