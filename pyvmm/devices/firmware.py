# SPDX-License-Identifier: GPL-2.0-or-later
"""What a PC BIOS leaves behind when it hands over to a kernel, for guests loaded without one.

QEMU boots a multiboot kernel through SeaBIOS, and some test kernels depend on the state
SeaBIOS leaves: kvm-unit-tests' realmode test runs `sti; hlt` in real mode and is woken by
the BIOS timer tick (IRQ 0 through the 8259 on vector 8, handled by the BIOS's IVT entry).
This module recreates that state:

- `install_low_memory()`: the real-mode IVT at 0 (every vector points at a handler in the
  BIOS area: hardware IRQ vectors 0x08-0x0f and 0x70-0x77 acknowledge the 8259s, the rest
  only return) and the BIOS data area at 0x400 (COM1 at 0x3f8, 639 KiB of base memory,
  the EBDA segment).
- `init_stub(entry)`: 32-bit code for the BIOS area that programs the in-kernel 8259s the
  BIOS way (master vectors 0x08-0x0f, slave 0x70-0x77, cascade on IRQ 2, all masked but the
  timer and the cascade), starts the PIT's channel 0 at 18.2 Hz (mode 2, count 65536), then
  jumps to `entry` with EAX and EBX as they were (the multiboot handover registers). Only
  the guest can program KVM's PIC and PIT through their ports, hence guest code. A loader
  starts the vCPU at `INIT_STUB` instead of the kernel's entry.
"""

from __future__ import annotations

import struct

IVT_BASE = 0x0
BDA_BASE = 0x400
EBDA_SEGMENT = 0x9FC0
#: BIOS-area code: interrupt handlers and the init stub (inside the reserved 0xf0000-0xfffff).
BIOS_SEGMENT = 0xF000
HANDLERS = 0xF0000
INIT_STUB = 0xF0100
#: The 8259 vector bases and masks SeaBIOS leaves (timer and cascade unmasked).
PIC_MASTER_BASE, PIC_SLAVE_BASE = 0x08, 0x70
PIC_MASTER_MASK, PIC_SLAVE_MASK = 0xFA, 0xFF

# Handler code, 16-bit real mode.
_IRET = bytes([0xCF])
# push ax; mov al, 0x20; out 0x20, al; pop ax; iret
_EOI_MASTER = bytes([0x50, 0xB0, 0x20, 0xE6, 0x20, 0x58, 0xCF])
# push ax; mov al, 0x20; out 0xa0, al; out 0x20, al; pop ax; iret
_EOI_BOTH = bytes([0x50, 0xB0, 0x20, 0xE6, 0xA0, 0xE6, 0x20, 0x58, 0xCF])
_OFF_IRET, _OFF_MASTER, _OFF_BOTH = 0x00, 0x10, 0x20


def handler_code() -> bytes:
    """The three real-mode handlers, at their offsets from HANDLERS."""
    code = bytearray(0x30)
    for off, part in ((_OFF_IRET, _IRET), (_OFF_MASTER, _EOI_MASTER), (_OFF_BOTH, _EOI_BOTH)):
        code[off: off + len(part)] = part
    return bytes(code)


def ivt() -> bytes:
    """256 far pointers (offset, segment) to the handlers."""
    base = HANDLERS - (BIOS_SEGMENT << 4)
    entries = []
    for vector in range(256):
        if PIC_MASTER_BASE <= vector < PIC_MASTER_BASE + 8:
            off = _OFF_MASTER
        elif PIC_SLAVE_BASE <= vector < PIC_SLAVE_BASE + 8:
            off = _OFF_BOTH
        else:
            off = _OFF_IRET
        entries.append(struct.pack("<HH", base + off, BIOS_SEGMENT))
    return b"".join(entries)


def bios_data_area(*, com1: int = 0x3F8, base_memory_kib: int = 639) -> bytes:
    """The first bytes of the BDA: COM1-4 ports, LPT ports, the EBDA segment (0x40e) and the
    base memory size in KiB (0x413)."""
    bda = bytearray(0x20)
    struct.pack_into("<HHHH", bda, 0x00, com1, 0, 0, 0)
    struct.pack_into("<H", bda, 0x0E, EBDA_SEGMENT)
    struct.pack_into("<H", bda, 0x13, base_memory_kib)
    return bytes(bda)


def install_low_memory(memory) -> None:
    """Write the IVT, the BDA and the interrupt handlers into guest `memory`."""
    memory.write(IVT_BASE, ivt())
    memory.write(BDA_BASE, bios_data_area())
    memory.write(HANDLERS, handler_code())


def init_stub(entry: int) -> bytes:
    """32-bit flat-mode code that sets up the 8259s and the PIT as SeaBIOS does and jumps
    to `entry`, keeping EAX and EBX (it uses ECX and EDX)."""
    if not 0 <= entry < 1 << 32:
        raise ValueError(f"a 32-bit entry point, got {entry:#x}")

    def out(port: int, value: int) -> bytes:
        return bytes([0xB0, value, 0xE6, port])          # mov al, value; out port, al

    code = bytes([0x89, 0xC2])                           # mov edx, eax
    code += out(0x20, 0x11) + out(0xA0, 0x11)            # ICW1: edge, cascade, ICW4
    code += out(0x21, PIC_MASTER_BASE) + out(0xA1, PIC_SLAVE_BASE)   # ICW2: vector bases
    code += out(0x21, 0x04) + out(0xA1, 0x02)            # ICW3: slave on IRQ 2, its id
    code += out(0x21, 0x01) + out(0xA1, 0x01)            # ICW4: 8086 mode
    code += out(0x21, PIC_MASTER_MASK) + out(0xA1, PIC_SLAVE_MASK)
    code += out(0x43, 0x34) + out(0x40, 0x00) + out(0x40, 0x00)   # PIT ch0, mode 2, 65536
    code += bytes([0x89, 0xD0])                          # mov eax, edx
    code += bytes([0xB9]) + struct.pack("<I", entry)     # mov ecx, entry
    code += bytes([0xFF, 0xE1])                          # jmp ecx
    return code


def install_init_stub(memory, entry: int) -> int:
    """Write `init_stub(entry)` at INIT_STUB; returns that address (where a loader starts the
    boot vCPU, in 32-bit flat protected mode, with the kernel's EAX and EBX)."""
    memory.write(INIT_STUB, init_stub(entry))
    return INIT_STUB
