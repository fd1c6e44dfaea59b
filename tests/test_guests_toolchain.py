# SPDX-License-Identifier: GPL-2.0-or-later
"""The guest payload toolchain: header syntax, real as/ld/objcopy builds, the cache, errors,
and the system structures of the layout. No /dev/kvm needed."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm import guests
from pyvmm.guests import layout, toolchain, ucall
from pyvmm.guests.toolchain import (
    AssemblyError,
    HeaderError,
    MissingToolError,
    ToolchainError,
    parse_header,
)

SHIPPED = ("hello", "modes", "pio", "mmio")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYVMM_GUEST_CACHE", str(cache))
    return cache


def write_source(tmp_path: Path, body: str, header: str = "mode=long64", name="t.S") -> Path:
    src = tmp_path / name
    src.write_text(f"# pyvmm: {header}\n.include \"pyvmm.inc\"\n{body}\n")
    return src


# -- header --------------------------------------------------------------------------------

def test_header_all_keys():
    h = parse_header("# comment\n# pyvmm: mode=prot32 load=0x2000 entry=main memory=4M\n")
    assert (h.mode, h.load, h.entry, h.memory) == ("prot32", 0x2000, "main", 4 << 20)


def test_header_defaults_and_repeated_lines():
    h = parse_header("#pyvmm: mode=long64\n  # pyvmm: memory=0x300000 load=8192\n")
    assert (h.mode, h.load, h.entry, h.memory) == ("long64", 0x2000, "start", 0x300000)


def test_header_numeric_entry():
    assert parse_header("# pyvmm: mode=real16 entry=0x1010").entry == 0x1010


@pytest.mark.parametrize("text, match", [
    ("nothing here\n", "no `# pyvmm: mode="),
    ("# pyvmm: mode=vm86\n", "unknown mode 'vm86'"),
    ("# pyvmm: mode=long64 laod=0x1000\n", "unknown header key 'laod'"),
    ("# pyvmm: mode=long64 load\n", "expected key=value"),
    ("# pyvmm: mode=long64 load=0xzz\n", "not a number"),
    ("# pyvmm: mode=long64 memory=0x1234\n", "multiple of 4 KiB"),
    ("# pyvmm: mode=long64 memory=0x10000\n", "system area"),
    ("# pyvmm: mode=real16 load=0x20000\n", "below 64 KiB"),
])
def test_header_errors(text, match):
    with pytest.raises(HeaderError, match=match):
        parse_header(text)


# -- building ------------------------------------------------------------------------------

def test_shipped_payloads_listed_and_sources_found():
    assert set(SHIPPED) <= set(guests.available())
    assert (guests.sources_dir() / "pyvmm.inc").is_file()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_payloads_build(name):
    p = guests.build(name)
    assert p.name == name
    assert p.mode in toolchain.MODES
    assert p.load_address == 0x1000 and p.entry == p.symbols["start"]
    assert 0 < len(p.image) and p.end <= layout.SYSTEM_BASE
    assert p.memory_size == 0x200000


def test_hello_image_and_symbols(tmp_path):
    p = guests.build("hello")
    assert p.mode == "real16"
    msg = b"Hello from real mode\n"
    off = p.symbol("message") - p.load_address
    assert p.image[off:off + len(msg)] == msg
    assert p.symbols["message_len"] == len(msg)
    # the image is what objcopy made of the ELF kept in the cache
    flat = tmp_path / "hello.bin"
    subprocess.run(["objcopy", "-O", "binary", str(p.elf_path), str(flat)], check=True)
    out = flat.read_bytes()
    assert out == p.image
    with pytest.raises(KeyError, match="no symbol 'nope'"):
        p.symbol("nope")


def test_inc_constants_match_host_side():
    """pyvmm.inc's numbers, read back from the ELF, equal layout.py's and ucall.py's."""
    syms = guests.build("hello").symbols
    for name in ("SYSTEM_BASE", "GDT", "GDT_LIMIT", "GDTR", "IDTR", "IDT", "IDT_LIMIT",
                 "EXC_STUBS", "TSS", "TSS_LIMIT", "RING0_STACK_TOP", "PML4", "STACK_TOP",
                 "SEL_CODE32", "SEL_DATA", "SEL_CODE64", "SEL_UDATA", "SEL_UCODE64", "SEL_TSS"):
        assert syms[f"PYVMM_{name}"] == getattr(layout, name), name
    for name in ("CONSOLE", "REPORT", "DONE", "FAIL", "FAULT"):
        assert syms[f"PYVMM_PORT_{name}"] == getattr(ucall, f"PORT_{name}"), name
    assert layout.FAULT_PORT == ucall.PORT_FAULT


def test_build_from_path_with_local_include(tmp_path):
    (tmp_path / "extra.inc").write_text(".set MAGIC, 0x5a5a\n")
    src = write_source(tmp_path, """
.include "extra.inc"
    .text
    .globl main
main:
    movl $MAGIC, %eax
    .data
    .globl slot
slot: .quad 0x1122334455667788
""", header="mode=long64 load=0x4000 entry=main")
    p = guests.build(src)
    assert (p.name, p.load_address, p.entry) == ("t", 0x4000, 0x4000)
    assert p.image[:5] == b"\xb8\x5a\x5a\x00\x00"  # mov $0x5a5a, %eax
    off = p.symbol("slot") - 0x4000
    assert p.image[off:off + 8] == struct.pack("<Q", 0x1122334455667788)
    assert p.symbols["MAGIC"] == 0x5A5A
    # str path also works
    assert guests.build(str(src)).image == p.image


def test_cache_hit_and_invalidation(tmp_path, private_cache):
    src = write_source(tmp_path, ".text\n.globl start\nstart: nop\n")
    first = guests.build(src)
    assert not first.cached
    assert first.build_dir.parent == private_cache
    assert (first.build_dir / "payload.bin").read_bytes() == first.image
    second = guests.build(src)
    assert second.cached and second.image == first.image and second.symbols == first.symbols
    # an edit to the source is a different key
    src.write_text(src.read_text().replace("nop", "nop\n nop"))
    third = guests.build(src)
    assert not third.cached and len(third.image) == len(first.image) + 1
    # an edit to an include next to the source also invalidates
    (tmp_path / "x.inc").write_text("# nothing\n")
    assert not guests.build(src).cached
    assert guests.build(src).cached
    # cache=False builds without touching the cache
    assert not guests.build(src, cache=False).cached


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    src = write_source(tmp_path, ".text\n.globl start\nstart: nop\n")
    p = guests.build(src)
    (p.build_dir / "payload.bin").write_bytes(b"")
    q = guests.build(src)
    assert q.image == p.image


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("PYVMM_GUEST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert guests.cache_dir() == tmp_path / "xdg" / "pyvmm" / "guests"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert guests.cache_dir() == tmp_path / "home" / ".cache" / "pyvmm" / "guests"


def test_assembler_error_carries_its_message(tmp_path):
    src = write_source(tmp_path, ".text\n.globl start\nstart:\n    frobnicate %eax\n")
    with pytest.raises(AssemblyError) as info:
        guests.build(src)
    err = info.value
    assert err.tool == "as"
    assert "frobnicate" in err.stderr and "t.S:6:" in err.stderr  # file:line from as
    assert "frobnicate" in str(err) and str(src) in str(err)


def test_linker_error(tmp_path):
    src = write_source(tmp_path, ".text\n.globl start\nstart: call nowhere\n")
    with pytest.raises(AssemblyError, match="nowhere") as info:
        guests.build(src)
    assert info.value.tool == "ld"


def test_undefined_entry(tmp_path):
    src = write_source(tmp_path, ".text\nbegin: nop\n", header="mode=long64 entry=main")
    with pytest.raises(ToolchainError, match="main"):
        guests.build(src)


def test_image_must_not_reach_the_system_area(tmp_path):
    src = write_source(tmp_path, ".text\n.globl start\nstart: nop\n.fill 0x80000, 1, 0x90\n")
    with pytest.raises(ToolchainError, match="system area"):
        guests.build(src)


def test_unknown_payload_name():
    with pytest.raises(FileNotFoundError, match="available: .*hello"):
        guests.build("no-such-payload")
    with pytest.raises(FileNotFoundError):
        guests.build("/nonexistent/dir/x.S")


def test_missing_binutils_named(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(MissingToolError) as info:
        guests.build("hello")
    msg = str(info.value)
    assert info.value.tool == "as"
    assert "binutils" in msg and "apt-get install binutils" in msg


def test_missing_single_tool_named(monkeypatch, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("as", "ld", "nm"):  # objcopy left out
        os.symlink(shutil.which(tool), bindir / tool)
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(MissingToolError, match="`objcopy` was not found"):
        guests.build("hello")


# -- layout --------------------------------------------------------------------------------

def _descriptor(gdt: bytes, selector: int) -> dict:
    lo, hi = struct.unpack_from("<II", gdt, selector & ~7)
    return {
        "base": ((lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)),
        "limit": (lo & 0xFFFF) | (hi & 0xF0000),
        "type": (hi >> 8) & 0xF, "s": (hi >> 12) & 1, "dpl": (hi >> 13) & 3,
        "p": (hi >> 15) & 1, "l": (hi >> 21) & 1, "db": (hi >> 22) & 1, "g": (hi >> 23) & 1,
    }


def test_gdt_descriptors():
    gdt = layout.gdt_bytes()
    assert gdt[:8] == bytes(8)
    c32 = _descriptor(gdt, layout.SEL_CODE32)
    assert (c32["base"], c32["limit"], c32["db"], c32["g"], c32["l"], c32["dpl"]) == \
        (0, 0xFFFFF, 1, 1, 0, 0)
    c64 = _descriptor(gdt, layout.SEL_CODE64)
    assert (c64["l"], c64["db"], c64["dpl"], c64["type"] & 8) == (1, 0, 0, 8)
    u64 = _descriptor(gdt, layout.SEL_UCODE64)
    assert (u64["l"], u64["dpl"]) == (1, 3)
    assert _descriptor(gdt, layout.SEL_UDATA)["dpl"] == 3
    tss = _descriptor(gdt, layout.SEL_TSS)
    assert (tss["base"], tss["limit"], tss["type"], tss["s"], tss["p"]) == \
        (layout.TSS, layout.TSS_LIMIT, 9, 0, 1)


def test_tss_rsp0_and_full_io_bitmap():
    tss = layout.tss_bytes()
    assert struct.unpack_from("<Q", tss, 4)[0] == layout.RING0_STACK_TOP
    iopb = struct.unpack_from("<H", tss, 0x66)[0]
    assert tss[iopb:iopb + 8192] == bytes(8192)          # every port allowed
    assert tss[iopb + 8192] == 0xFF and len(tss) == layout.TSS_LIMIT + 1


def test_identity_map_2mib_pages_low_4gib():
    pml4, pdpt, pds = layout.page_tables()
    assert struct.unpack_from("<Q", pml4)[0] == layout.PDPT | 7
    for i in range(4):
        assert struct.unpack_from("<Q", pdpt, 8 * i)[0] == (layout.PD + 4096 * i) | 7
        assert not struct.unpack_from("<Q", pdpt, 8 * i)[0] & 0x80  # no 1 GiB pages
    for gpa in (0, 0x200000, 0xD0000000, 0xFFE00000):
        entry = struct.unpack_from("<Q", pds, 8 * (gpa >> 21))[0]
        assert entry == gpa | 0x87
    pieces = layout.system_area()
    for gpa, data in pieces:
        assert layout.SYSTEM_BASE <= gpa and gpa + len(data) <= layout.SYSTEM_END


def test_exception_stubs_disassemble():
    if shutil.which("objdump") is None:
        pytest.skip("objdump missing")
    code = layout.exception_code()
    gates = layout.idt_bytes()
    for v in (6, 13, 14):
        lo, sel, _, attr, mid, hi, _ = struct.unpack_from("<HHBBHII", gates, 16 * v)
        assert (sel, attr) == (layout.SEL_CODE64, 0x8E)
        assert lo | mid << 16 | hi << 32 == layout.EXC_STUBS + 16 * v
    path = Path(os.environ["PYVMM_GUEST_CACHE"]).parent / "stubs.bin"
    path.write_bytes(code)
    dis = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64",
                          f"--adjust-vma={layout.EXC_STUBS:#x}", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert f"jmp    {layout.EXC_COMMON:#x}" in dis
    assert "push   $0xd" in dis
    assert "out    %eax,$0xed" in dis and "mov    %cr2,%rdx" in dis


def test_unwritable_cache_builds_uncached(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PYVMM_GUEST_CACHE", str(blocker / "cache"))
    p = guests.build("hello", cache=True)
    assert not p.cached and p.build_dir is None and p.image
