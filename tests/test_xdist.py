# SPDX-License-Identifier: GPL-2.0-or-later
"""pyvmm's pytest plugin under pytest-xdist (`pytest -n 2`): each worker opens its own KVM
handles and VMs, and the controller alone writes the capability-skip and outcome JSON and the
summary line, merged over every worker's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

if os.environ.get("CI"):
    import xdist  # noqa: F401  (a test extra: CI must have it)
else:
    pytest.importorskip("xdist")

TESTS = textwrap.dedent('''
    import os
    import pytest
    from pyvmm import Cap

    @pytest.mark.parametrize("n", range(6))
    def test_own_vm(vm, n):
        vm.add_memory(0, 0x10000)
        worker = os.environ["PYTEST_XDIST_WORKER"]
        vm.memory.write(0, worker.encode())
        assert vm.memory.read(0, len(worker)) == worker.encode()
        with open(os.environ["WORKERS_LOG"], "a") as log:
            log.write(f"{worker} {os.getpid()} {vm.fileno()}\\n")

    @pytest.mark.requires_cap(Cap.NR_VCPUS, min=1 << 30)
    @pytest.mark.parametrize("n", range(3))
    def test_needs_more_vcpus_than_any_kvm(n):
        pass
''')


def test_plugin_under_xdist(kvm, tmp_path):
    (tmp_path / "test_many.py").write_text(TESTS)
    skips, passed = tmp_path / "skips.json", tmp_path / "passed.json"
    log = tmp_path / "workers.log"
    env = dict(os.environ, PYVMM_CAP_SKIPS=str(skips), PYVMM_PASSED=str(passed),
               WORKERS_LOG=str(log))
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p",
                           "no:cacheprovider", "-p", "xdist", str(tmp_path / "test_many.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "6 passed, 3 skipped" in out
    summary = [line for line in out.splitlines() if line.startswith("pyvmm: tests ran on")]
    assert len(summary) == 1  # the controller's, once
    assert "3 tests skipped for a missing KVM capability: NR_VCPUS 3" in summary[0]
    workers = [line.split() for line in log.read_text().splitlines()]
    assert len(workers) == 6
    assert {w for w, _, _ in workers} == {"gw0", "gw1"}   # both workers ran VMs,
    assert len({pid for _, pid, _ in workers}) == 2       # each in its own process

    cap_skips = json.loads(skips.read_text())["skipped"]
    assert sorted(cap_skips) == [f"test_many.py::test_needs_more_vcpus_than_any_kvm[{n}]"
                                 for n in range(3)]
    assert all(v == ["NR_VCPUS"] for v in cap_skips.values())
    outcomes = json.loads(passed.read_text())
    assert len(outcomes["passed"]) == 6 and not outcomes["failed"]
    assert len(outcomes["skipped"]) == 3
