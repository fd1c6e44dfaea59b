# SPDX-License-Identifier: GPL-2.0-or-later
"""The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2), as an MMIO bus device.

Register reads and writes reach `MmioTransport` as userspace MMIO exits. QueueNotify is the
hot one: `attach()` puts a `Doorbell` on it for each queue (an ioeventfd with datamatch = the
queue index), so a guest's notification is an eventfd signal served by the machine's epoll
worker, never an exit; a notification the doorbells do not match still arrives through the bus.
Used buffers are announced through an irqfd `Interrupt` when the machine has the in-kernel
irqchip. `stats` counts which way every notification went.

A driver that breaks the rules (bad ring addresses, bad chains) gets DEVICE_NEEDS_RESET in
Status and a configuration-change interrupt; the queues stop until it resets the device.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import Counter
from collections.abc import Callable

from .device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, VirtioDevice
from .queue import GuestRam, Virtqueue, VirtqueueError

log = logging.getLogger("pyvmm.virtio")

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D565950  # "PYVM"
#: Bytes of register space one device takes (registers below 0x100, configuration above).
WINDOW = 0x200

# Register offsets.
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (section 2.1).
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 64
S_FAILED = 128

# InterruptStatus bits.
INT_VRING = 1
INT_CONFIG = 2

#: Errors kept per transport (all are counted): a hostile driver cannot grow host memory.
MAX_KEPT_ERRORS = 16

_ADDRESS_REGS = {
    QUEUE_DESC_LOW: ("desc_addr", 0), QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("driver_addr", 0), QUEUE_DRIVER_HIGH: ("driver_addr", 32),
    QUEUE_DEVICE_LOW: ("device_addr", 0), QUEUE_DEVICE_HIGH: ("device_addr", 32),
}


class MmioTransport:
    """One virtio device behind a virtio-mmio register window. `memory` is the VM's guest
    memory; `interrupt` (optional) raises the device's interrupt line (an irqfd trigger)."""

    def __init__(self, device: VirtioDevice, memory, *,
                 interrupt: Callable[[], None] | None = None) -> None:
        if not isinstance(device, VirtioDevice):
            raise TypeError(f"{device!r} is not a VirtioDevice")
        self.device = device
        self.ram = GuestRam(memory)
        self.interrupt = interrupt
        self.queues = [Virtqueue(i, self.ram, size) for i, size in enumerate(device.queue_sizes)]
        self.offered = device.features | F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC
        self.stats: Counter = Counter()
        self.errors: list[BaseException] = []
        self.error_count = 0
        self.lock = threading.RLock()
        device.transport = self
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.shm_sel = 0
        for q in self.queues:
            q.reset()
            q.event_idx = q.indirect_ok = False

    @property
    def broken(self) -> bool:
        """True once DEVICE_NEEDS_RESET is set: nothing is served until a reset."""
        return bool(self.status & S_NEEDS_RESET)

    # -- errors and interrupts -------------------------------------------------------------

    def fail(self, err: BaseException) -> None:
        """The driver broke a rule: DEVICE_NEEDS_RESET and a configuration interrupt."""
        self.error_count += 1
        self.stats["needs_reset"] += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(err)
        if self.error_count == 1:
            log.warning("virtio %s: %s", type(self.device).__name__, err)
        already = self.broken
        self.status |= S_NEEDS_RESET
        if not already and self.status & S_DRIVER_OK:
            self._raise(INT_CONFIG)

    def _raise(self, bits: int) -> None:
        self.interrupt_status |= bits
        if self.interrupt is None:
            self.stats["irq_none"] += 1  # no irqchip: the driver has to poll
            return
        self.stats["irq_irqfd"] += 1
        self.interrupt()

    def config_changed(self) -> None:
        """The device changed its configuration: new generation and an interrupt."""
        with self.lock:
            self.device.config_generation += 1
            if self.status & S_DRIVER_OK:
                self._raise(INT_CONFIG)

    def run_queue(self, index: int, *, via: str | None = None, count: int = 1) -> None:
        """Let the device serve queue `index` now, then interrupt the driver if it asked to
        be told (event-idx or the NO_INTERRUPT flag). Any thread may call it. `via` names
        the notification path that asked ("doorbell" or "mmio"), for `stats`."""
        with self.lock:
            if via is not None:
                self.stats[f"notify_{via}"] += count
            if self.broken or not self.status & S_DRIVER_OK or index >= len(self.queues):
                return
            queue = self.queues[index]
            if not queue.ready:
                return
            try:
                self.device.handle(queue)
                wanted = queue.needs_interrupt()
            except VirtqueueError as err:
                self.fail(err)
                return
            if wanted:
                self._raise(INT_VRING)
            elif queue.pushed:
                self.stats["irq_suppressed"] += 1

    def doorbell_callback(self, index: int) -> Callable:
        """The callback for a `Doorbell` on QueueNotify with datamatch `index`."""
        def ring(_bell, rings: int) -> None:
            self.run_queue(index, via="doorbell", count=rings)
        return ring

    # -- registers ----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            self.stats["mmio_reads"] += 1
            if offset >= CONFIG:
                data = self.device.config()
                chunk = data[offset - CONFIG: offset - CONFIG + size]
                return chunk + bytes(size - len(chunk))
            if size != 4 or offset % 4:
                self.stats["bad_access"] += 1
                return bytes(size)
            return struct.pack("<I", self._read_reg(offset) & 0xFFFFFFFF)

    def _read_reg(self, offset: int) -> int:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (self.offered >> (32 * self.features_sel)) if self.features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return q.num_max if q is not None else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in _ADDRESS_REGS and q is not None:
            name, shift = _ADDRESS_REGS[offset]
            return getattr(q, name) >> shift
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: length -1
        if offset == CONFIG_GENERATION:
            return self.device.config_generation
        return 0

    def write(self, offset: int, data: bytes) -> None:
        if offset == QUEUE_NOTIFY and len(data) == 4:
            self.run_queue(int.from_bytes(data, "little"), via="mmio")
            return
        with self.lock:
            self.stats["mmio_writes"] += 1
            if offset >= CONFIG:
                self.device.config_write(offset - CONFIG, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                self.stats["bad_access"] += 1
                return
            self._write_reg(offset, int.from_bytes(data, "little"))

    def _write_reg(self, offset: int, value: int) -> None:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == DEVICE_FEATURES_SEL:
            self.features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & S_FEATURES_OK:
                shift = 32 * self.driver_features_sel
                self.driver_features = ((self.driver_features & ~(0xFFFFFFFF << shift))
                                        | (value << shift))
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM:
            if q is not None and not q.ready:
                q.num = value
        elif offset == QUEUE_READY:
            self._set_ready(q, value)
        elif offset in _ADDRESS_REGS:
            if q is not None and not q.ready:
                name, shift = _ADDRESS_REGS[offset]
                keep = getattr(q, name) & ~(0xFFFFFFFF << shift)
                setattr(q, name, keep | (value << shift))
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._set_status(value)
        elif offset == SHM_SEL:
            self.shm_sel = value
        else:
            self.stats["bad_access"] += 1

    def _set_ready(self, q: Virtqueue | None, value: int) -> None:
        if q is None:
            return
        if not value:
            q.ready = False
            return
        if q.ready:
            return
        try:
            q.validate()
        except VirtqueueError as err:
            self.fail(err)
            return
        q.ready = True

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.stats["resets"] += 1
            self._reset()
            self.device.reset()
            return
        before = self.status
        if value & S_FEATURES_OK and not before & S_FEATURES_OK:
            accepted = self.driver_features
            if accepted & ~self.offered or not accepted & F_VERSION_1:
                value &= ~S_FEATURES_OK  # the driver reads it back and gives up
            else:
                self.device.negotiated = accepted
                for q in self.queues:
                    q.event_idx = bool(accepted & F_EVENT_IDX)
                    q.indirect_ok = bool(accepted & F_INDIRECT_DESC)
        self.status = value | (before & S_NEEDS_RESET)
        if value & S_DRIVER_OK and not before & S_DRIVER_OK and not self.broken:
            self.device.activate()
            for q in self.queues:
                if q.ready:  # buffers the driver queued before DRIVER_OK
                    self.run_queue(q.index)

    def close(self) -> None:
        self.device.close()


def attach(machine, device: VirtioDevice, base: int, gsi: int, *,
           doorbells: bool = True) -> MmioTransport:
    """Put `device` on `machine` at MMIO `base` (a WINDOW-byte window) with interrupt line
    `gsi`: the register window on the MMIO bus, one doorbell per queue on QueueNotify (unless
    `doorbells` is False: then every notification is an MMIO exit), and an irqfd on `gsi`
    when the machine has the in-kernel irqchip. The kernel finds it through
    `cmdline(base, gsi)` on its command line."""
    from ..ioevent import IoEventAddress

    irq = machine.interrupt(gsi) if machine.irqchip else None
    transport = MmioTransport(device, machine.memory,
                              interrupt=irq.trigger if irq is not None else None)
    machine.mmio.register(base, WINDOW, transport)
    if doorbells:
        for q in transport.queues:
            machine.doorbell(IoEventAddress.mmio(base + QUEUE_NOTIFY), length=4,
                             datamatch=q.index, callback=transport.doorbell_callback(q.index))
    return transport


def cmdline(base: int, gsi: int) -> str:
    """The kernel parameter that announces a virtio-mmio device at `base` with IRQ `gsi`."""
    return f"virtio_mmio.device={WINDOW}@{base:#x}:{gsi}"
