# SPDX-License-Identifier: GPL-2.0-or-later
"""CPUID tables as KVM passes them (struct kvm_cpuid2), and the one loop for ioctls that
answer E2BIG until their buffer is large enough."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._ffi import ffi
from .errors import KvmError

__all__ = ["CpuidEntry", "cpuid_from_c", "cpuid_to_c", "cpuid_vendor", "grow_buffer",
           "grow_cpuid"]


@dataclass(slots=True)
class CpuidEntry:
    """One CPUID leaf as KVM describes it (struct kvm_cpuid_entry2)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


def cpuid_to_c(entries) -> object:
    """A `struct kvm_cpuid2 *` holding `entries` (CpuidEntry objects or cdata entries)."""
    entries = list(entries)
    buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, e in enumerate(entries):
        c = buf.entries[i]
        c.function, c.index, c.flags = e.function, e.index, e.flags
        c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
    return buf


def cpuid_from_c(buf) -> list[CpuidEntry]:
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (buf.entries[i] for i in range(buf.nent))]


def grow_buffer(make: Callable[[int], Any], call: Callable[[Any], object], start: int,
                limit: int) -> Any:
    """The one loop for ioctls that answer E2BIG when their buffer is too small: `make(n)` a
    buffer of n entries, `call(buf)`, doubling n up to `limit`; returns the filled buffer."""
    n = start
    while True:
        buf = make(n)
        try:
            call(buf)
        except KvmError as err:
            if err.errno == errno.E2BIG and n < limit:
                n *= 2
                continue
            raise
        return buf


def grow_cpuid(call: Callable[[Any], object]) -> Any:
    """A `struct kvm_cpuid2 *` filled by `call(buf)` (KVM_GET_*CPUID*), grown as needed."""
    return grow_buffer(lambda n: ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n}),
                       call, 128, 4096)


def cpuid_vendor(entries) -> str:
    """The vendor string of CPUID leaf 0 in `entries` ("AuthenticAMD", ...), or ""."""
    for entry in entries:
        if entry.function == 0:
            return b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx)
                            ).decode("ascii", "replace")
    return ""
