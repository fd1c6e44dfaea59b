"""Fuzzing: random bytes executed as guest code in every mode, and random kvm_run contents fed
to the exit decoder and the buses. Seeded (hypothesis, derandomized) so a failure reproduces.

CI runs a bounded slice; `PYVMM_FUZZ_EXAMPLES=2500` runs 10,000 programs (4 modes)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import Machine, exits
from pyvmm._ffi import ffi
from pyvmm.devices import Memory, MmioBus, PioBus
from pyvmm.machine import STOPS

EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "250"))
MODES = ("real16", "prot32", "long64", "long64-user")
CODE_SIZE = 64

FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                         database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])


@pytest.fixture(params=MODES)
def fuzz_machine(request, kvm, tmp_path):
    mode = request.param
    bits = {"real16": ".code16", "prot32": ".code32"}.get(mode, ".code64")
    src = tmp_path / f"fuzz_{mode.replace('-', '_')}.S"
    src.write_text(f"# pyvmm: mode={mode} load=0x1000 entry=start\n{bits}\n.globl start\n"
                   f"start: .skip {CODE_SIZE}, 0xf4\n")
    with Machine(kvm=kvm) as m:
        payload = m.load(str(src))
        yield m, payload


@FUZZ_SETTINGS
@given(code=st.binary(min_size=1, max_size=CODE_SIZE))
def test_random_guest_code_ends_in_a_typed_exit(fuzz_machine, code):
    m, payload = fuzz_machine
    payload.load(m.vm)                      # a fresh image and system area every time
    m.memory.write(payload.entry, code)
    payload.setup_vcpu(m.vcpus[0])
    result = m.run(timeout=0.05)
    assert result.stop in STOPS
    assert result.stop != "error", f"host exception for code {code.hex()}: {result.error!r}"
    assert result.last_exit is None or isinstance(result.last_exit, exits.Exit)


RUN_SIZE = ffi.sizeof("struct kvm_run")
REASONS = [int(r) for r in exits.ExitReason] + [99, 2**31, 2**32 - 1]


class _Echo:
    def read(self, offset, size):
        return bytes(size)

    def write(self, offset, data):
        pass


@settings(max_examples=max(EXAMPLES * 5, 200), deadline=None, derandomize=True, database=None)
@given(reason=st.sampled_from(REASONS), body=st.binary(min_size=RUN_SIZE, max_size=RUN_SIZE),
       tail=st.binary(min_size=0, max_size=64))
def test_exit_decoder_and_buses_survive_random_kvm_run(reason, body, tail):
    page = bytearray(12288)
    page[:RUN_SIZE] = body
    page[4096:4096 + len(tail)] = tail
    struct.pack_into("<I", page, 8, reason)
    buffer = ffi.from_buffer(page)
    run = ffi.cast("struct kvm_run *", buffer)
    view = memoryview(page)
    exit = exits.decode(run, view)
    assert isinstance(exit, exits.Exit)
    assert exit.exit_reason == reason or isinstance(exit, exits.UnknownExit)
    repr(exit)
    if isinstance(exit, exits.IoExit):
        bus = PioBus()
        bus.register(0, 0x10000, _Echo())
        bus.handle_io(exit)
    elif isinstance(exit, exits.MmioExit):
        bus = MmioBus()
        bus.register(exit.address & ~0xFFF, 0x1000, Memory(0x1000)) \
            if exit.address < (1 << 64) - 0x1000 else None
        bus.handle_mmio(exit)
