# SPDX-License-Identifier: GPL-2.0-or-later
"""The compiled exit helper (pyvmm._runext, pyvmm.runext): built by the install, its layout
facts are pyvmm's own, every exit decodes through it exactly as exits.decode() reads the page,
and pyvmm runs guests without it (PYVMM_NO_RUNEXT=1), saying so in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pyvmm import exits, guests, ioctls, runext
from pyvmm._ffi import ffi


def test_the_install_built_the_helper():
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("no C compiler: the helper is optional")
    assert runext.AVAILABLE, runext.NOTE
    assert runext.NOTE == ""


def test_the_helpers_layout_is_the_kernel_headers():
    from pyvmm import _build_runext as build

    src = build.SOURCE
    assert f"PYVMM_KVM_RUN {ioctls.KVM_RUN:#X}u".replace("0X", "0x") in src
    assert f"RUN_EXIT_REASON {ffi.offsetof('struct kvm_run', 'exit_reason')} " in src
    union = ffi.offsetof("struct kvm_run", "io")
    assert f"RUN_UNION {union} " in src and union == ffi.offsetof("struct kvm_run", "mmio")
    io = [ffi.offsetof("struct kvm_run", "io", f) - union
          for f in ("direction", "size", "port", "count", "data_offset")]
    assert io == [0, 1, 2, 4, 8]
    mmio = [ffi.offsetof("struct kvm_run", "mmio", f) - union
            for f in ("phys_addr", "data", "len", "is_write")]
    assert mmio == [0, 8, 16, 20]
    assert exits.MMIO_DATA_OFFSET == union + 8
    assert "PIO_DATA_OFFSET 4096u" in src and runext.PIO_DATA_OFFSET == 4096


class Answering:
    """A device for the pio and mmio payloads: INs and loads get a fixed pattern."""

    def __call__(self, ex, vcpu):
        if not ex.is_write:
            ex.data[:] = b"\x5a" * len(ex.data)


def _checked(vcpu, size, seen):
    """vcpu.run, with every exit compared to exits.decode() of the page it came from."""
    run = vcpu.run
    page = memoryview(ffi.buffer(vcpu.kvm_run, size))

    def checked_run(*args, **kwargs):
        ex = run(*args, **kwargs)
        if not isinstance(ex, exits.IntrExit):  # EINTR: the page holds the previous exit
            assert ex == exits.decode(vcpu.kvm_run, page), ex
            if isinstance(ex, (exits.IoExit, exits.MmioExit)):
                # the data view is the page's own bytes, not a copy
                assert ex.data.obj is not None and not ex.data.readonly
            seen.add((type(ex).__name__, getattr(ex, "count", 1) > 1,
                      getattr(ex, "is_write", None)))
        return ex

    return checked_run


@pytest.mark.parametrize("name", ["pio", "mmio", "hello"])
def test_every_exit_decodes_as_the_page_says(kvm, name):
    p = guests.build(name)
    seen: set = set()
    with kvm.create_vm() as vm:
        vcpu = p.prepare(vm, cpuid=kvm.supported_cpuid())
        if name == "mmio":
            vm.add_memory(p.symbol("RO_BASE"), 0x1000, readonly=True)
        vcpu.run = _checked(vcpu, kvm.vcpu_mmap_size, seen)
        r = guests.run_loop(vcpu, guests.GuestResult(p.name), timeout=20, handler=Answering())
        del vcpu.run
    assert r.ok, str(r)
    if name == "pio":   # single I/O both ways, and string I/O (rep insw)
        assert {("IoExit", False, True), ("IoExit", False, False)} <= seen
        assert any(kind == "IoExit" and string for kind, string, _ in seen)
    if name == "mmio":
        assert {("MmioExit", False, True), ("MmioExit", False, False)} <= seen


def test_pyvmm_runs_without_the_helper_and_says_so(kvm):
    code = ("from pyvmm import guests, runext, Kvm\n"
            "assert not runext.AVAILABLE\n"
            "p = guests.build('pio')\n"
            "k = Kvm()\n"
            "vm = k.create_vm()\n"
            "vcpu = p.prepare(vm, cpuid=k.supported_cpuid())\n"
            "def dev(ex, vcpu):\n"
            "    if not ex.is_write: ex.data[:] = bytes(len(ex.data))\n"
            "r = guests.run_loop(vcpu, guests.GuestResult(p.name), timeout=20, handler=dev)\n"
            "assert r.ok, str(r)\n"
            "print(sum(r.exits.values()))\n")
    env = dict(os.environ, PYVMM_NO_RUNEXT="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 10
    note = [line for line in proc.stderr.splitlines() if "compiled exit helper" in line]
    assert len(note) == 1 and "PYVMM_NO_RUNEXT" in note[0] and "slower" in note[0]
