# SPDX-License-Identifier: GPL-2.0-or-later
"""`pyvmm` answers a mistake the user can fix with one line naming the fix and a non-zero
status; `--debug` brings the traceback back; `--version` prints the version."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pyvmm
from pyvmm import cli


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith("pyvmm: ")
    return lines[0]


def test_unknown_payload_lists_the_available_ones(capsys):
    assert cli.main(["run", "nosuchguest"]) == 2
    line = one_line(capsys)
    assert "nosuchguest" in line and "hello" in line  # the names to choose from


def test_missing_source_file(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "missing.S")]) == 2
    assert "missing.S" in one_line(capsys)


@pytest.mark.parametrize("arg, fix", [
    ("foo=1", "the registers are rax, rbx"),
    ("rcx=zz", "not a number"),
    ("rcx", "NAME=VALUE"),
])
def test_bad_reg(arg, fix, capsys):
    assert cli.main(["run", "hello", "--reg", arg]) == 2
    assert fix in one_line(capsys)


def test_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "run", "nosuchguest"])


def test_missing_device(capsys):
    assert cli.main(["info", "--device", "/nonexistent/kvm"]) == 2
    assert "modprobe" in one_line(capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyvmm {pyvmm.__version__}"


def test_missing_assembler_is_one_line(tmp_path):
    """A fresh cache and a PATH without binutils: the payload cannot be built."""
    env = dict(os.environ, PATH=str(tmp_path), PYVMM_GUEST_CACHE=str(tmp_path / "cache"))
    env.pop("PYVMM_DEBUG", None)
    src = tmp_path / "fresh.S"
    # a payload no cache has seen (its content hash is new), so it must be assembled
    src.write_text(f"# pyvmm: mode=real16 load=0x1000 entry=start\n"
                   f"# {os.getpid()} {tmp_path}\n.globl start\nstart:\n    hlt\n")
    proc = subprocess.run([sys.executable, "-m", "pyvmm.cli", "run", str(src)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "`as` was not found" in lines[0] and "binutils" in lines[0]
