# SPDX-License-Identifier: GPL-2.0-or-later
"""The guest port protocol, under its older name: it lives in `pyvmm.ucall` (the run loop's
layer), and this module shows the same names."""

from __future__ import annotations

from ..ucall import (  # noqa: F401 - re-exported
    EXCEPTION_NAMES,
    PORT_CONSOLE,
    PORT_DONE,
    PORT_FAIL,
    PORT_FAULT,
    PORT_REPORT,
    PORTS,
    REG_NAMES,
    ConsoleOutput,
    Done,
    Event,
    Fail,
    Fault,
    Report,
    __all__,
    capture_regs,
    decode,
    outcome,
)
