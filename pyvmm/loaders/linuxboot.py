# SPDX-License-Identifier: GPL-2.0-or-later
"""What the Linux loaders share: the guest's memory map (e820 / PVH memmap types), a flat
GDT of their own, and segment and control-register setup of a vCPU for an entry point."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..cpuid import CpuidEntry, cpuid_from_c
from . import memory_map as mm

E820_RAM = mm.USABLE
E820_RESERVED = mm.RESERVED
E820_ACPI = mm.ACPI

#: The PC hole below 1 MiB (EBDA, VGA, option ROMs, BIOS): reserved, never RAM for Linux.
LOW_RAM_END = mm.PC_BIOS_HOLE.base
HIGH_RAM_START = mm.PC_BIOS_HOLE.end
#: The 32-bit PCI/MMIO hole starts here; guest RAM above it is not supported by these loaders.
MMIO_HOLE = 0xC0000000

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

CODE = 0xB       # execute/read, accessed
DATA = 0x3       # read/write, accessed
TSS_BUSY = 0xB


@dataclass(frozen=True)
class MemoryRange:
    """One entry of the memory map handed to the kernel."""

    addr: int
    size: int
    type: int


def memory_map(ram_size: int) -> list[MemoryRange]:
    """The map of a machine with `ram_size` bytes of RAM from address 0 (at least 2 MiB, and
    ending at or below `MMIO_HOLE`: ValueError otherwise)."""
    if ram_size < 2 * HIGH_RAM_START:
        raise ValueError(f"a Linux guest needs at least 2 MiB of RAM, got {ram_size:#x}")
    return [MemoryRange(*entry) for entry in
            mm.build_memory_map([(0, ram_size)], pci_hole=(MMIO_HOLE, 1 << 32))]


def descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte GDT descriptor (access byte P/DPL/S/type, flags nibble G/DB/L/AVL)."""
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((flags & 0xF) << 4) | ((limit >> 16) & 0xF), (base >> 24) & 0xFF)


def set_segment(seg, *, selector: int, type: int, base: int = 0, limit: int = 0xFFFFFFFF,
                s: int = 1, db: int = 1, l: int = 0, g: int = 1) -> None:
    """Fill a kvm_segment (present, DPL 0)."""
    seg.selector, seg.base, seg.limit, seg.type = selector, base, limit, type
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, db, s, l, g
    seg.avl, seg.unusable = 0, 0


#: CPUID.1:ECX bit 31: "running under a hypervisor". KVM's supported CPUID leaves it clear
#: (a VMM sets it); without it Linux does not look for KVM (no kvm-clock, no PV features).
CPUID_HYPERVISOR = 1 << 31


def set_guest_cpuid(vcpus, cpuid: Callable[[], list[CpuidEntry]] | None = None) -> None:
    """Give every vCPU the table `cpuid()` returns (e.g. `Kvm.supported_cpuid`; by default
    the vCPU's own supported CPUID, which it got at creation) with the hypervisor bit set
    (once: KVM refuses a different table after a vCPU ran)."""
    for vcpu in vcpus:
        if vcpu.cpuid_set:
            continue
        entries = cpuid() if cpuid is not None else cpuid_from_c(vcpu.supported_cpuid_buffer())
        for e in entries:
            if e.function == 1:
                e.ecx |= CPUID_HYPERVISOR
        vcpu.set_cpuid(entries)


GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")


def set_entry_regs(vcpu, entry: int, **regs: int) -> None:
    """Every general register 0 except `regs`, RIP = `entry`, RFLAGS = 2 (interrupts off)."""
    r = vcpu.get_regs()
    for name in GPRS:
        setattr(r, name, regs.get(name, 0))
    r.rip, r.rflags = entry, 0x2
    vcpu.set_regs(r)


def check_fits(ram_size: int, what: str, addr: int, size: int) -> None:
    """A ValueError unless [addr, addr+size) lies in RAM."""
    if addr < 0 or addr + size > ram_size:
        raise ValueError(f"{what} at {addr:#x}+{size:#x} does not fit in {ram_size:#x} bytes "
                         "of guest RAM")


def place_initrd(ram_size: int, size: int, above: int, limit: int = MMIO_HOLE) -> int:
    """Where the initrd goes: as high as RAM (and `limit`) allow, page aligned, above
    `above` (the end of the kernel)."""
    top = min(ram_size, limit)
    addr = (top - size) & ~0xFFF
    if addr < above:
        raise ValueError(f"an initrd of {size} bytes does not fit between the kernel's end "
                         f"({above:#x}) and the top of RAM ({top:#x})")
    return addr
