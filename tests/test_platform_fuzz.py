# SPDX-License-Identifier: GPL-2.0-or-later
"""Hostile guest I/O at every PC platform device: random widths, offsets and values on the
platform's real buses (the path a guest's exits take), in random order, never raise in the
host, always answer a read with as many bytes as asked, and leave the machine able to run a
guest. Seeded (hypothesis, derandomized) so a failure reproduces; PYVMM_FUZZ_EXAMPLES
scales it."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.platform import PcPlatform

EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "100"))

#: (bus, first address, length): every device range, a few bytes to each side.
RANGES = [("pio", 0x60, 1), ("pio", 0x64, 1), ("pio", 0x70, 2), ("pio", 0x92, 1),
          ("pio", 0xE0, 12), ("pio", 0xF4, 4), ("pio", 0x510, 2), ("pio", 0x600, 12),
          ("pio", 0xCF8, 8), ("pio", 0x2000, 24), ("pio", 0xC000, 256),
          ("mmio", 0xFEBFF000, 4096), ("mmio", 0xFF000000, 0x10000)]

access = st.tuples(
    st.sampled_from(RANGES),
    st.integers(-4, 260),                       # offset into the range (past both ends)
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, (1 << 64) - 1),
    st.booleans())                              # write?


@pytest.fixture(scope="module")
def platform():
    with PcPlatform.create(vcpus=2, memory_size=16 << 20) as pc:
        # guest-ended runs only mark the machine; nothing is running during the fuzzing
        yield pc


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(access, min_size=1, max_size=40))
def test_random_accesses_never_break_the_host(platform, accesses):
    machine = platform.machine
    for (bus_name, base, length), offset, size, value, write in accesses:
        bus = machine.pio if bus_name == "pio" else machine.mmio
        if bus_name == "pio" and size == 8:
            size = 4                            # no 8-byte port I/O on x86
        address = max(base + min(offset, length + 4), 0)
        if write:
            bus.write(address, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            assert len(bus.read(address, size)) == size
    # whatever the guest did, config space stays readable and the tables intact
    machine.pio.write(0xCF8, (0x80000000).to_bytes(4, "little"))
    assert machine.pio.read(0xCFC, 4) == (0x12378086).to_bytes(4, "little")
    assert machine.memory.read(0xE0000, 8) == b"RSD PTR "


def test_the_machine_still_runs_a_guest_afterwards(platform):
    # The fuzzing may have written debug-exit, reset, power-off or sleep registers with no
    # run in progress: each asks the machine to stop, which the next run() honours at once
    # (before the guest runs). The run after that one runs the guest.
    for _ in range(2):
        platform.machine.load("pc_fwcfg", regs={"rdi": 3})
        result = platform.run(timeout=30)
        if result.reports:
            break
        assert result.stop in ("done", "shutdown", "stopped"), result.summary()
    assert result.stop == "done" and result.status == 7, result.summary()
    assert len(result.reports) == 7
