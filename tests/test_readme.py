# SPDX-License-Identifier: GPL-2.0-or-later
"""Every Python code block of README.md and of the guides in docs/ runs as written, each in a
fresh interpreter, on this host's real KVM; what a block prints is compared with the values
its comments promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# What a block's output must contain, keyed by a line of the block (the text states these in
# its comments; here they are checked).
EXPECTED = {
    'm.load("modes")': ["[5050, 479001600, 2432902008176640000, 5000050000]",
                        "1000000 Counter({'IoExit': 2})"],
    'm.load("pingpong", regs={"rcx": 1000': ["1000"],
    'm.load("pingpong", regs={"rcx": 100,': ["100"],
    'm.load("smp"': ["500500 [250, 250, 250, 250]"],
    "Doubler()": ["[42]"],
    '"sum.S"': ["5050 5050"],
}


def blocks() -> list[tuple[str, int, str]]:
    found = []
    for path in DOCS:
        for index, code in enumerate(BLOCK.findall(path.read_text())):
            found.append((path.relative_to(ROOT).as_posix(), index, code))
    return found


def test_readme_has_python_blocks():
    assert sum(1 for name, _, _ in blocks() if name == "README.md") >= 4
    assert sum(1 for name, _, _ in blocks() if name.startswith("docs/")) >= 3


def test_every_expectation_belongs_to_a_block():
    codes = [code for _, _, code in blocks()]
    for key in EXPECTED:
        assert any(key in code for code in codes), key


@pytest.mark.parametrize("name, index, code",
                         [pytest.param(*b, id=f"{b[0]}-{b[1]}") for b in blocks()])
def test_block_runs_as_written(kvm, tmp_path, name, index, code):
    # the blocks need what a user has after the quick start: pyvmm importable, nothing else
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} block {index}:\n{code}\n{proc.stderr}"
    for key, wanted in EXPECTED.items():
        if key in code:
            for line in wanted:
                assert line in proc.stdout.splitlines(), (key, proc.stdout)
