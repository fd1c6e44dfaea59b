# SPDX-License-Identifier: GPL-2.0-or-later
"""isa-debug-exit: a port a guest writes to end the run with a status.

A write of value `v` (any width, anywhere in the device's ports) ends the run with status
`(v << 1) | 1`, the number QEMU exits with, so a test kernel's `exit(0)` reports 1 and
`exit(1)` reports 3 under pyvmm as under QEMU. Reads answer all ones (the device has no read
side; QEMU answers an unassigned read the same way).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

#: Where kvm-unit-tests' run script puts the device (`iobase=0xf4,iosize=0x4`).
DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4


def exit_status(value: int) -> int:
    """The status QEMU reports for a guest write of `value`: `(value << 1) | 1`."""
    if value < 0:
        raise ValueError(f"a port write is unsigned, got {value}")
    return (value << 1) | 1


def guest_code(status: int) -> int:
    """The value the guest wrote, from a status `exit_status()` made (an odd number)."""
    if status < 1 or not status & 1:
        raise ValueError(f"{status} is not a debug-exit status (those are odd and positive)")
    return status >> 1


class DebugExit:
    """The isa-debug-exit device. `on_exit(status)` is called once per write (from the vCPU
    thread that wrote), e.g. `on_exit=lambda s: machine.stop("done", status=s)`. Every write
    is also kept: `status` is the last one (None before any), `writes` counts them."""

    def __init__(self, on_exit: Callable[[int], object] | None = None, *,
                 length: int = DEBUG_EXIT_SIZE) -> None:
        if length <= 0:
            raise ValueError(f"the device needs at least one port, got length {length}")
        self.on_exit = on_exit
        self.length = length
        self.status: int | None = None
        self.writes = 0
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes) -> None:
        """A guest OUT: the value is the written bytes, little-endian, at their width."""
        status = exit_status(int.from_bytes(data, "little"))
        with self._lock:
            self.status = status
            self.writes += 1
        if self.on_exit is not None:
            self.on_exit(status)

    def read(self, offset: int, size: int) -> bytes:
        """A guest IN: the device has no readable register."""
        return b"\xff" * size
