# SPDX-License-Identifier: GPL-2.0-or-later
"""Guest payloads: build ``guests/*.S`` into flat images, set vCPUs up for them, run them.

>>> from pyvmm import guests
>>> result = guests.run("hello")
>>> print(result)               # console text and an exit summary

Pieces: :mod:`.header` (header syntax), :mod:`.toolchain` (as/ld/objcopy, cache),
:mod:`.layout` (guest memory layout and system structures), :mod:`.modes` (vCPU state per
mode), :mod:`.ucall` (the port protocol), :mod:`.runner` (a one-vCPU exit loop).
"""

from . import layout, modes, ucall
from .payload import Payload
from .runner import STOP, GuestResult, run, run_loop
from .toolchain import (
    AssemblyError,
    HeaderError,
    MissingToolError,
    ToolchainError,
    available,
    build,
    cache_dir,
    parse_header,
    sources_dir,
)
from .ucall import ConsoleOutput, Done, Fail, Fault, Report, decode

__all__ = [
    "STOP",
    "AssemblyError",
    "ConsoleOutput",
    "Done",
    "Fail",
    "Fault",
    "GuestResult",
    "HeaderError",
    "MissingToolError",
    "Payload",
    "Report",
    "ToolchainError",
    "available",
    "build",
    "cache_dir",
    "decode",
    "layout",
    "modes",
    "parse_header",
    "run",
    "run_loop",
    "sources_dir",
    "ucall",
]
