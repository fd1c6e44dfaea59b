# SPDX-License-Identifier: GPL-2.0-or-later
"""The guest-physical memory layout of pyvmm payloads and the system structures the host writes.

::

    0x00000-0x00fff  reserved: real-mode IVT and BIOS data area; payloads do not use it
    0x01000-0x7ffff  payload image (conventional load address 0x1000) and its stack, whose
                     default top is STACK_TOP = 0x80000 (real mode: SS=0x7000, SP=0xfff0)
    0x80000-0x9ffff  system area, written by the host in Payload.load(); payloads avoid it:
      0x80000  GDT (8 slots, limit 0x3f): null, code32 0x08, data 0x10, code64 0x18,
               user data 0x23, user code64 0x2b, 64-bit TSS 0x30 (16 bytes)
      0x80080  GDTR image (.word limit, .quad base), for `lgdt` from 32/64-bit guest code
      0x80090  IDTR image for the 64-bit IDT
      0x81000  IDT: 32 64-bit interrupt gates (exceptions 0-31, DPL0, selector 0x18)
      0x82000  exception stubs (16 bytes each) and their common tail at 0x82200, which does
               OUT to port 0xED with EAX=vector, RBX=error code, RCX=RIP, RDX=CR2, then HLT
      0x83000  64-bit TSS: RSP0 = 0x88000, I/O bitmap at +0x68 allowing all 65536 ports,
               terminated by 0xff at +0x2068 (TR limit 0x2068)
      0x86000-0x87fff  ring-0 stack (exceptions from CPL3 land here)
      0x88000  PML4 -> 0x89000 PDPT -> 0x8a000-0x8dfff four page directories: identity map
               of the low 4 GiB with 2 MiB pages (present, writable, user); no 1 GiB pages
               (kvm_pvm lacks them). Addresses above guest RAM, like MMIO at 0xd0000000, are
               mapped too and exit to the host.
      0x8e000-0x9ffff  free (reserved for later structures)

The same numbers are defined for guest code in ``guests/pyvmm.inc``.
"""

from __future__ import annotations

import struct

__all__ = [
    "EXC_STUBS",
    "GDT",
    "GDTR",
    "GDT_LIMIT",
    "IDENTITY_MAP_SIZE",
    "IDT",
    "IDTR",
    "IDT_LIMIT",
    "PD",
    "PDPT",
    "PML4",
    "REAL_MODE_SP",
    "REAL_MODE_SS",
    "RING0_STACK_TOP",
    "SEL_CODE32",
    "SEL_CODE64",
    "SEL_DATA",
    "SEL_TSS",
    "SEL_UCODE64",
    "SEL_UDATA",
    "STACK_TOP",
    "SYSTEM_BASE",
    "SYSTEM_END",
    "TSS",
    "TSS_LIMIT",
    "system_area",
    "write_system_area",
]

SYSTEM_BASE = 0x80000
SYSTEM_END = 0xA0000

GDT = 0x80000
GDT_LIMIT = 0x3F
GDTR = 0x80080
IDTR = 0x80090
IDT = 0x81000
IDT_VECTORS = 32
IDT_LIMIT = IDT_VECTORS * 16 - 1
EXC_STUBS = 0x82000
EXC_STUB_SIZE = 16
EXC_COMMON = EXC_STUBS + IDT_VECTORS * EXC_STUB_SIZE
TSS = 0x83000
TSS_IOPB_OFFSET = 0x68
TSS_LIMIT = TSS_IOPB_OFFSET + 0x2000  # 8192 bitmap bytes; the 0xff terminator at the limit
RING0_STACK_TOP = 0x88000
PML4 = 0x88000
PDPT = 0x89000
PD = 0x8A000
IDENTITY_MAP_SIZE = 4 << 30

STACK_TOP = 0x80000
REAL_MODE_SS = 0x7000
REAL_MODE_SP = 0xFFF0

SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
SEL_UDATA = 0x23
SEL_UCODE64 = 0x2B
SEL_TSS = 0x30

FAULT_PORT = 0xED  # also ucall.PORT_FAULT

# exceptions that push an error code
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


def _segment_descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte code/data descriptor: access byte (P DPL S type), flags nibble (G D/B L AVL)."""
    return struct.pack(
        "<HHBBBB",
        limit & 0xFFFF,
        base & 0xFFFF,
        (base >> 16) & 0xFF,
        access,
        ((flags & 0xF) << 4) | ((limit >> 16) & 0xF),
        (base >> 24) & 0xFF,
    )


def gdt_bytes() -> bytes:
    flat = 0xFFFFF
    tss_low = _segment_descriptor(TSS, TSS_LIMIT, 0x89, 0x0)  # present, type 9: available TSS
    tss_high = struct.pack("<II", TSS >> 32, 0)
    gdt = b"".join([
        bytes(8),                                          # 0x00 null
        _segment_descriptor(0, flat, 0x9A, 0xC),           # 0x08 code32, DPL0, G D
        _segment_descriptor(0, flat, 0x92, 0xC),           # 0x10 data, DPL0, G B
        _segment_descriptor(0, flat, 0x9A, 0xA),           # 0x18 code64, DPL0, G L
        _segment_descriptor(0, flat, 0xF2, 0xC),           # 0x20 data, DPL3 (selector 0x23)
        _segment_descriptor(0, flat, 0xFA, 0xA),           # 0x28 code64, DPL3 (selector 0x2b)
        tss_low, tss_high,                                 # 0x30 64-bit TSS
    ])
    assert len(gdt) == GDT_LIMIT + 1
    return gdt


def _exception_stub(vector: int) -> bytes:
    code = b"" if vector in _ERROR_CODE_VECTORS else b"\x6a\x00"   # push $0 (no error code)
    code += bytes([0x6A, vector])                                  # push $vector
    here = EXC_STUBS + vector * EXC_STUB_SIZE + len(code) + 5
    code += b"\xe9" + struct.pack("<i", EXC_COMMON - here)          # jmp common
    return code.ljust(EXC_STUB_SIZE, b"\xcc")


# The common tail: pop %rax (vector); pop %rbx (error code); mov (%rsp),%rcx (RIP);
# mov %cr2,%rdx; out %eax,$0xED; 1: hlt; jmp 1b
_EXC_COMMON_CODE = (b"\x58\x5b\x48\x8b\x0c\x24\x0f\x20\xd2\xe7" + bytes([FAULT_PORT])
                    + b"\xf4\xeb\xfd")


def exception_code() -> bytes:
    return b"".join(_exception_stub(v) for v in range(IDT_VECTORS)) + _EXC_COMMON_CODE


def idt_bytes() -> bytes:
    out = bytearray()
    for v in range(IDT_VECTORS):
        off = EXC_STUBS + v * EXC_STUB_SIZE
        out += struct.pack(
            "<HHBBHII", off & 0xFFFF, SEL_CODE64, 0, 0x8E, (off >> 16) & 0xFFFF, off >> 32, 0
        )
    return bytes(out)


def tss_bytes() -> bytes:
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<Q", tss, 4, RING0_STACK_TOP)    # RSP0
    struct.pack_into("<H", tss, 0x66, TSS_IOPB_OFFSET)  # I/O map base
    # bytes 0x68..0x2067: bitmap, all zero = every port allowed
    tss[TSS_LIMIT] = 0xFF
    return bytes(tss)


def page_tables() -> tuple[bytes, bytes, bytes]:
    """PML4, PDPT and the four page directories of the 4 GiB identity map (2 MiB pages)."""
    flags = 0x7  # present, writable, user
    pml4 = struct.pack("<Q", PDPT | flags).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD + i * 4096) | flags) for i in range(4)).ljust(4096, b"\0")
    pds = b"".join(struct.pack("<Q", (i << 21) | flags | 0x80) for i in range(2048))  # PS
    return pml4, pdpt, pds


def system_area() -> list[tuple[int, bytes]]:
    """(guest address, bytes) pieces of the system area."""
    pml4, pdpt, pds = page_tables()
    return [
        (GDT, gdt_bytes()),
        (GDTR, struct.pack("<HQ", GDT_LIMIT, GDT)),
        (IDTR, struct.pack("<HQ", IDT_LIMIT, IDT)),
        (IDT, idt_bytes()),
        (EXC_STUBS, exception_code()),
        (TSS, tss_bytes()),
        (PML4, pml4),
        (PDPT, pdpt),
        (PD, pds),
    ]


_SYSTEM_AREA: list[tuple[int, bytes]] | None = None


def write_system_area(memory) -> None:
    """Write the system structures through ``memory.write(gpa, data)`` (a ``GuestMemory``)."""
    global _SYSTEM_AREA
    if _SYSTEM_AREA is None:
        _SYSTEM_AREA = system_area()
    for gpa, data in _SYSTEM_AREA:
        memory.write(gpa, data)
