# SPDX-License-Identifier: GPL-2.0-or-later
"""Sphinx configuration of pyvmm's documentation: the guides (Markdown, through MyST) and the
API reference (autodoc, from the docstrings). Build: tox -e docs (warnings are errors)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import pyvmm  # noqa: E402

project = "pyvmm"
author = "The pyvmm developers"
copyright = "the pyvmm developers; GPL-2.0-or-later"  # noqa: A001 (Sphinx's name)
release = pyvmm.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]


def _architecture_when_present(app, docname, source) -> None:
    """The architecture guide (docs/ARCHITECTURE.md) is written with the core; until it is
    there, its toctree entry is left out rather than warned about."""
    if docname == "index" and not (Path(__file__).parent / "ARCHITECTURE.md").exists():
        source[0] = source[0].replace("\n   ARCHITECTURE\n", "\n")


def setup(app) -> None:
    app.connect("source-read", _architecture_when_present)


autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
autoclass_content = "both"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
nitpicky = False

html_theme = "alabaster"
html_title = f"pyvmm {release}"
html_static_path: list[str] = []
