# SPDX-License-Identifier: GPL-2.0-or-later
"""Multiboot (version 1) loader: put a multiboot kernel in guest memory and set vCPU 0 up the
way the Multiboot specification says a boot loader leaves the machine.

What it does, in order:

1. finds the multiboot header (magic 0x1BADB002, 4-byte aligned, in the first 8 KiB, with a
   checksum that makes magic + flags + checksum zero);
2. loads the image: the ELF32 PT_LOAD segments at their physical addresses (memsz beyond
   filesz zeroed), or, when header flag 16 is set, the header's own load/bss addresses;
3. writes, after the image's end (page aligned), the modules (each page aligned), their
   strings, the memory map and the information structure;
4. puts vCPU 0 in 32-bit flat protected mode (CS a 32-bit execute/read segment and the data
   segments read/write, base 0, limit 4 GiB; CR0.PE set, paging off; interrupts off) at the
   entry point, with EAX = 0x2BADB002 and EBX = the information structure's address.

The loader only writes guest memory and vCPU registers: devices are not its business.

    info = load_multiboot(machine, "x86/msr.flat", cmdline="x86/msr.flat -v",
                          modules=[(b"KEY=value\\n", "env")])
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .memory_map import build_memory_map

__all__ = [
    "BOOTLOADER_MAGIC", "HEADER_MAGIC", "MultibootError", "MultibootImage", "MultibootInfo",
    "Segment", "default_memory_map", "load_multiboot", "parse_image",
]

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
#: The header must lie wholly within this many bytes of the image's start.
HEADER_SEARCH = 8192
#: Header flag 16: the address fields of the header are valid (a.out kludge).
FLAG_ADDRESSES = 1 << 16
#: Header flag 2: the kernel asks for video mode fields (not offered: no display).
FLAG_VIDEO = 1 << 2

# Information structure flags (which fields are valid).
INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9

#: The information structure is 88 bytes up to and including the VBE fields.
INFO_SIZE = 88
#: "No BIOS boot device": drive 0xff... (the kernel was not loaded from a disk).
NO_BOOT_DEVICE = 0xFFFFFFFF
PAGE = 0x1000
LOADER_NAME = "pyvmm"

_PT_LOAD = 1
_CODE32 = 0xB   # execute/read, accessed
_DATA32 = 0x3   # read/write, accessed


class MultibootError(ValueError):
    """The file is not a multiboot kernel pyvmm can load (the message says why)."""


@dataclass(frozen=True)
class Segment:
    """A piece of the image: `data` at guest-physical `address`, followed by zeroes up to
    `memsz` bytes."""

    address: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.address + self.memsz


@dataclass(frozen=True)
class MultibootImage:
    """A parsed multiboot kernel: its header flags, entry point and segments."""

    flags: int
    entry: int
    segments: tuple[Segment, ...]
    header_offset: int

    @property
    def end(self) -> int:
        """The first guest-physical address after the loaded image (bss included)."""
        return max(s.end for s in self.segments)


@dataclass
class MultibootInfo:
    """Where the loader put things, as the guest sees them."""

    address: int
    entry: int
    image: MultibootImage
    cmdline: str
    modules: list[tuple[int, int, str]] = field(default_factory=list)
    mem_lower: int = 0
    mem_upper: int = 0
    memory_map: list[tuple[int, int, int]] = field(default_factory=list)
    end: int = 0


def _find_header(image: bytes) -> tuple[int, tuple[int, ...]]:
    limit = min(len(image), HEADER_SEARCH) - 12
    for offset in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, offset)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            fields = struct.unpack_from("<5I", image, offset + 12) if (
                flags & FLAG_ADDRESSES and offset + 32 <= len(image)) else ()
            if flags & FLAG_ADDRESSES and not fields:
                raise MultibootError("the multiboot header's address fields are cut off")
            return offset, (flags, *fields)
    raise MultibootError(f"no multiboot header (magic {HEADER_MAGIC:#x} with a valid "
                         f"checksum) in the first {HEADER_SEARCH} bytes")


def _elf32_segments(image: bytes) -> tuple[int, list[Segment]]:
    if image[:4] != b"\x7fELF":
        raise MultibootError("not an ELF file, and the multiboot header gives no load "
                             "addresses (flag 16)")
    if image[4] != 1 or image[5] != 1:
        raise MultibootError("only little-endian ELF32 multiboot kernels can be loaded "
                             f"(ELF class {image[4]}, data {image[5]})")
    (e_type, e_machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize,
     phnum) = struct.unpack_from("<HHIIIIIHHH", image, 16)
    if e_machine != 3:  # EM_386
        raise MultibootError(f"ELF machine {e_machine} is not i386")
    if phentsize < 32 or phoff + phnum * phentsize > len(image):
        raise MultibootError("the ELF program headers lie outside the file")
    segments = []
    for i in range(phnum):
        p_type, p_offset, _vaddr, paddr, filesz, memsz, _pflags, _align = struct.unpack_from(
            "<8I", image, phoff + i * phentsize)
        if p_type != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or p_offset + filesz > len(image):
            raise MultibootError(f"ELF segment {i} lies outside the file")
        segments.append(Segment(paddr, image[p_offset:p_offset + filesz], memsz))
    if not segments:
        raise MultibootError("the ELF file has no loadable segment")
    return entry, segments


def _address_segments(image: bytes, offset: int, header_addr: int, load_addr: int,
                      load_end: int, bss_end: int) -> list[Segment]:
    start = offset - (header_addr - load_addr)
    if header_addr < load_addr or start < 0:
        raise MultibootError("the multiboot header's load_addr lies after header_addr")
    size = (load_end - load_addr) if load_end else len(image) - start
    if size < 0 or start + size > len(image):
        raise MultibootError("the multiboot header's load range lies outside the file")
    memsz = max(size, bss_end - load_addr) if bss_end else size
    return [Segment(load_addr, image[start:start + size], memsz)]


def parse_image(image: bytes) -> MultibootImage:
    """Parse a multiboot kernel: header, entry and segments (MultibootError if it is not one
    pyvmm can load)."""
    offset, (flags, *fields) = _find_header(image)
    if flags & 0xFFFF & ~0x7:
        raise MultibootError(f"the kernel requires multiboot features this loader does not "
                             f"know (header flags {flags:#x})")
    if flags & FLAG_ADDRESSES:
        header_addr, load_addr, load_end, bss_end, entry = fields
        segments = _address_segments(image, offset, header_addr, load_addr, load_end, bss_end)
    else:
        entry, segments = _elf32_segments(image)
    return MultibootImage(flags, entry, tuple(segments), offset)


def _align(value: int, alignment: int = PAGE) -> int:
    return (value + alignment - 1) & -alignment


def default_memory_map(regions: Iterable[Any]) -> list[tuple[int, int, int]]:
    """A PC memory map (base, length, type) for RAM regions (objects with `guest_addr` and
    `size`): usable RAM, with 0x9fc00-0xfffff (EBDA and BIOS area) reserved, as firmware
    reports it (:func:`pyvmm.loaders.memory_map.build_memory_map`)."""
    return list(build_memory_map([(r.guest_addr, r.size) for r in regions]))


def _mem_sizes(memory_map: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """mem_lower (KiB of usable RAM from 0, at most 640) and mem_upper (KiB of usable RAM
    contiguous from 1 MiB), as the information structure defines them."""
    def contiguous(start: int) -> int:
        end = start
        for base, length, kind in sorted(memory_map):
            if kind == 1 and base <= end < base + length:
                end = base + length
        return end - start

    return min(contiguous(0), 0xA0000) >> 10, min(contiguous(0x100000), 0xFFFFFFFF << 10) >> 10


def _module_entries(modules: Iterable[Any]) -> list[tuple[bytes, str]]:
    out = []
    for module in modules:
        if isinstance(module, (bytes, bytearray, memoryview)):
            out.append((bytes(module), ""))
        elif isinstance(module, (str, os.PathLike)):
            with open(module, "rb") as f:
                out.append((f.read(), os.fspath(module)))
        elif isinstance(module, tuple) and len(module) == 2:
            data, string = module
            if isinstance(data, (str, os.PathLike)):
                with open(data, "rb") as f:
                    data = f.read()
            out.append((bytes(data), str(string)))
        else:
            raise ValueError(f"a module is bytes, a path, or (bytes or path, string); "
                             f"got {module!r}")
    return out


def load_multiboot(machine: Any, path: str | os.PathLike | bytes, *, cmdline: str = "",
                   modules: Iterable[Any] = (), memory_map: Sequence[tuple[int, int, int]]
                   | None = None, vcpu: Any = None) -> MultibootInfo:
    """Load the multiboot kernel at `path` (or its bytes) into `machine` (a Machine, or
    anything with `memory` and `vcpus`) and set `vcpu` (default: vCPU 0) at its entry.

    `cmdline` is the kernel's command line as the guest reads it; `modules` are files
    (paths), bytes, or (bytes or path, string) pairs; `memory_map` is [(base, length, type)]
    (type 1 usable), by default the PC map of the machine's RAM. Returns where everything
    went. The machine needs its RAM already (the image and the structures must fit in it)."""
    image = bytes(path) if isinstance(path, (bytes, bytearray)) else open(path, "rb").read()
    parsed = parse_image(image)
    memory = machine.memory
    regions = memory.regions(0)
    if not regions:
        raise ValueError("the machine has no RAM yet: give it memory before loading a kernel")
    mmap = list(memory_map) if memory_map is not None else default_memory_map(regions)
    mods = _module_entries(modules)

    def write(address: int, data: bytes) -> None:
        if not data:
            return
        if memory.find(address) is None or memory.find(address + len(data) - 1) is None:
            raise ValueError(f"{len(data):#x} bytes at {address:#x} do not fit in guest RAM")
        memory.write(address, data)

    for segment in parsed.segments:
        write(segment.address, segment.data + bytes(segment.memsz - len(segment.data)))

    # Modules, then the strings, memory map and info structure, each after the image.
    cursor = _align(parsed.end)
    placed: list[tuple[int, int, str]] = []
    for data, string in mods:
        write(cursor, data)
        placed.append((cursor, cursor + len(data), string))
        cursor = _align(cursor + len(data))
    strings = bytearray()
    strings_base = cursor

    def add_string(text: str) -> int:
        address = strings_base + len(strings)
        strings.extend(text.encode() + b"\0")
        return address

    cmdline_addr = add_string(cmdline)
    loader_addr = add_string(LOADER_NAME)
    mod_strings = [add_string(s) for _, _, s in placed]
    cursor = _align(strings_base + len(strings), 16)
    mods_addr = cursor
    mod_table = b"".join(struct.pack("<4I", start, end, s, 0)
                         for (start, end, _), s in zip(placed, mod_strings, strict=True))
    cursor = _align(cursor + len(mod_table), 16)
    mmap_addr = cursor
    # Each entry: size (of the rest, 20), base, length, type; "size" itself is not counted.
    mmap_table = b"".join(struct.pack("<IQQI", 20, base, length, kind)
                          for base, length, kind in mmap)
    cursor = _align(cursor + len(mmap_table), 16)
    info_addr = cursor
    mem_lower, mem_upper = _mem_sizes(mmap)
    flags = (INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP
             | INFO_LOADER_NAME)
    info = bytearray(INFO_SIZE)
    struct.pack_into("<7I", info, 0, flags, mem_lower, mem_upper, NO_BOOT_DEVICE,
                     cmdline_addr, len(placed), mods_addr)
    struct.pack_into("<II", info, 44, len(mmap_table), mmap_addr)
    struct.pack_into("<I", info, 64, loader_addr)
    end = info_addr + INFO_SIZE
    if end > 0xFFFFFFFF:
        raise ValueError("the multiboot structures must lie below 4 GiB")
    write(strings_base, bytes(strings))
    write(mods_addr, mod_table)
    write(mmap_addr, mmap_table)
    write(info_addr, bytes(info))

    target = vcpu if vcpu is not None else machine.vcpus[0]
    enter_protected_mode(target, parsed.entry, info_addr)
    return MultibootInfo(info_addr, parsed.entry, parsed, cmdline, placed, mem_lower,
                         mem_upper, mmap, end)


def _flat(seg: Any, selector: int, kind: int) -> None:
    seg.selector, seg.base, seg.limit, seg.type = selector, 0, 0xFFFFFFFF, kind
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1
    seg.avl, seg.unusable = 0, 0


def enter_protected_mode(vcpu: Any, entry: int, info_addr: int) -> None:
    """The machine state at a multiboot entry: flat 32-bit segments (selectors 0x08 code,
    0x10 data, as a GDT would have them; the kernel loads its own GDT before reloading a
    segment), CR0.PE without paging, EFLAGS with IF and VM clear, EAX the boot loader magic,
    EBX the information structure."""
    if getattr(vcpu, "cpuid_set", True) is False:
        vcpu.set_supported_cpuid()
    s = vcpu.get_sregs()
    _flat(s.cs, 0x08, _CODE32)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        _flat(seg, 0x10, _DATA32)
    s.cr0 = (s.cr0 | 0x1 | 0x10) & ~(1 << 31)   # PE, ET; PG off
    s.cr4 = 0
    s.efer = 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    for name in ("rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
                 "r13", "r14", "r15"):
        setattr(r, name, 0)
    r.rax, r.rbx, r.rip, r.rflags = BOOTLOADER_MAGIC, info_addr, entry, 0x2
    vcpu.set_regs(r)
