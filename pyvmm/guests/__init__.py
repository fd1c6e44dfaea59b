# SPDX-License-Identifier: GPL-2.0-or-later
"""Guest payloads: build ``guests/*.S`` into flat images, set vCPUs up for them, run them.

>>> from pyvmm import guests
>>> result = guests.run("hello")
>>> print(result)               # console text and an exit summary

Pieces: :mod:`.toolchain` (header syntax, as/ld/objcopy, cache), :mod:`.layout` (guest memory
layout and system structures), :mod:`.modes` (vCPU state per mode), :mod:`.ucall` (the port
protocol), :mod:`.runner` (a one-vCPU exit loop).
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
    "Payload", "build", "run", "run_loop", "GuestResult", "STOP", "available", "sources_dir",
    "cache_dir", "parse_header", "ToolchainError", "MissingToolError", "AssemblyError",
    "HeaderError", "ConsoleOutput", "Report", "Done", "Fail", "Fault", "decode", "layout",
    "modes", "ucall",
]
