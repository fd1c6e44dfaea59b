# SPDX-License-Identifier: GPL-2.0-or-later
"""Logging for devices that never keeps a device alive. A log record that held the exception
would hold its traceback, the traceback its frames, and the frames the device, its VM and the
VM's RAM, for as long as any handler keeps records (pytest's does, for a whole test): so a
record holds text only."""

from __future__ import annotations

import logging
import traceback

log = logging.getLogger("pyvmm.devices")


def log_failure(what: str, err: BaseException) -> None:
    """Log `what` failed with `err` (and its traceback), as text."""
    log.error("%s: %s", what, "".join(traceback.format_exception(err)).rstrip())
