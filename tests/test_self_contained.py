# SPDX-License-Identifier: GPL-2.0-or-later
"""The repository stands alone: nothing a user receives (README, docs, metadata, code,
messages, tests) points at files outside it. Host facts live in docs/HOSTS.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Files outside the repository that earlier text used to point at. The pattern is spelled in
# pieces so that this file does not match itself.
FORBIDDEN = re.compile("|".join([
    r"\bshared/",
    r"(?<![\w/])" + "HOST" + r"\.md",
    r"\b" + "DESIGN" + r"\.md",
]))

# CI and test config are the places allowed to use the developers' kvm-unit-tests checkout
# beside the clone, through a setting a user points at their own build.
ALLOWED = {".ci/run", "tox.ini", "tests/conftest.py"}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an sdist or an installed copy)")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for path in tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{rel}:{lineno}: {line.strip()}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_must():
    for bad in ("see ../" + "sha" + "red/x", "(HO" + "ST.md)", "the DES" + "IGN.md contract"):
        assert FORBIDDEN.search(bad), bad
    for good in ("docs/HOSTS.md", "see HOSTS.md", "sharedmemory/"):
        assert not FORBIDDEN.search(good), good


def test_host_notes_are_in_the_repository():
    text = (ROOT / "docs" / "HOSTS.md").read_text()
    for fact in ("kvm_pvm", "stock KVM", "TSS I/O bitmap", "MXCSR", "ENOSPC", "IDT limit",
                 "SSE", "udev"):
        assert fact in text, fact


def test_the_udev_rule_is_the_same_everywhere():
    from pyvmm.errors import KVM_UDEV_RULE

    for doc in ("docs/HOSTS.md", "docs/CI.md", ".github/workflows/ci.yml"):
        assert KVM_UDEV_RULE in (ROOT / doc).read_text(), doc
