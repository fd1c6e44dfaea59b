# SPDX-License-Identifier: GPL-2.0-or-later
"""Every Python code block of README.md runs as written, each in a fresh interpreter, on this
host's real KVM; what a block prints is compared with the values its comments promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# What a block's output must contain, keyed by a line of the block (the README states these
# in its comments; here they are checked).
EXPECTED = {
    'm.load("modes")': ["[5050, 479001600, 2432902008176640000, 5000050000]",
                        "1000000 Counter({'IoExit': 2})"],
    'm.load("pingpong"': ["1000"],
    'm.load("smp"': ["500500 [250, 250, 250, 250]"],
}


def blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_readme_has_python_blocks():
    assert len(blocks()) >= 4


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_block_runs_as_written(kvm, tmp_path, index):
    code = blocks()[index]
    # the blocks need what a user has after the quick start: pyvmm importable, nothing else
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"README block {index}:\n{code}\n{proc.stderr}"
    for key, wanted in EXPECTED.items():
        if key in code:
            for line in wanted:
                assert line in proc.stdout.splitlines(), (key, proc.stdout)
