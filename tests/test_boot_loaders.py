# SPDX-License-Identifier: GPL-2.0-or-later
"""The PVH and bzImage loaders, run for real: tiny "kernels" built here (an ELF64 with a PVH
note; a bzImage with a setup header) whose entry code reads what the loader handed it and
reports it on a port, so the test checks the entry state the guest actually saw."""

from __future__ import annotations

import struct

import pytest

from pyvmm import Machine
from pyvmm.loaders import bzimage, pvh
from pyvmm.loaders.linuxboot import E820_RAM, E820_RESERVED, memory_map

RAM = 64 << 20
PORT = 0x500


class Reports:
    """A PIO device collecting the dwords the guest writes."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.values.append(int.from_bytes(data, "little"))


OUT = b"\xef"  # out %eax, (%dx)

# 32-bit: report magic, the first 4 bytes of the command line, nr_modules, module 0's size,
# memmap_entries, the first memmap entry's type, and CS; then hlt.
PVH_CODE = b"".join([
    b"\x66\xba" + struct.pack("<H", PORT),  # mov $PORT, %dx
    b"\x8b\x03", OUT,                       # mov (%ebx), %eax
    b"\x8b\x43\x18", b"\x8b\x00", OUT,      # mov 24(%ebx), %eax; mov (%eax), %eax
    b"\x8b\x43\x0c", OUT,                   # mov 12(%ebx), %eax
    b"\x8b\x43\x10", b"\x8b\x40\x08", OUT,  # mov 16(%ebx), %eax; mov 8(%eax), %eax
    b"\x8b\x43\x30", OUT,                   # mov 48(%ebx), %eax
    b"\x8b\x43\x28", b"\x8b\x40\x10", OUT,  # mov 40(%ebx), %eax; mov 16(%eax), %eax
    b"\x8c\xc8", OUT,                       # mov %cs, %eax
    b"\xf4",                                # hlt
])


def pvh_elf(code: bytes, load: int = 0x100000, with_note: bool = True) -> bytes:
    """An ELF64 x86-64 image: one PT_LOAD of `code` at `load` and a PT_NOTE with the PVH
    entry (XEN_ELFNOTE_PHYS32_ENTRY = `load`), 8-byte descriptor as Linux writes it."""
    note = struct.pack("<III", 4, 8, 18 if with_note else 5) + b"Xen\0" + struct.pack("<Q", load)
    ehdr_size, phdr_size = 64, 56
    code_off = ehdr_size + 2 * phdr_size
    note_off = code_off + len(code)
    ehdr = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, load, ehdr_size, 0, 0, ehdr_size,
                          phdr_size, 2, 64, 0, 0))
    load_ph = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0xFFFFFFFF80000000 + load, load,
                          len(code), len(code) + 0x1000, 0x1000)
    note_ph = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + load_ph + note_ph + code + note


def run(m: Machine) -> list[int]:
    reports = Reports()
    m.pio.register(PORT, 4, reports)
    result = m.run(timeout=20)
    assert result.stop == "hlt", result.summary()
    return reports.values


def test_pvh_entry_state(kvm):
    initrd = b"initrd-bytes" * 100
    with Machine(kvm=kvm, memory_size=RAM, serial=False) as m:
        kernel = pvh.load(m.vm, m.vcpus, pvh_elf(PVH_CODE), ram_size=RAM,
                          cmdline="console=hvc0 quiet", initrd=initrd)
        assert kernel.entry == 0x100000
        values = run(m)
        # the module's bytes are where the start info says
        start = m.memory.read(pvh.MODLIST, 16)
        addr, size = struct.unpack("<QQ", start)
        assert m.memory.read(addr, size) == initrd and addr % 4096 == 0
        assert addr + size <= RAM
    assert values == [pvh.START_MAGIC, int.from_bytes(b"cons", "little"), 1, len(initrd), 3,
                      E820_RAM, pvh.SEL_CODE]


def test_pvh_rejects_bad_images(kvm):
    with pytest.raises(ValueError, match="no PVH entry note"):
        pvh.parse(pvh_elf(PVH_CODE, with_note=False))
    with pytest.raises(ValueError, match="not an ELF"):
        pvh.parse(b"MZ" + bytes(100))
    with Machine(kvm=kvm, memory_size=RAM, serial=False) as m:
        with pytest.raises(ValueError, match="does not fit"):
            pvh.load(m.vm, m.vcpus, pvh_elf(PVH_CODE, load=RAM), ram_size=RAM)
        with pytest.raises(ValueError, match="does not fit"):
            pvh.load(m.vm, m.vcpus, pvh_elf(PVH_CODE), ram_size=RAM, initrd=bytes(RAM))


def test_memory_map():
    mmap = memory_map(RAM)
    assert [(r.addr, r.type) for r in mmap] == [(0, E820_RAM), (0x9FC00, E820_RESERVED),
                                                (0x100000, E820_RAM)]
    assert mmap[-1].addr + mmap[-1].size == RAM
    with pytest.raises(ValueError):
        memory_map(1 << 20)
    with pytest.raises(ValueError):
        memory_map(4 << 30)


# 64-bit: report the first 4 bytes of the command line, e820_entries, ramdisk_size,
# type_of_loader, CS and DS; then hlt.
BZ_CODE = b"".join([
    b"\x66\xba" + struct.pack("<H", PORT),                    # mov $PORT, %dx
    b"\x8b\x86\x28\x02\x00\x00", b"\x8b\x00", OUT,            # cmd_line_ptr -> 4 bytes
    b"\x0f\xb6\x86\xe8\x01\x00\x00", OUT,                     # movzbl e820_entries
    b"\x8b\x86\x1c\x02\x00\x00", OUT,                         # ramdisk_size
    b"\x0f\xb6\x86\x10\x02\x00\x00", OUT,                     # movzbl type_of_loader
    b"\x8c\xc8", OUT,                                         # mov %cs, %eax
    b"\x8c\xd8", OUT,                                         # mov %ds, %eax
    b"\xf4",
])


def tiny_bzimage(code: bytes, *, xloadflags: int = 1, version: int = 0x20F) -> bytes:
    setup_sects = 1
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = b"\xeb\x66"  # jmp: the header ends at 0x202 + 0x66 = 0x268
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01                                   # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)      # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)        # kernel_alignment
    setup[0x234] = 1
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)            # cmdline_size
    struct.pack_into("<Q", setup, 0x258, 0x1000000)       # pref_address
    struct.pack_into("<I", setup, 0x260, 0x100000)        # init_size
    return bytes(setup) + bytes(0x200) + code             # startup_64 at +0x200


def test_bzimage_64bit_entry_state(kvm):
    initrd = b"\x55" * 5000
    with Machine(kvm=kvm, memory_size=RAM, serial=False) as m:
        hdr = bzimage.load(m.vm, m.vcpus, tiny_bzimage(BZ_CODE), ram_size=RAM,
                           cmdline="root=/dev/vda", initrd=initrd)
        assert bzimage.load_address(hdr, RAM) == 0x1000000
        assert m.vcpus[0].get_regs().rip == 0x1000200
        values = run(m)
        zp = m.memory.read(bzimage.ZERO_PAGE, 4096)
        image, size = struct.unpack_from("<II", zp, 0x218)
        assert m.memory.read(image, size) == initrd
    assert values == [int.from_bytes(b"root", "little"), 3, len(initrd), 0xFF,
                      bzimage.SEL_BOOT_CS, bzimage.SEL_BOOT_DS]


def test_bzimage_rejects_bad_images():
    with pytest.raises(ValueError, match="no HdrS"):
        bzimage.parse(bytes(4096))
    with pytest.raises(ValueError, match="no 64-bit entry"):
        bzimage.parse(tiny_bzimage(BZ_CODE, xloadflags=0))
    with pytest.raises(ValueError, match="older than 2.12"):
        bzimage.parse(tiny_bzimage(BZ_CODE, version=0x20A))


def test_load_linux_picks_the_format(kvm, tmp_path):
    from pyvmm.loaders.linux import load_linux, ram_size

    elf = tmp_path / "vmlinux"
    elf.write_bytes(pvh_elf(PVH_CODE))
    with Machine(kvm=kvm, memory_size=RAM, serial=False) as m:
        assert ram_size(m.memory) == RAM
        assert isinstance(load_linux(m, elf, cmdline="console=hvc0"), pvh.Vmlinux)
        assert m.vcpus[0].get_regs().rbx == pvh.START_INFO
    with Machine(kvm=kvm, memory_size=RAM, serial=False) as m:
        hdr = load_linux(m, tiny_bzimage(BZ_CODE), initrd=b"x" * 100)
        assert isinstance(hdr, bzimage.SetupHeader)
        assert m.vcpus[0].get_regs().rsi == bzimage.ZERO_PAGE
    with Machine(kvm=kvm, serial=False) as m, pytest.raises(ValueError, match="no RAM"):
        load_linux(m, elf)
