# SPDX-License-Identifier: GPL-2.0-or-later
"""The x86 Linux boot protocol (bzImage) with the 64-bit entry.

The loader builds the "zero page" (struct boot_params) from the image's setup header, fills in
the loader's fields (type_of_loader, command line, initrd, the e820 map), copies the
protected-mode kernel (the bytes after the (setup_sects + 1) * 512-byte real-mode part) to its
load address, and starts the boot vCPU at load address + 0x200 (startup_64) in 64-bit mode
with an identity map of the low 4 GiB, a GDT with __BOOT_CS = 0x10 and __BOOT_DS = 0x18 (both
flat) and RSI = the zero page.

Offsets (from the kernel's Documentation/arch/x86/boot.rst and zero-page.rst): setup_sects
0x1f1, boot_flag 0x1fe (0xaa55), header "HdrS" 0x202, version 0x206, type_of_loader 0x210,
loadflags 0x211, ramdisk_image 0x218, ramdisk_size 0x21c, heap_end_ptr 0x224, cmd_line_ptr
0x228, initrd_addr_max 0x22c, kernel_alignment 0x230, relocatable_kernel 0x234, xloadflags
0x236, cmdline_size 0x238, pref_address 0x258, init_size 0x260; the header ends at
0x202 + the byte at 0x201. In boot_params: acpi_rsdp_addr 0x070, e820_entries 0x1e8,
e820_table 0x2d0 (128 entries of {addr u64, size u64, type u32}).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..guests import layout
from . import linuxboot as lb

ZERO_PAGE = 0x7000
GDT_ADDR = 0x5000
CMDLINE = 0x20000
SEL_BOOT_CS, SEL_BOOT_DS = 0x10, 0x18
DEFAULT_LOAD = 0x100000

MIN_VERSION = 0x20C         # 2.12: xloadflags (the 64-bit entry is announced there)
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
E820_MAX = 128


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header the loader uses."""

    setup_sects: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    header_end: int


def parse(image: bytes) -> SetupHeader:
    """Read and check the setup header. ValueError for anything not a 64-bit-capable
    bzImage."""
    if len(image) < 0x270 or image[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS boot header at 0x202)")
    if struct.unpack_from("<H", image, 0x1FE)[0] != 0xAA55:
        raise ValueError("bzImage boot_flag is not 0xaa55")
    version, = struct.unpack_from("<H", image, 0x206)
    if version < MIN_VERSION:
        raise ValueError(f"boot protocol {version >> 8}.{version & 0xFF} is older than 2.12")
    xloadflags, = struct.unpack_from("<H", image, 0x236)
    if not xloadflags & XLF_KERNEL_64:
        raise ValueError("this kernel has no 64-bit entry (XLF_KERNEL_64 is clear)")
    loadflags = image[0x211]
    if not loadflags & LOADED_HIGH:
        raise ValueError("a zImage (loaded low) is not supported")
    hdr = SetupHeader(
        setup_sects=image[0x1F1] or 4, version=version, loadflags=loadflags,
        initrd_addr_max=struct.unpack_from("<I", image, 0x22C)[0],
        kernel_alignment=struct.unpack_from("<I", image, 0x230)[0],
        relocatable=bool(image[0x234]), xloadflags=xloadflags,
        cmdline_size=struct.unpack_from("<I", image, 0x238)[0],
        pref_address=struct.unpack_from("<Q", image, 0x258)[0],
        init_size=struct.unpack_from("<I", image, 0x260)[0],
        header_end=0x202 + image[0x201])
    if (hdr.setup_sects + 1) * 512 >= len(image):
        raise ValueError("bzImage is truncated: no protected-mode kernel after the setup")
    return hdr


def load_address(hdr: SetupHeader, ram_size: int) -> int:
    """pref_address when the kernel fits there, else 1 MiB (a relocatable kernel moves
    itself)."""
    if hdr.pref_address and hdr.pref_address + hdr.init_size <= ram_size:
        return hdr.pref_address
    return DEFAULT_LOAD


def boot_params(image: bytes, hdr: SetupHeader, *, ram_size: int, cmdline_len: int,
                initrd: tuple[int, int] | None, rsdp: int = 0) -> bytes:
    """The zero page: the image's setup header and the loader's fields."""
    zp = bytearray(4096)
    zp[0x1F1:hdr.header_end] = image[0x1F1:hdr.header_end]
    struct.pack_into("<H", zp, 0x1FA, 0xFFFF)            # vid_mode: "normal"
    zp[0x210] = 0xFF                                     # type_of_loader: undefined
    zp[0x211] = hdr.loadflags | CAN_USE_HEAP
    struct.pack_into("<H", zp, 0x224, 0xFE00)            # heap_end_ptr
    struct.pack_into("<I", zp, 0x228, CMDLINE)           # cmd_line_ptr
    if initrd is not None:
        struct.pack_into("<II", zp, 0x218, initrd[0], initrd[1])
    struct.pack_into("<Q", zp, 0x070, rsdp)
    mmap = lb.memory_map(ram_size)
    zp[0x1E8] = len(mmap)
    for i, r in enumerate(mmap[:E820_MAX]):
        struct.pack_into("<QQI", zp, 0x2D0 + 20 * i, r.addr, r.size, r.type)
    return bytes(zp)


def gdt() -> bytes:
    """null, null, __BOOT_CS (64-bit code, flat), __BOOT_DS (data, flat)."""
    return b"".join([bytes(16), lb.descriptor(0, 0xFFFFF, 0x9A, 0xA),
                     lb.descriptor(0, 0xFFFFF, 0x92, 0xC)])


def load(vm, vcpus, image: bytes, *, ram_size: int, cmdline: str = "",
         initrd: bytes | None = None, rsdp: int = 0) -> SetupHeader:
    """Load the bzImage `image` into `vm`'s memory (RAM from 0, `ram_size` bytes) and set the
    boot vCPU at its 64-bit entry; every vCPU gets the supported CPUID (hypervisor bit set)."""
    hdr = parse(image)
    memory = vm.memory
    cmd = cmdline.encode() + b"\0"
    if hdr.cmdline_size and len(cmd) - 1 > hdr.cmdline_size:
        raise ValueError(f"the command line is longer than the kernel's {hdr.cmdline_size}")
    kernel = image[(hdr.setup_sects + 1) * 512:]
    at = load_address(hdr, ram_size)
    lb.check_fits(ram_size, "kernel", at, max(len(kernel), hdr.init_size))
    memory.write(at, kernel)
    placed = None
    if initrd:
        where = lb.place_initrd(ram_size, len(initrd), at + max(len(kernel), hdr.init_size),
                                limit=min(lb.MMIO_HOLE, hdr.initrd_addr_max + 1))
        memory.write(where, initrd)
        placed = (where, len(initrd))
    memory.write(CMDLINE, cmd)
    memory.write(ZERO_PAGE, boot_params(image, hdr, ram_size=ram_size, cmdline_len=len(cmd),
                                        initrd=placed, rsdp=rsdp))
    memory.write(GDT_ADDR, gdt())
    pml4, pdpt, pds = layout.page_tables()
    memory.write(layout.PML4, pml4)
    memory.write(layout.PDPT, pdpt)
    memory.write(layout.PD, pds)
    lb.set_guest_cpuid(vm.kvm, vcpus)
    enter_long64(vcpus[0], at + 0x200, rsi=ZERO_PAGE)
    return hdr


def enter_long64(vcpu, entry: int, *, rsi: int) -> None:
    """64-bit mode with the 4 GiB identity map, the boot GDT, interrupts off, RSI set."""
    s = vcpu.get_sregs()
    s.gdt.base, s.gdt.limit = GDT_ADDR, 4 * 8 - 1
    lb.set_segment(s.cs, selector=SEL_BOOT_CS, type=lb.CODE, db=0, l=1)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        lb.set_segment(seg, selector=SEL_BOOT_DS, type=lb.DATA)
    lb.set_segment(s.tr, selector=0, type=lb.TSS_BUSY, limit=0x67, s=0, db=0, g=0)
    s.cr0 = lb.CR0_PE | lb.CR0_ET | lb.CR0_PG
    s.cr3 = layout.PML4
    s.cr4 = lb.CR4_PAE
    s.efer = lb.EFER_LME | lb.EFER_LMA
    s.idt.base, s.idt.limit = 0, 0
    vcpu.set_sregs(s)
    lb.set_entry_regs(vcpu, entry, rsi=rsi)
