# SPDX-License-Identifier: GPL-2.0-or-later
"""`VirtioDevice`: what a virtio device model implements, whatever its transport.

A device says its type, its queues and feature bits, answers its configuration space, and
serves a queue when the transport tells it the driver notified it (`handle(queue)`, under the
transport's lock). A device with work of its own (console input) asks the transport to run a
queue for it with `self.transport.run_queue(index)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .mmio import MmioTransport
    from .queue import Virtqueue


# Device types (virtio 1.x, section 5).
DEVICE_NET = 1
DEVICE_BLOCK = 2
DEVICE_CONSOLE = 3
DEVICE_ENTROPY = 4

# Feature bits every device here can offer (section 6); the transport adds them.
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32


class VirtioDevice:
    """Base class of the device models. Subclasses set `device_id`, `queue_sizes` and
    `features` (device-specific bits), and implement `handle()`."""

    device_id = 0
    #: One entry per virtqueue: its maximum size (a power of 2).
    queue_sizes: tuple[int, ...] = (256,)
    #: Device-specific feature bits offered (the transport adds VERSION_1, EVENT_IDX and
    #: INDIRECT_DESC).
    features = 0

    def __init__(self) -> None:
        self.transport: MmioTransport | None = None
        self.negotiated = 0
        self.config_generation = 0

    def config(self) -> bytes:
        """The device configuration space (section 5.x.4), as bytes."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space; read-only by default."""

    def reset(self) -> None:
        """The driver reset the device (Status = 0): forget negotiated state."""
        self.negotiated = 0

    def activate(self) -> None:
        """The driver set DRIVER_OK: the queues are live."""

    def handle(self, queue: Virtqueue) -> None:
        """Serve `queue` after a notification: pop chains, answer them, push them back."""
        raise NotImplementedError

    def close(self) -> None:
        """Release host resources (files, threads); called when the machine closes."""
