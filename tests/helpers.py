# SPDX-License-Identifier: GPL-2.0-or-later
"""Small shared helpers for the core tests: open /dev/kvm (skip or fail), assemble a few lines
of 16-bit code with GNU as, and put a vCPU into real mode at a load address.

Real mode keeps the guests tiny: CS base 0, IP = LOAD, flat 64 KiB addressable through segment
registers that are all 0 unless a test says otherwise. Guest code at CPL0 is emulated one
instruction at a time on kvm_pvm (docs/HOSTS.md), so every guest here is a handful of instructions.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pyvmm import Kvm, KvmError, KvmUnavailable
from pyvmm import ioctls as io
from pyvmm.runloop import ConsoleBuffer, RunControl, RunResult, Stop, run_vcpu

LOAD = 0x1000        # where guest code is placed and starts
STACK = 0x7000       # initial SP
MEM_SIZE = 0x10000   # default RAM: 0..64 KiB


@pytest.fixture
def ioctl_spy(monkeypatch):
    """Records every ioctl pyvmm issues (request names) while still issuing it."""
    calls: list[str] = []
    real = io.ioctl

    def spy(fd, request, *args, **kw):
        calls.append(io.NAMES.get(request, hex(request)))
        return real(fd, request, *args, **kw)

    monkeypatch.setattr(io, "ioctl", spy)
    return calls


def require_kvm() -> bool:
    return os.environ.get("PYVMM_REQUIRE_KVM", "") not in ("", "0")


def open_kvm() -> Kvm:
    """Kvm(), or skip the test when /dev/kvm cannot be used (fail with PYVMM_REQUIRE_KVM=1)."""
    try:
        return Kvm()
    except (KvmUnavailable, KvmError) as err:
        if require_kvm():
            pytest.fail(f"PYVMM_REQUIRE_KVM=1 but /dev/kvm is unusable: {err}")
        pytest.skip(f"/dev/kvm unusable: {err}")


# -- assembling guest code ---------------------------------------------------------------------

class AsmUnavailable(RuntimeError):
    pass


@functools.cache
def asm(source: str, base: int = LOAD, bits: int = 16) -> bytes:
    """Assemble GNU-as code (`.code16` or `.code32`) linked at `base` into a flat binary.

    Labels are absolute addresses (CS base is 0), so `movw $handler, (13*4)` installs an IVT
    entry. Raises AsmUnavailable (the caller skips) when binutils is missing."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        raise AsmUnavailable("GNU as/ld are not installed (apt-get install binutils)")
    text = f".code{bits}\n.text\n.globl _start\n_start:\n" + source + "\n"
    with tempfile.TemporaryDirectory(prefix="pyvmm-asm-") as tmp:
        src, obj, out = (Path(tmp) / n for n in ("g.S", "g.o", "g.bin"))
        src.write_text(text)
        for cmd in (["as", "--32", "-o", str(obj), str(src)],
                    ["ld", "-m", "elf_i386", f"-Ttext={base:#x}", "--oformat", "binary",
                     "-o", str(out), str(obj)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr}\n--- source ---\n{text}")
        return out.read_bytes()


def code(source: str, base: int = LOAD, bits: int = 16) -> bytes:
    try:
        return asm(source, base, bits)
    except AsmUnavailable as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


# -- real-mode vCPUs ---------------------------------------------------------------------------

def real_mode(vcpu, *, rip: int = LOAD, sp: int = STACK, **regs) -> None:
    """All segments 0 (base 0, 64 KiB limit), IP = rip; extra registers by name."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    r = vcpu.get_regs()
    r.rip = rip
    r.rsp = sp
    r.rflags = 0x2
    for name, value in regs.items():
        setattr(r, name, value)
    vcpu.set_regs(r)


def protected_mode(vcpu, *, rip: int = LOAD, sp: int = STACK, idt_limit: int = 0) -> None:
    """Flat 32-bit protected mode from cached descriptors (no GDT in memory), no paging, and an
    IDT of `idt_limit` bytes at 0 (0: every exception escalates to a triple fault)."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base, seg.limit, seg.present, seg.dpl = 0, 0xFFFFFFFF, 1, 0
        seg.db, seg.s, seg.g = 1, 1, 1
        seg.selector, seg.type = 0x10, 3          # data, read/write, accessed
    sregs.cs.selector, sregs.cs.type = 0x08, 11   # code, execute/read, accessed
    sregs.idt.base, sregs.idt.limit = 0, idt_limit
    sregs.cr0 |= 1
    vcpu.set_sregs(sregs)
    r = vcpu.get_regs()
    r.rip, r.rsp, r.rflags = rip, sp, 0x2
    vcpu.set_regs(r)


def guest(vm, source: str, *, mem_size: int = MEM_SIZE, **regs):
    """Add RAM at 0 (unless the VM already has some), load `source` at LOAD and return a vCPU
    ready to run it in real mode."""
    if vm.memory.find(0) is None:
        vm.add_memory(0, mem_size)
    vm.memory.write(LOAD, code(source))
    vcpu = vm.create_vcpu()
    real_mode(vcpu, **regs)
    return vcpu


def run_to(vcpu, kind, *, limit: int = 50, handler=None, timeout: float = 5.0):
    """Run (on pyvmm's run loop, with the ucall ports off) until an exit of type `kind`;
    other exits go to `handler(exit)` (or fail the test). Returns (the exit of type kind,
    list of the other exits)."""
    seen = []

    def on_exit(ex, _vcpu):
        if isinstance(ex, kind):
            return Stop.DONE
        if handler is None:
            pytest.fail(f"unexpected exit {ex!r} before {kind.__name__}; earlier: {seen}")
        handler(ex)
        seen.append(ex)
        return None

    control = RunControl([vcpu])
    control.arm(timeout)
    try:
        out = run_vcpu(vcpu, control, RunResult(), console=ConsoleBuffer(), counts=Counter(),
                       default=on_exit, max_exits=limit, ucall_ports=frozenset())
    finally:
        control.disarm()
    if out.error is not None:
        raise out.error
    if isinstance(out.last_exit, kind):
        return out.last_exit, seen
    if out.stop == Stop.TIMEOUT:
        pytest.fail(f"guest did not reach {kind.__name__} within {timeout}s; saw {seen}")
    if out.stop == Stop.MAX_EXITS:
        pytest.fail(f"no {kind.__name__} within {limit} exits: {seen[-5:]}")
    pytest.fail(f"run ended ({out.stop}, {out.last_exit!r}) before {kind.__name__}; "
                f"earlier: {seen}")


def expect(vcpu, kind, timeout: float = 5.0):
    """One run(); the exit must be of type `kind`."""
    ex = vcpu.run(timeout=timeout)
    assert isinstance(ex, kind), f"expected {kind.__name__}, got {ex!r}"
    return ex


def spin_payload(tmp_path, mode: str = "long64-user") -> str:
    """A payload that spins forever (`jmp .`), as a path for Machine.load: only a timeout,
    a kick or a stop ends it. At CPL3 it runs natively on kvm_pvm."""
    src = tmp_path / f"spin_{mode.replace('-', '_')}.S"
    bits = ".code16" if mode == "real16" else (".code32" if mode == "prot32" else ".code64")
    src.write_text(f"# pyvmm: mode={mode} load=0x1000 entry=start\n{bits}\n.globl start\n"
                   "start: jmp start\n")
    return str(src)
