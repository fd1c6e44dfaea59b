# SPDX-License-Identifier: GPL-2.0-or-later
"""The Sphinx documentation (guides and API reference) builds with warnings as errors, as
`tox -e docs` builds it, and the reference covers the public API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]



def need_sphinx() -> None:
    try:
        import myst_parser  # noqa: F401
        import sphinx  # noqa: F401
    except ImportError as err:
        if os.environ.get("CI"):  # .ci/run installs the docs extra
            pytest.fail(f"the docs extra is not installed: {err}", pytrace=False)
        pytest.skip(f"the docs build needs the docs extra (pip install -e '.[docs]'): {err}")


def test_docs_build_without_warnings(tmp_path):
    need_sphinx()
    out = tmp_path / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                           "html", "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"),
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (out / "api.html").read_text()
    import pyvmm

    for name in pyvmm.__all__:
        if name != "exits":
            assert f'id="pyvmm.{name}"' in api, name
    for guide in ("HOSTS", "writing-a-device", "writing-a-payload", "nested-runner",
                  "benchmarking", "CI"):
        assert (out / f"{guide}.html").is_file(), guide
