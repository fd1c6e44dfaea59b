"""Runaway guests: each ends with the right typed result within its timeout, and the VM
closes cleanly afterwards."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from pyvmm import Machine
from pyvmm.testing.hostinfo import kvm_module

SPIN = {
    "long64-user": "start: jmp start",          # native on kvm_pvm
    "long64": "start: jmp start",               # emulated one instruction at a time
    "real16": "start: jmp start",
}

TRIPLE_FAULT = {
    # No IDT in 32-bit mode: the first exception is a triple fault.
    "prot32": ".code32\nstart: ud2",
    # Long mode: throw away the IDT the host installed, then fault.
    "long64": ".code64\nstart: lidt zero_idt(%rip)\n ud2\nzero_idt: .word 0\n .quad 0",
}


def payload(tmp_path, mode: str, body: str, name: str):
    code = ".code64" if mode.startswith("long") else (".code32" if mode == "prot32"
                                                      else ".code16")
    src = tmp_path / f"{name}.S"
    src.write_text(f"# pyvmm: mode={mode} load=0x1000 entry=start\n{code}\n.globl start\n"
                   f"{body}\n")
    return str(src)


@pytest.mark.parametrize("mode", list(SPIN))
def test_infinite_loop_ends_by_timeout(make_machine, tmp_path, mode):
    m = make_machine()
    m.load(payload(tmp_path, mode, SPIN[mode], "spin"))
    started = time.monotonic()
    result = m.run(timeout=0.3)
    assert result.stop == "timeout"
    assert time.monotonic() - started < 3
    # The vCPU is still usable: another bounded run times out the same way.
    assert m.run(timeout=0.1).stop == "timeout"


@pytest.mark.parametrize("mode", list(TRIPLE_FAULT))
def test_triple_fault_is_a_shutdown(make_machine, tmp_path, mode):
    m = make_machine()
    m.load(payload(tmp_path, mode, TRIPLE_FAULT[mode], "triple"))
    result = m.run(timeout=5)
    assert result.stop == "shutdown", result
    assert type(result.last_exit).__name__ == "ShutdownExit"


def test_vmcall_at_cpl0_ends_with_a_clear_result(make_machine, tmp_path):
    """On kvm_pvm VMCALL at CPL0 never returns from KVM_RUN; the timeout ends it. On stock
    KVM an unknown hypercall number returns -KVM_ENOSYS (-1000) to the guest."""
    body = """.include "pyvmm.inc"
start:
    movl $0xdead, %eax
    vmcall
    REPORT_RAX
    DONE"""
    m = make_machine()
    m.load(payload(tmp_path, "long64", body, "vmcall"))
    started = time.monotonic()
    result = m.run(timeout=0.5)
    if kvm_module() == "kvm_pvm":
        assert result.stop == "timeout"
        assert time.monotonic() - started < 5
    else:
        assert result.ok, result
        assert result.reports[0].value64 == (-1000) & (2**64 - 1)


def test_machine_closed_while_the_vcpu_is_in_kvm_run(kvm, tmp_path):
    proc = psutil.Process()
    fds = proc.num_fds()
    m = Machine(kvm=kvm)
    m.load(payload(tmp_path, "long64-user", SPIN["long64-user"], "spin"))
    results = []
    runner = threading.Thread(target=lambda: results.append(m.run(timeout=30)))
    runner.start()
    time.sleep(0.2)
    started = time.monotonic()
    m.close()
    runner.join(5)
    assert not runner.is_alive()
    assert time.monotonic() - started < 5
    assert results and results[0].stop == "closed"
    assert proc.num_fds() <= fds
