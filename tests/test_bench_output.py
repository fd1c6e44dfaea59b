# SPDX-License-Identifier: GPL-2.0-or-later
"""`pyvmm bench`'s output folder holds pyperf files only, one per run, so pyperf's own tools
take `DIR/*.json` as it is; the paired measurements live in DIR/paired/, and only for runs
with a C side. Real (tiny) benchmark runs on this host's KVM; no timing is asserted."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from pyvmm import bench as pyvmm_bench

if not (pyvmm_bench.bench_dir() / "benchlib.py").is_file():
    if os.environ.get("CI"):
        pytest.fail("bench/ is not next to this pyvmm", pytrace=False)
    pytest.skip("bench/ is not next to this pyvmm (non-editable install)",
                allow_module_level=True)

import pyperf  # noqa: E402  (a test extra)

# one process, one value, two loops: the smallest real pyperf run
TINY = ["--", "--processes", "1", "--values", "1", "--warmups", "0", "--loops", "2"]


def bench(out, name, only, cases):
    return pyvmm_bench.main(["-o", str(out), "--name", name, "--only", only, "--cases", cases,
                             *TINY])


@pytest.fixture(scope="module")
def has_cc():
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        if os.environ.get("CI"):
            pytest.fail("no C compiler for the C reference")
        pytest.skip("no C compiler for the C reference")


def test_two_runs_compare_with_pyperf(kvm, has_cc, tmp_path, capsys):
    out = tmp_path / "results"
    assert bench(out, "first", "spawn", "spawn.vm") == 0
    assert bench(out, "second", "spawn", "spawn.vm") == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["first.json", "second.json"]
    for path in out.glob("*.json"):
        names = {b.get_name() for b in pyperf.BenchmarkSuite.load(str(path))}
        assert names == {"spawn.vm [pyvmm]", "spawn.vm [C]"}
    assert sorted(p.name for p in (out / "paired").iterdir()) == ["first.json", "second.json"]
    paired = json.loads((out / "paired" / "second.json").read_text())
    assert list(paired) == ["spawn.vm"] and len(paired["spawn.vm"]["ratios"]) == 7

    proc = subprocess.run([sys.executable, "-m", "pyperf", "compare_to",
                           *sorted(glob.glob(f"{out}/*.json"))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "spawn.vm [pyvmm]" in proc.stdout and "[first]" in proc.stdout

    capsys.readouterr()
    assert pyvmm_bench.main(["--show", "-o", str(out)]) == 0   # the newest run: second
    table = capsys.readouterr().out
    assert "micro-VM spawn, Vm/Vcpu API" in table
    assert pyvmm_bench.main(["--show", "-o", str(out), "--name", "nosuch"]) == 2


def test_a_run_without_c_side_writes_no_paired_file(kvm, tmp_path):
    out = tmp_path / "results"
    assert bench(out, "smp", "smp", "smp.1vcpu.cpl3") == 0
    assert [p.name for p in out.iterdir()] == ["smp.json"]  # no paired/, no empty {} file
    suite = pyperf.BenchmarkSuite.load(str(out / "smp.json"))
    assert [b.get_name() for b in suite] == ["smp.1vcpu.cpl3 [pyvmm]"]


def test_a_selection_that_runs_nothing_fails(kvm, tmp_path, capsys):
    assert bench(tmp_path, "none", "smp", "no.such.case") == 1
    assert "no benchmark ran" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
