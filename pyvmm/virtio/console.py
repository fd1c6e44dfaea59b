# SPDX-License-Identifier: GPL-2.0-or-later
"""virtio-console (virtio 1.x, section 5.3), one port: the guest's /dev/hvc0.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) the guest's output.
Output goes to `sink` (e.g. the terminal) and into a bounded buffer (`output`, the last
`keep` bytes); input given to `feed()` waits in a bounded buffer until the guest posts
receive buffers. VIRTIO_CONSOLE_F_EMERG_WRITE is offered: a byte written to the emerg_wr
configuration field is output at once.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from .device import DEVICE_CONSOLE, VirtioDevice
from .queue import Virtqueue

F_SIZE = 1 << 0
F_EMERG_WRITE = 1 << 2

RECEIVEQ, TRANSMITQ = 0, 1
EMERG_WR = 8  # configuration offset of emerg_wr
#: Output bytes kept in `output`, and input bytes waiting for the guest, at most.
DEFAULT_KEEP = 1 << 20
MAX_PENDING_INPUT = 64 << 10


class Console(VirtioDevice):
    """The console device. `sink(bytes)` sees all output as it comes."""

    device_id = DEVICE_CONSOLE
    queue_sizes = (64, 64)
    features = F_EMERG_WRITE

    def __init__(self, sink: Callable[[bytes], None] | None = None, *,
                 keep: int = DEFAULT_KEEP) -> None:
        super().__init__()
        if keep <= 0:
            raise ValueError(f"keep must be positive, got {keep}")
        self.sink = sink
        self.keep = keep
        self._out = bytearray()
        self._in = bytearray()
        self._lock = threading.Lock()
        self.output_bytes = 0      # all output ever, kept or not
        self.dropped_input = 0

    @property
    def output(self) -> bytes:
        """The last `keep` bytes the guest wrote."""
        with self._lock:
            return bytes(self._out)

    def config(self) -> bytes:
        # cols u16, rows u16, max_nr_ports u32, emerg_wr u32
        return struct.pack("<HHII", 80, 25, 1, 0)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR and data and self.negotiated & F_EMERG_WRITE:
            self._emit(data[:1])

    def _emit(self, data: bytes) -> None:
        with self._lock:
            self._out += data
            if len(self._out) > self.keep:
                del self._out[:len(self._out) - self.keep]
            self.output_bytes += len(data)
        if self.sink is not None:
            self.sink(data)

    def feed(self, data: bytes) -> None:
        """Host input for the guest (a terminal's keys). Beyond MAX_PENDING_INPUT bytes not
        yet taken by the guest, input is dropped (and counted)."""
        with self._lock:
            room = MAX_PENDING_INPUT - len(self._in)
            self._in += data[:max(room, 0)]
            self.dropped_input += max(len(data) - max(room, 0), 0)
        if self.transport is not None:
            self.transport.run_queue(RECEIVEQ)

    def handle(self, queue: Virtqueue) -> None:
        if queue.index == TRANSMITQ:
            while (chain := queue.pop()) is not None:
                data = chain.read()
                if data:
                    self._emit(data)
                queue.push(chain, 0)
            return
        while True:
            with self._lock:
                if not self._in:
                    return
            chain = queue.pop()
            if chain is None:
                return
            with self._lock:
                chunk = bytes(self._in[:chain.write_len])
            n = chain.write(chunk)
            with self._lock:
                del self._in[:n]
            queue.push(chain)
