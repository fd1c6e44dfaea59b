# SPDX-License-Identifier: GPL-2.0-or-later
"""The multiboot loader, with small multiboot kernels built here by GNU as/ld (ELF32 and
the header-address form) that report to the host what they found at their entry: EAX, EBX,
the information structure's fields, the command line, the module and the memory map."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from pyvmm import Machine
from pyvmm.loaders.multiboot import (BOOTLOADER_MAGIC, HEADER_MAGIC, MultibootError,
                                     default_memory_map, parse_image)

REPORT_PORT = 0x500
DONE_PORT = 0x504

# The probe: at entry it sends, as 32-bit OUTs to REPORT_PORT, EAX, EBX, EFLAGS, CS, DS,
# CR0, the info fields (flags, mem_lower, mem_upper, cmdline, mods_count, mods_addr,
# mmap_length, mmap_addr, boot_loader_name), the first 4 bytes of the command line, of the
# module and of its string, the module's size, the first memory map entry (size, base low,
# length low, type), and a word of .bss that the host filled with garbage before loading.
PROBE = r"""
    .section .mbheader, "a"
    .align 4
mbh:
    .long 0x1BADB002, FLAGS, -(0x1BADB002 + FLAGS)
    .long mbh, LOAD, load_end, bss_end, start   # used only with flag 16
    .text
    .globl start
start:
    mov $stack_top, %esp   # ESP is undefined at a multiboot entry
    mov $0x500, %dx
    out %eax, %dx
    mov %ebx, %eax;        out %eax, %dx
    pushf; pop %eax;       out %eax, %dx
    mov %cs, %ax; movzwl %ax, %eax; out %eax, %dx
    mov %ds, %ax; movzwl %ax, %eax; out %eax, %dx
    mov %cr0, %eax;        out %eax, %dx
    mov 0(%ebx), %eax;     out %eax, %dx
    mov 4(%ebx), %eax;     out %eax, %dx
    mov 8(%ebx), %eax;     out %eax, %dx
    mov 16(%ebx), %eax;    out %eax, %dx
    mov 20(%ebx), %eax;    out %eax, %dx
    mov 24(%ebx), %eax;    out %eax, %dx
    mov 44(%ebx), %eax;    out %eax, %dx
    mov 48(%ebx), %eax;    out %eax, %dx
    mov 64(%ebx), %eax;    out %eax, %dx
    mov 16(%ebx), %esi;    mov (%esi), %eax; out %eax, %dx
    mov 24(%ebx), %esi
    mov 0(%esi), %edi;     mov (%edi), %eax; out %eax, %dx
    mov 8(%esi), %edi;     mov (%edi), %eax; out %eax, %dx
    mov 4(%esi), %eax;     sub 0(%esi), %eax; out %eax, %dx
    mov 48(%ebx), %esi
    mov 0(%esi), %eax;     out %eax, %dx
    mov 4(%esi), %eax;     out %eax, %dx
    mov 12(%esi), %eax;    out %eax, %dx
    mov 20(%esi), %eax;    out %eax, %dx
    mov bss_word, %eax;    out %eax, %dx
    mov $0x504, %dx
    out %al, %dx
    hlt
    .data
    .long 0x12345678
load_end:
    .bss
bss_word:
    .skip 0x2000
stack_top:
bss_end:
"""

FIELDS = ("eax", "ebx", "eflags", "cs", "ds", "cr0", "flags", "mem_lower", "mem_upper",
          "cmdline", "mods_count", "mods_addr", "mmap_length", "mmap_addr", "loader_name",
          "cmdline_head", "module_head", "module_string_head", "module_size", "mmap_size",
          "mmap_base", "mmap_length0", "mmap_type", "bss_word")

LOAD = 0x100000


def build_probe(tmp_path, *, flags: int = 0, load: int = LOAD) -> bytes:
    """The probe kernel as an ELF32 file (linked at `load`)."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            pytest.fail(f"GNU {tool} is needed to build the multiboot probe")
    src = tmp_path / "probe.S"
    src.write_text(f".set FLAGS, {flags}\n.set LOAD, {load}\n" + PROBE)
    obj, elf = tmp_path / "probe.o", tmp_path / "probe.elf"
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    script = tmp_path / "probe.ld"
    script.write_text(f"""ENTRY(start)
SECTIONS {{
  . = {load:#x};
  .text : {{ *(.mbheader) *(.text) }}
  .data : {{ *(.data) }}
  .bss : {{ *(.bss) }}
}}
""")
    subprocess.run(["ld", "-m", "elf_i386", "-T", str(script), "-o", str(elf), str(obj)],
                   check=True)
    return elf.read_bytes()


class Recorder:
    """PIO device collecting the probe's 32-bit reports; the done port ends the run."""

    def __init__(self, machine: Machine) -> None:
        self.values: list[int] = []
        self.machine = machine

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.values.append(int.from_bytes(data, "little"))
        else:
            self.machine.stop("done")


def boot(kernel, *, memory: int = 32 << 20, **kwargs) -> tuple[dict, object]:
    with Machine(memory_size=memory) as m:
        rec = Recorder(m)
        m.pio.register(REPORT_PORT, 8, rec)
        m.memory.write(LOAD, b"\xa5" * 0x10000)  # garbage where the image and bss go
        info = m.load_multiboot(kernel, **kwargs)
        result = m.run(timeout=20)
        assert result.stop == "done", result.summary()
        assert len(rec.values) == len(FIELDS), rec.values
        return dict(zip(FIELDS, rec.values, strict=True)), info


def test_elf_kernel_sees_the_multiboot_machine_state(tmp_path, kvm):
    elf = tmp_path / "k.elf"
    elf.write_bytes(build_probe(tmp_path))
    got, info = boot(elf, cmdline="probe.elf -v now", modules=[(b"NR_CPUS=1\nX=2\n", "env")])
    assert got["eax"] == BOOTLOADER_MAGIC
    assert got["ebx"] == info.address and info.address > LOAD
    assert got["eflags"] & (1 << 9) == 0 and got["eflags"] & (1 << 17) == 0  # IF, VM clear
    assert got["cr0"] & 1 == 1 and got["cr0"] >> 31 == 0                      # PE, no PG
    assert (got["cs"], got["ds"]) == (0x08, 0x10)
    # memory, cmdline, mods, mmap and loader name are valid
    assert got["flags"] & 0b1001001101 == 0b1001001101
    assert got["mem_lower"] == 0x9FC00 >> 10
    assert got["mem_upper"] == ((32 << 20) - 0x100000) >> 10
    assert got["cmdline_head"].to_bytes(4, "little") == b"prob"
    assert got["mods_count"] == 1
    assert got["module_head"].to_bytes(4, "little") == b"NR_C"
    assert got["module_string_head"].to_bytes(4, "little") == b"env\0"
    assert got["module_size"] == len(b"NR_CPUS=1\nX=2\n")
    assert got["mmap_length"] == 3 * 24 and got["mmap_size"] == 20
    assert (got["mmap_base"], got["mmap_length0"], got["mmap_type"]) == (0, 0x9FC00, 1)
    assert 0 < got["loader_name"] < info.address and got["cmdline"] < info.address
    assert got["bss_word"] == 0  # the loader zeroed the bss over the garbage


def test_header_address_form_is_loaded_from_the_header(tmp_path, kvm):
    # The same probe as a flat binary whose header (flag 16) gives load/bss/entry addresses.
    elf = build_probe(tmp_path, flags=1 << 16)
    flat = tmp_path / "k.bin"
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "-j", ".data",
                    str(tmp_path / "probe.elf"), str(flat)], check=True)
    parsed = parse_image(flat.read_bytes())
    assert parsed.flags & (1 << 16)
    assert parsed.segments[0].address == LOAD
    assert parsed.entry == parse_image(elf).entry
    got, _ = boot(flat, cmdline="flat")
    assert got["eax"] == BOOTLOADER_MAGIC
    assert got["mods_count"] == 0
    assert got["bss_word"] == 0


def test_parse_refuses_what_is_not_a_multiboot_kernel(tmp_path):
    with pytest.raises(MultibootError, match="no multiboot header"):
        parse_image(b"\x7fELF" + bytes(100))
    bad_sum = struct.pack("<III", HEADER_MAGIC, 0, 0) + bytes(64)
    with pytest.raises(MultibootError, match="no multiboot header"):
        parse_image(bad_sum)
    # a header beyond the first 8 KiB is not found
    late = bytes(8192) + struct.pack("<III", HEADER_MAGIC, 0, -HEADER_MAGIC & 0xFFFFFFFF)
    with pytest.raises(MultibootError, match="no multiboot header"):
        parse_image(late)
    # a header but not ELF and no address fields
    raw = struct.pack("<III", HEADER_MAGIC, 0, -HEADER_MAGIC & 0xFFFFFFFF) + bytes(64)
    with pytest.raises(MultibootError, match="not an ELF file"):
        parse_image(raw)
    # video mode (flag 2) is refused, not silently ignored
    video = struct.pack("<III", HEADER_MAGIC, 4, -(HEADER_MAGIC + 4) & 0xFFFFFFFF)
    parse_image(build_probe(tmp_path))  # the probe itself parses
    with pytest.raises(MultibootError):
        parse_image(video + bytes(64))


def test_kernel_outside_ram_is_refused(tmp_path, kvm):
    elf = tmp_path / "k.elf"
    elf.write_bytes(build_probe(tmp_path, load=0x4000000))   # 64 MiB, above 32 MiB of RAM
    with Machine(memory_size=32 << 20) as m, pytest.raises(ValueError, match="do not fit"):
        m.load_multiboot(elf)
    with Machine() as m, pytest.raises(ValueError, match="no RAM"):
        m.load_multiboot(elf)


def test_default_memory_map_reserves_the_bios_area():
    class R:
        def __init__(self, a, s):
            self.guest_addr, self.size = a, s

    assert default_memory_map([R(0, 128 << 20)]) == [
        (0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2), (0x100000, (127 << 20), 1)]
    assert default_memory_map([R(0, 0x80000), R(1 << 32, 1 << 20)]) == [
        (0, 0x80000, 1), (1 << 32, 1 << 20, 1)]
