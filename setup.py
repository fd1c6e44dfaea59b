# SPDX-License-Identifier: GPL-2.0-or-later
"""Builds pyvmm's optional compiled exit helper (pyvmm/_build_runext.py); everything else is
in pyproject.toml. Without a C compiler the build warns and pyvmm runs on its pure-cffi path."""

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Every extension is optional: a failed compile is a warning, not a failed install."""

    def build_extension(self, ext):
        ext.optional = True
        super().build_extension(ext)


setup(cffi_modules=["pyvmm/_build_runext.py:ffibuilder"], cmdclass={"build_ext": OptionalBuildExt})
