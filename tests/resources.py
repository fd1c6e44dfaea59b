# SPDX-License-Identifier: GPL-2.0-or-later
"""What the process holds (fds, threads), for tests that check nothing leaks."""

from __future__ import annotations

import gc
import os
import time


def open_fds(collect: bool = True) -> int:
    """Open fds, after collecting the garbage earlier code left (it may hold fds)."""
    if collect:
        gc.collect()
    return len(os.listdir("/proc/self/fd"))


def settle(predicate, timeout: float = 15.0) -> bool:
    """Collect garbage until `predicate()` holds (threads end, and finalizers run,
    asynchronously); False if it still does not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
