"""The benchmark machinery (bench/, pyvmm bench): the C reference runs every path on the same
guest state as pyvmm and counts exactly; a pyperf time function runs; the table evaluates
targets. No timing is asserted anywhere."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from pyvmm import bench as pyvmm_bench

BENCH = pyvmm_bench.bench_dir()
if not (BENCH / "benchlib.py").is_file():
    if os.environ.get("CI"):   # CI installs the checkout editable: this must not happen there
        pytest.fail("bench/ is not next to this pyvmm", pytrace=False)
    pytest.skip("bench/ is not next to this pyvmm (non-editable install)",
                allow_module_level=True)
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402

COUNT = 40


@pytest.fixture(scope="module")
def cref():
    if shutil.which("gcc") is None and "CC" not in os.environ:
        if os.environ.get("CI"):  # .ci/run installs gcc
            pytest.fail("no C compiler for the C reference")
        pytest.skip("no C compiler for the C reference")
    return benchlib.build_cref()


@pytest.fixture
def state(tmp_path):
    def make(scenario):
        return benchlib.dump_state(scenario, tmp_path / "state.bin")
    return make


def test_cref_is_built_outside_the_repository(cref):
    assert cref.is_file()
    assert BENCH.parent not in cref.parents
    assert benchlib.build_cref() == cref  # cached by source hash


@pytest.mark.parametrize("mode", ["cpl0", "cpl3"])
@pytest.mark.parametrize("path", ["exit-pio", "exit-mmio", "ioevent-pio", "ioevent-mmio"])
def test_cref_counts_every_ring(kvm, cref, state, mode, path):
    ref = benchlib.CRef(path, state(benchlib.doorbell(mode, path.endswith("mmio"))))
    try:
        for count in (COUNT, 3, 0):  # the guest restarts from its initial state each time
            seconds, rings, exits = ref.run(count)
            assert rings == count
            assert seconds > 0
            # the guest's REPORT and DONE always exit; the rings only on the userspace path
            assert exits == 2 + (count if path.startswith("exit") else 0)
    finally:
        ref.close()
    assert ref.proc.returncode == 0


def test_cref_pingpong_counts_notifies_and_interrupts(kvm, cref, state):
    ref = benchlib.CRef("pingpong", state(benchlib.PINGPONG))
    try:
        for count in (COUNT, 5):
            seconds, rings, exits = ref.run(count)
            assert (rings, exits) == (count, 2)
            assert seconds > 0
    finally:
        ref.close()
    assert ref.proc.returncode == 0


def test_cref_spawn(kvm, cref, state):
    ref = benchlib.CRef("spawn", state(benchlib.doorbell("cpl0", False)))
    try:
        seconds, spawned, exits = ref.run(3)
        assert (spawned, exits) == (3, 6)
        assert seconds > 0
    finally:
        ref.close()


def test_cref_rejects_a_bad_state_file(cref, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a state")
    ref = benchlib.CRef("exit-pio", bad)
    with pytest.raises(RuntimeError, match="ended"):
        ref.run(1)
    ref.close()


def test_benchmark_functions_run_a_few_loops(kvm, cref):
    import bench_exits
    import bench_pingpong
    import bench_spawn

    cases = {c.name: c for c in bench_exits.CASES + bench_pingpong.CASES + bench_spawn.CASES}
    for name in ("exit.pio.cpl0.machine", "exit.mmio.cpl3.run", "ioevent.pio.cpl0", "pingpong",
                 "spawn.machine"):
        case = cases[name]
        for loops in (1, 2):
            assert case.pyvmm(loops) > 0
        c_side = benchlib.c_timer(case.c_mode, case.scenario)
        assert c_side(2) > 0


def test_table_evaluates_targets():
    rows = [
        pyvmm_bench.Row("exit.pio.cpl0.machine", "g", "exit", "ratio<=1.08", "ring",
                        10e-6, 9.5e-6),
        pyvmm_bench.Row("ioevent.pio.cpl0", "g", "iofd", "speedup>=3.5:exit.pio.cpl0.machine",
                        "ring", 2e-6, 2e-6),
        pyvmm_bench.Row("spawn.vm", "s", "spawn", "ratio<=1.5", "spawn", 3e-3, 1e-3),
    ]
    table = pyvmm_bench.format_table(rows)
    lines = table.splitlines()
    assert "met" in next(line for line in lines if line.startswith("exit"))
    assert "5.0x faster" in next(line for line in lines if line.startswith("iofd"))
    assert "MISSED" in next(line for line in lines if line.startswith("spawn"))
    assert "6.53 us" in table  # the seed's number beside its row


def test_pyvmm_bench_reports_missing_scripts(tmp_path, capsys):
    assert pyvmm_bench.main(["--bench-dir", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "bench/bench_*.py" in capsys.readouterr().err
