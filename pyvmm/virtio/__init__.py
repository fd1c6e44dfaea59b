# SPDX-License-Identifier: GPL-2.0-or-later
"""virtio devices in Python over the virtio-mmio transport (version 2): split virtqueues with
event-idx and indirect descriptors, notifications through ioeventfd doorbells, interrupts
through irqfd.

    from pyvmm.virtio import Block, attach, cmdline
    disk = attach(machine, Block("disk.img"), 0xD0000000, gsi=5)
    append = cmdline(0xD0000000, 5)
"""

from .blk import Block
from .console import Console
from .device import VirtioDevice
from .mmio import WINDOW, MmioTransport, attach, cmdline
from .queue import Chain, Virtqueue, VirtqueueError
from .rng import Entropy

__all__ = ["WINDOW", "Block", "Chain", "Console", "Entropy", "MmioTransport", "VirtioDevice",
           "Virtqueue", "VirtqueueError", "attach", "cmdline"]
