# SPDX-License-Identifier: GPL-2.0-or-later
"""virtio-rng (virtio 1.x, section 5.4): one queue of device-writable buffers the device fills
with random bytes from the host (os.urandom)."""

from __future__ import annotations

import os

from .device import DEVICE_ENTROPY, VirtioDevice
from .queue import Virtqueue, VirtqueueError

#: Bytes given per request at most; the used length tells the driver how many it got.
MAX_FILL = 64 << 10


class Entropy(VirtioDevice):
    """The entropy device. `given` counts the bytes handed to the guest."""

    device_id = DEVICE_ENTROPY
    queue_sizes = (64,)

    def __init__(self, source=os.urandom) -> None:
        super().__init__()
        self.source = source
        self.given = 0

    def handle(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            if chain.readable:
                raise VirtqueueError("entropy request with a device-readable buffer")
            chain.write(self.source(min(chain.write_len, MAX_FILL)))
            self.given += chain.written
            queue.push(chain)
