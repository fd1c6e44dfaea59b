# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU `-cpu MODEL,+flag,-flag,key=value` options mapped onto the CPUID table pyvmm gives
the vCPUs (KVM_SET_CPUID2).

The base is what KVM supports on this host (KVM_GET_SUPPORTED_CPUID), which is what QEMU's
`-cpu host`/`max` give too; `qemu64`/`kvm64` (QEMU's default) are approximated by that same
table. A `-flag` clears the bit; a `+flag` sets it only where KVM supports it (as QEMU does,
a flag the host lacks is dropped, with a note). Named models (Skylake-Server, ...) and flags
outside `FEATURES` cannot be expressed: they are reported, and the test is skipped.

Guest code at CPL3 on some hosts (kvm_pvm) runs CPUID natively: there the table applies to
CPL0 code only, which is where kvm-unit-tests checks features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["BASE_MODELS", "FEATURES", "CpuSpec", "apply_cpu", "kernel_emulated",
           "parse_cpu"]

#: flag name -> (leaf, subleaf, register, bit); bit positions are the architectural ones.
FEATURES: dict[str, tuple[int, int, str, int]] = {
    "vmx": (1, 0, "ecx", 5),
    "pcid": (1, 0, "ecx", 17),
    "x2apic": (1, 0, "ecx", 21),
    "tsc-deadline": (1, 0, "ecx", 24),
    "xsave": (1, 0, "ecx", 26),
    "hypervisor": (1, 0, "ecx", 31),
    "invpcid": (7, 0, "ebx", 10),
    "umip": (7, 0, "ecx", 2),
    "pku": (7, 0, "ecx", 3),
    "la57": (7, 0, "ecx", 16),
    "svm": (0x80000001, 0, "ecx", 2),
    "skinit": (0x80000001, 0, "ecx", 12),
    "rdtscp": (0x80000001, 0, "edx", 27),
}

#: Models whose table is KVM's supported CPUID (see the module docstring).
BASE_MODELS = ("host", "max", "qemu64", "kvm64", "")

#: Options that change nothing pyvmm models (the supported table already has host bits).
_IGNORED = {"host-phys-bits", "migratable=no", "host-phys-bits=on"}


@dataclass
class CpuSpec:
    """A parsed -cpu value."""

    model: str = ""
    set: list[str] = field(default_factory=list)
    clear: list[str] = field(default_factory=list)
    vendor: str | None = None
    unsupported: list[str] = field(default_factory=list)


def parse_cpu(value: str) -> CpuSpec:
    """Parse QEMU's -cpu argument."""
    parts = [p for p in value.split(",") if p] if value else []
    spec = CpuSpec(model=parts[0] if parts else "")
    if spec.model not in BASE_MODELS:
        spec.unsupported.append(f"-cpu model {spec.model}")
    for part in parts[1:]:
        if part in _IGNORED:
            continue
        if part.startswith(("+", "-")):
            name, on = part[1:], part[0] == "+"
        elif "=" in part:
            key, _, val = part.partition("=")
            if key == "vendor" and len(val) == 12:
                spec.vendor = val
                continue
            name, on = key, val in ("on", "true", "yes")
            if val not in ("on", "off", "true", "false", "yes", "no"):
                spec.unsupported.append(f"-cpu {part}")
                continue
        else:
            name, on = part, True
        if name not in FEATURES:
            spec.unsupported.append(f"-cpu {part[0] if part[0] in '+-' else ''}{name}")
        elif on:
            spec.set.append(name)
        else:
            spec.clear.append(name)
    return spec


#: KVM_CAP_TSC_DEADLINE_TIMER: KVM emulates the LAPIC's TSC-deadline mode, a feature KVM's
#: supported CPUID does not list (QEMU sets the bit when this capability is there).
KVM_CAP_TSC_DEADLINE_TIMER = 72


def kernel_emulated(kvm) -> frozenset[str]:
    """Features KVM gives a guest that KVM_GET_SUPPORTED_CPUID does not list."""
    return frozenset({"tsc-deadline"} if kvm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER)
                     else ())


def apply_cpu(entries: Iterable, spec: CpuSpec, *,
              emulated: frozenset[str] = frozenset()) -> tuple[list, list[str]]:
    """The CPUID table `entries` (KVM's supported one) changed as `spec` says, and notes for
    what KVM could not give (a +flag the supported table lacks). A +flag in `emulated` (see
    `kernel_emulated`) is set even where the table lacks it."""
    table = [dataclasses.replace(e) for e in entries]
    notes: list[str] = []
    supported = {(e.function, e.index): e for e in table}

    def entry(leaf: int, sub: int):
        return supported.get((leaf, sub))

    for name in spec.clear:
        leaf, sub, reg, bit = FEATURES[name]
        e = entry(leaf, sub)
        if e is not None:
            setattr(e, reg, getattr(e, reg) & ~(1 << bit))
    for name in spec.set:
        leaf, sub, reg, bit = FEATURES[name]
        e = entry(leaf, sub)
        if e is not None and name in emulated:
            setattr(e, reg, getattr(e, reg) | 1 << bit)
        elif e is None or not getattr(e, reg) >> bit & 1:
            notes.append(f"+{name}: not supported by this host's KVM (dropped, as QEMU does)")
    if spec.vendor is not None:
        e = entry(0, 0)
        if e is not None:
            raw = spec.vendor.encode()
            e.ebx, e.edx, e.ecx = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    return table, notes
