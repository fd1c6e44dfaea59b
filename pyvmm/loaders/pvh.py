# SPDX-License-Identifier: GPL-2.0-or-later
"""The PVH entry of an uncompressed Linux `vmlinux` (an ELF64 image).

The kernel announces a 32-bit entry point in an ELF note of the "Xen" owner, type
XEN_ELFNOTE_PHYS32_ENTRY (18). The loader copies the PT_LOAD segments to their physical
addresses, writes an `hvm_start_info` (magic 0x336ec578, version 1) with the command line, the
initrd as module 0 and the memory map, and starts the boot vCPU there in flat 32-bit protected
mode with paging off and EBX = the start info's address.

Layouts (little-endian), from Xen's public arch-x86/hvm/start_info.h:
  hvm_start_info        {magic u32, version u32, flags u32, nr_modules u32, modlist_paddr u64,
                         cmdline_paddr u64, rsdp_paddr u64, memmap_paddr u64,
                         memmap_entries u32, reserved u32}        (56 bytes)
  hvm_modlist_entry     {paddr u64, size u64, cmdline_paddr u64, reserved u64}
  hvm_memmap_table_entry {addr u64, size u64, type u32, reserved u32}
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import linuxboot as lb

XEN_ELFNOTE_PHYS32_ENTRY = 18
START_MAGIC = 0x336EC578

# Where the loader puts its structures (all below the kernel, in low RAM).
GDT_ADDR = 0x5000
START_INFO = 0x6000
MODLIST = 0x6100
MEMMAP = 0x6200
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000

SEL_CODE, SEL_DATA, SEL_TSS = 0x08, 0x10, 0x18

_START_INFO = struct.Struct("<IIIIQQQQII")
_MODULE = struct.Struct("<QQQQ")
_MEMMAP_ENTRY = struct.Struct("<QQII")


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD segment: physical address, file bytes, and memory size (the rest zeroed)."""

    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class Vmlinux:
    """What the loader needs from a vmlinux ELF: its segments and the PVH entry."""

    segments: tuple[Segment, ...]
    entry: int

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def parse(image: bytes) -> Vmlinux:
    """Read a vmlinux's PT_LOAD segments and its PVH entry note. ValueError if it is not an
    ELF64 x86-64 image or has no PVH note."""
    if image[:4] != b"\x7fELF" or len(image) < 64:
        raise ValueError("not an ELF file")
    if image[4] != 2 or image[5] != 1:
        raise ValueError("not a little-endian ELF64 file (a vmlinux is one)")
    machine, = struct.unpack_from("<H", image, 0x12)
    if machine != 62:
        raise ValueError(f"ELF machine {machine} is not x86-64")
    phoff, = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    segments = []
    entry = None
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(image):
            raise ValueError("truncated ELF program header table")
        p_type, _flags, off, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", image, base)
        if off + filesz > len(image) or filesz > memsz and p_type == 1:
            raise ValueError(f"program header {i} points outside the file")
        if p_type == 1 and memsz:  # PT_LOAD
            segments.append(Segment(paddr, image[off:off + filesz], memsz))
        elif p_type == 4:  # PT_NOTE
            entry = _pvh_entry(image[off:off + filesz]) if entry is None else entry
    if entry is None:
        raise ValueError("the vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); "
                         "boot its bzImage instead")
    if not segments:
        raise ValueError("the vmlinux has no loadable segment")
    return Vmlinux(tuple(segments), entry)


def _pvh_entry(notes: bytes) -> int | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        name = notes[name_at:name_at + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
            return int.from_bytes(notes[desc_at:desc_at + descsz], "little") & 0xFFFFFFFF
        pos = desc_at + ((descsz + 3) & ~3)
    return None


def gdt() -> bytes:
    """null, 32-bit code 0x08, data 0x10, a 32-bit TSS 0x18 (base 0, limit 0x67)."""
    return b"".join([bytes(8), lb.descriptor(0, 0xFFFFF, 0x9A, 0xC),
                     lb.descriptor(0, 0xFFFFF, 0x92, 0xC), lb.descriptor(0, 0x67, 0x8B, 0x0)])


def load(vm, vcpus, image: bytes, *, ram_size: int, cmdline: str = "",
         initrd: bytes | None = None, rsdp: int = 0) -> Vmlinux:
    """Load `image` into `vm`'s memory (RAM from 0, `ram_size` bytes) and set the boot vCPU
    (vcpus[0]) at the PVH entry; every vCPU gets the supported CPUID (hypervisor bit set).
    `rsdp` is the ACPI RSDP address when the platform wrote ACPI tables (0: none)."""
    kernel = parse(image)
    memory = vm.memory
    cmd = cmdline.encode() + b"\0"
    if len(cmd) > CMDLINE_MAX:
        raise ValueError(f"the command line is longer than {CMDLINE_MAX - 1} bytes")
    for seg in kernel.segments:
        lb.check_fits(ram_size, "kernel segment", seg.paddr, seg.memsz)
        if seg.paddr < lb.HIGH_RAM_START:
            raise ValueError(f"kernel segment at {seg.paddr:#x} is below 1 MiB")
        memory.write(seg.paddr, seg.data.ljust(seg.memsz, b"\0"))
    memory.write(CMDLINE, cmd)
    mmap = lb.memory_map(ram_size)
    memory.write(MEMMAP, b"".join(_MEMMAP_ENTRY.pack(r.addr, r.size, r.type, 0) for r in mmap))
    modules = 0
    if initrd:
        at = lb.place_initrd(ram_size, len(initrd), kernel.end)
        memory.write(at, initrd)
        memory.write(MODLIST, _MODULE.pack(at, len(initrd), 0, 0))
        modules = 1
    memory.write(START_INFO, _START_INFO.pack(START_MAGIC, 1, 0, modules,
                                              MODLIST if modules else 0, CMDLINE, rsdp,
                                              MEMMAP, len(mmap), 0))
    memory.write(GDT_ADDR, gdt())
    lb.set_guest_cpuid(vm.kvm, vcpus)
    enter_flat32(vcpus[0], kernel.entry, ebx=START_INFO)
    return kernel


def enter_flat32(vcpu, entry: int, *, ebx: int) -> None:
    """Flat 32-bit protected mode, paging off, interrupts off, at `entry` with EBX set."""
    s = vcpu.get_sregs()
    s.gdt.base, s.gdt.limit = GDT_ADDR, 4 * 8 - 1
    lb.set_segment(s.cs, selector=SEL_CODE, type=lb.CODE)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        lb.set_segment(seg, selector=SEL_DATA, type=lb.DATA)
    lb.set_segment(s.tr, selector=SEL_TSS, type=lb.TSS_BUSY, limit=0x67, s=0, db=0, g=0)
    s.cr0 = lb.CR0_PE | lb.CR0_ET
    s.cr3 = s.cr4 = s.efer = 0
    s.idt.base, s.idt.limit = 0, 0
    vcpu.set_sregs(s)
    lb.set_entry_regs(vcpu, entry, rbx=ebx)
