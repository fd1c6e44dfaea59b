# SPDX-License-Identifier: GPL-2.0-or-later
"""bench/bench_cpu.py, the CPU-per-exit benchmark: cref reports its own CPU times, every side
(C, Vcpu.run() loop, Machine) counts its exits exactly, the interleaved table has every row,
and the table evaluates absolute targets. No timing is asserted."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from pyvmm import bench as pyvmm_bench

BENCH = pyvmm_bench.bench_dir()
if not (BENCH / "benchlib.py").is_file():
    if os.environ.get("CI"):
        pytest.fail("bench/ is not next to this pyvmm", pytrace=False)
    pytest.skip("bench/ is not next to this pyvmm (non-editable install)",
                allow_module_level=True)
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402


@pytest.fixture(scope="module")
def cref():
    if shutil.which("gcc") is None and "CC" not in os.environ:
        if os.environ.get("CI"):
            pytest.fail("no C compiler for the C reference")
        pytest.skip("no C compiler for the C reference")
    return benchlib.build_cref()


def test_cref_reports_its_cpu_times(kvm, cref, tmp_path):
    state = benchlib.dump_state(benchlib.doorbell("cpl0", False), tmp_path / "s.bin")
    ref = benchlib.CRef("exit-pio", state)
    try:
        wall, rings, exits, user, system = ref.run_cpu(200)
        assert (rings, exits) == (200, 202)
        assert wall > 0 and user >= 0 and system >= 0
        assert user + system > 0          # 200 KVM_RUNs cost some CPU somewhere
        assert user + system < wall * 2 + 0.05   # CPU of one thread fits in its wall time
    finally:
        ref.close()


@pytest.mark.parametrize("side", ["C", "run", "machine"])
@pytest.mark.parametrize("mode,path", [("cpl0", "pio"), ("cpl0", "mmio"), ("cpl3", "pio")])
def test_every_side_counts_its_exits(kvm, cref, side, mode, path):
    import bench_cpu

    measure = bench_cpu.SIDE_FACTORY[side](mode, path)
    for loops in (5, 1):
        wall, user, system, exits = measure(loops)
        assert exits == loops + 2     # the rings, the guest's REPORT and its DONE
        assert wall > 0 and user >= 0 and system >= 0


def test_interleaved_table_has_every_row(kvm, cref, tmp_path):
    import bench_cpu

    data = bench_cpu.interleaved(2, 5, [("cpl0", "pio")])
    assert set(data) == {"cpl0.pio.C", "cpl0.pio.run", "cpl0.pio.machine"}
    assert all(len(e["user"]) == 2 and len(e["wall_ratios"]) == 2 for e in data.values())
    table = bench_cpu.format_interleaved(data)
    assert "cpl0 pio run" in table and "user-C <= 1.0 us" in table


def test_pyperf_time_function_is_user_cpu(kvm, cref):
    import bench_cpu

    case = next(c for c in bench_cpu.CASES if c.name == "cpu.pio.cpl0.run")
    assert case.target == "max<=1e-06" and case.c_mode is None
    assert case.pyvmm(3) >= 0


def test_table_evaluates_absolute_targets():
    rows = [pyvmm_bench.Row("cpu.pio.cpl0.run", "cpu", "fast", "max<=1e-06", "exit", 0.8e-6),
            pyvmm_bench.Row("cpu.pio.cpl0.machine", "cpu", "slow", "max<=1.5e-06", "exit",
                            2e-6)]
    lines = pyvmm_bench.format_table(rows).splitlines()
    assert "<= 1.00 us: met" in next(line for line in lines if line.startswith("fast"))
    assert "MISSED" in next(line for line in lines if line.startswith("slow"))
