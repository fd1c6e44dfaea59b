# SPDX-License-Identifier: GPL-2.0-or-later
"""The virtio-mmio transport against a fake driver written here.

`FakeDriver` plays the guest's virtio driver from the host: it programs the registers through
the machine's MMIO bus (the path a guest's register access takes after its MMIO exit), builds
descriptor tables and driver rings in the real guest memory of a real VM, and notifies either
by signalling the queue's real doorbell eventfd (what KVM does when the guest writes
QueueNotify; the machine's epoll worker serves it) or by a QueueNotify write on the bus.
Interrupts are real irqfd writes on the in-kernel irqchip, counted by the Interrupt.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from pyvmm import Machine
from pyvmm.virtio import Entropy, attach, cmdline
from pyvmm.virtio import mmio as reg
from pyvmm.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from pyvmm.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

BASE = 0xD0000000
GSI = 5
RAM = 0x400000
HEAP = 0x100000  # where the fake driver allocates rings and buffers


class FakeDriver:
    """A virtio driver on the host side of a real VM (see the module docstring)."""

    def __init__(self, machine: Machine, base: int = BASE) -> None:
        self.m = machine
        self.base = base
        self.heap = HEAP
        self.queues: dict[int, dict] = {}
        self.features = 0
        self.rearm = True  # move used_event on after taking used buffers

    # registers, through the bus
    def r32(self, off: int) -> int:
        return int.from_bytes(self.m.mmio.read(self.base + off, 4), "little")

    def w32(self, off: int, value: int) -> None:
        self.m.mmio.write(self.base + off, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def alloc(self, size: int, align: int = 16) -> int:
        self.heap = (self.heap + align - 1) & -align
        addr, self.heap = self.heap, self.heap + size
        assert self.heap <= RAM, "fake driver heap exhausted"
        return addr

    def device_features(self) -> int:
        self.w32(reg.DEVICE_FEATURES_SEL, 0)
        low = self.r32(reg.DEVICE_FEATURES)
        self.w32(reg.DEVICE_FEATURES_SEL, 1)
        return low | self.r32(reg.DEVICE_FEATURES) << 32

    def init(self, features: int | None = None, queues: dict[int, int] | None = None) -> int:
        """Reset, negotiate `features` (default: all offered), set up the queues (index to
        size; default all at max) and set DRIVER_OK. Returns the status read back."""
        self.w32(reg.STATUS, 0)
        self.w32(reg.STATUS, reg.S_ACKNOWLEDGE)
        self.w32(reg.STATUS, reg.S_ACKNOWLEDGE | reg.S_DRIVER)
        offered = self.device_features()
        features = offered if features is None else features
        for sel in (0, 1):
            self.w32(reg.DRIVER_FEATURES_SEL, sel)
            self.w32(reg.DRIVER_FEATURES, features >> (32 * sel))
        self.w32(reg.STATUS, reg.S_ACKNOWLEDGE | reg.S_DRIVER | reg.S_FEATURES_OK)
        if not self.r32(reg.STATUS) & reg.S_FEATURES_OK:
            return self.r32(reg.STATUS)
        self.features = features
        if queues is None:
            queues = {}
            i = 0
            while True:
                self.w32(reg.QUEUE_SEL, i)
                n = self.r32(reg.QUEUE_NUM_MAX)
                if not n:
                    break
                queues[i] = n
                i += 1
        for index, num in queues.items():
            self.setup_queue(index, num)
        self.w32(reg.STATUS, reg.S_ACKNOWLEDGE | reg.S_DRIVER | reg.S_FEATURES_OK
                 | reg.S_DRIVER_OK)
        return self.r32(reg.STATUS)

    def setup_queue(self, index: int, num: int, *, desc=None, driver=None, device=None) -> None:
        desc = self.alloc(16 * num) if desc is None else desc
        driver = self.alloc(6 + 2 * num, 2) if driver is None else driver
        device = self.alloc(6 + 8 * num, 4) if device is None else device
        for addr, size in ((desc, 16 * num), (driver, 6 + 2 * num), (device, 6 + 8 * num)):
            if addr + size <= RAM:
                self.m.memory.write(addr, bytes(size))  # a fresh ring is all zeroes
        self.w32(reg.QUEUE_SEL, index)
        self.w32(reg.QUEUE_NUM, num)
        for low, addr in ((reg.QUEUE_DESC_LOW, desc), (reg.QUEUE_DRIVER_LOW, driver),
                          (reg.QUEUE_DEVICE_LOW, device)):
            self.w32(low, addr)
            self.w32(low + 4, addr >> 32)
        self.w32(reg.QUEUE_READY, 1)
        self.queues[index] = {"num": num, "desc": desc, "driver": driver, "device": device,
                              "next_desc": 0, "avail": 0, "used": 0}

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int,
                   nxt: int) -> None:
        self.m.memory.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, index: int, bufs: list[tuple[bytes | int, bool]], *,
            indirect: bool = False) -> tuple[int, list[int]]:
        """Make a chain available: each buffer is (bytes to put in it, or a length) and
        device-writable or not. Returns (head, buffer addresses)."""
        q = self.queues[index]
        addrs = []
        for content, _writable in bufs:
            size = content if isinstance(content, int) else len(content)
            addr = self.alloc(max(size, 1))
            if not isinstance(content, int):
                self.m.memory.write(addr, content)
            addrs.append(addr)
        table, base = q["desc"], q["next_desc"]
        if indirect:
            table, base = self.alloc(16 * len(bufs)), 0
        for k, ((content, writable), addr) in enumerate(zip(bufs, addrs, strict=True)):
            size = content if isinstance(content, int) else len(content)
            last = k == len(bufs) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            slot = base + k if indirect else (base + k) % q["num"]
            nxt = (slot + 1) % (len(bufs) if indirect else q["num"])
            self.write_desc(table, slot, addr, size, flags, nxt)
        head = q["next_desc"]
        if indirect:
            self.write_desc(q["desc"], head, table, 16 * len(bufs), DESC_F_INDIRECT, 0)
            q["next_desc"] = (head + 1) % q["num"]
        else:
            q["next_desc"] = (head + len(bufs)) % q["num"]
        self.publish(index, head)
        return head, addrs

    def publish(self, index: int, head: int) -> None:
        q = self.queues[index]
        self.m.memory.write(q["driver"] + 4 + 2 * (q["avail"] % q["num"]),
                            struct.pack("<H", head))
        q["avail"] = (q["avail"] + 1) & 0xFFFF
        self.m.memory.write(q["driver"] + 2, struct.pack("<H", q["avail"]))

    def set_used_event(self, index: int, value: int) -> None:
        q = self.queues[index]
        self.m.memory.write(q["driver"] + 4 + 2 * q["num"], struct.pack("<H", value))

    def avail_event(self, index: int) -> int:
        q = self.queues[index]
        return struct.unpack("<H", self.m.memory.read(q["device"] + 4 + 8 * q["num"], 2))[0]

    def doorbell(self, index: int):
        for bell in self.m.doorbells:
            if bell.address.addr == self.base + reg.QUEUE_NOTIFY and bell.datamatch == index:
                return bell
        raise LookupError(f"no doorbell for queue {index}")

    def kick(self, index: int, via: str = "doorbell") -> None:
        if via == "doorbell":
            os.eventfd_write(self.doorbell(index).fileno(), 1)  # as KVM signals it
        else:
            self.w32(reg.QUEUE_NOTIFY, index)

    def used_idx(self, index: int) -> int:
        q = self.queues[index]
        return struct.unpack("<H", self.m.memory.read(q["device"] + 2, 2))[0]

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> list[tuple]:
        """Wait for `count` new used elements; returns them as (id, len)."""
        q = self.queues[index]
        deadline = time.monotonic() + timeout
        while (self.used_idx(index) - q["used"]) & 0xFFFF < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {index}: {count} used buffers did not come")
            time.sleep(0.001)
        out = []
        while q["used"] != self.used_idx(index):
            slot = q["device"] + 4 + 8 * (q["used"] % q["num"])
            out.append(struct.unpack("<II", self.m.memory.read(slot, 8)))
            q["used"] = (q["used"] + 1) & 0xFFFF
        if self.features & F_EVENT_IDX and self.rearm:
            self.set_used_event(index, q["used"])  # as Linux does: "interrupt me at the next"
        return out


def machine_fixture():
    """The `vmachine` fixture (for this module and the other virtio test modules): a Machine
    with the in-kernel irqchip and RAM for the fake driver's rings and buffers."""
    @pytest.fixture
    def vmachine(kvm):
        m = Machine(kvm=kvm, irqchip=True, memory_size=RAM, serial=False)
        try:
            yield m
        finally:
            m.close()
    return vmachine


vmachine = machine_fixture()


def test_register_identity_and_features(vmachine):
    attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    assert d.r32(reg.MAGIC_VALUE) == 0x74726976
    assert d.r32(reg.VERSION_REG) == 2
    assert d.r32(reg.DEVICE_ID) == 4
    offered = d.device_features()
    assert offered & (F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC) == \
        F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC
    d.w32(reg.QUEUE_SEL, 0)
    assert d.r32(reg.QUEUE_NUM_MAX) == 64
    d.w32(reg.QUEUE_SEL, 1)
    assert d.r32(reg.QUEUE_NUM_MAX) == 0  # one queue only
    d.w32(reg.SHM_SEL, 0)
    assert d.r32(reg.SHM_LEN_LOW) == 0xFFFFFFFF  # no shared memory region
    assert cmdline(BASE, GSI) == "virtio_mmio.device=512@0xd0000000:5"


def test_features_without_version_1_are_refused(vmachine):
    attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    status = d.init(features=F_EVENT_IDX)
    assert not status & reg.S_FEATURES_OK
    status = d.init(features=F_VERSION_1 | (1 << 60))  # a bit never offered
    assert not status & reg.S_FEATURES_OK
    assert d.init(features=F_VERSION_1) & reg.S_DRIVER_OK


@pytest.mark.parametrize("via", ["doorbell", "mmio"])
def test_entropy_request_and_irqfd_interrupt(vmachine, via):
    t = attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    assert d.init() & reg.S_DRIVER_OK
    irq = vmachine.interrupts[0]
    head, (addr,) = d.add(0, [(64, True)])
    d.kick(0, via)
    [(used_id, used_len)] = d.wait_used(0)
    assert (used_id, used_len) == (head, 64)
    assert vmachine.memory.read(addr, 64) != bytes(64)  # random bytes arrived
    assert t.stats[f"notify_{via}"] == 1
    assert irq.count == 1 and t.stats["irq_irqfd"] == 1
    assert d.r32(reg.INTERRUPT_STATUS) == reg.INT_VRING
    d.w32(reg.INTERRUPT_ACK, reg.INT_VRING)
    assert d.r32(reg.INTERRUPT_STATUS) == 0


def test_indirect_descriptors(vmachine):
    attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    d.init()
    head, addrs = d.add(0, [(16, True), (48, True)], indirect=True)
    d.kick(0)
    assert d.wait_used(0) == [(head, 64)]
    assert all(vmachine.memory.read(a, 16) != bytes(16) for a in addrs)


def test_indirect_refused_when_not_negotiated(vmachine):
    t = attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    d.init(features=F_VERSION_1)
    d.add(0, [(16, True)], indirect=True)
    d.kick(0, "mmio")
    assert d.r32(reg.STATUS) & reg.S_NEEDS_RESET
    assert "INDIRECT_DESC not negotiated" in str(t.errors[0])


def test_event_idx_suppresses_interrupts_and_publishes_avail_event(vmachine):
    t = attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    d.rearm = False
    d.init()
    irq = vmachine.interrupts[0]
    # used_event = 2: interrupt only once the used index passes 2 (after the third buffer)
    d.set_used_event(0, 2)
    for n in range(3):
        d.add(0, [(8, True)])
        d.kick(0, "mmio")
        d.wait_used(0)
        assert irq.count == (1 if n == 2 else 0), n
        assert d.avail_event(0) == n + 1  # "notify me at the next buffer"
    assert t.stats["irq_suppressed"] == 2


def test_no_interrupt_flag_without_event_idx(vmachine):
    t = attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    d.init(features=F_VERSION_1)
    vmachine.memory.write(d.queues[0]["driver"], struct.pack("<H", 1))  # NO_INTERRUPT
    d.add(0, [(8, True)])
    d.kick(0)
    d.wait_used(0)
    assert vmachine.interrupts[0].count == 0 and t.stats["irq_suppressed"] == 1


def test_queue_ready_with_bad_ring_sets_needs_reset_and_reset_recovers(vmachine):
    t = attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    d.w32(reg.STATUS, 0)
    d.w32(reg.STATUS, reg.S_ACKNOWLEDGE | reg.S_DRIVER)
    d.w32(reg.DRIVER_FEATURES_SEL, 1)
    d.w32(reg.DRIVER_FEATURES, 1)
    d.w32(reg.STATUS, reg.S_ACKNOWLEDGE | reg.S_DRIVER | reg.S_FEATURES_OK)
    d.setup_queue(0, 16, desc=RAM + 0x1000)  # outside guest RAM
    d.w32(reg.QUEUE_SEL, 0)
    assert d.r32(reg.QUEUE_READY) == 0
    assert d.r32(reg.STATUS) & reg.S_NEEDS_RESET
    assert "not RAM" in str(t.errors[0])
    for bad in (dict(num=3), dict(num=128)):  # not a power of 2; above QueueNumMax
        d.w32(reg.STATUS, 0)
        d.w32(reg.QUEUE_SEL, 0)
        d.w32(reg.QUEUE_NUM, bad["num"])
        d.w32(reg.QUEUE_READY, 1)
        assert d.r32(reg.QUEUE_READY) == 0
    assert d.init() & reg.S_DRIVER_OK and not d.r32(reg.STATUS) & reg.S_NEEDS_RESET
    d.add(0, [(8, True)])
    d.kick(0)
    assert len(d.wait_used(0)) == 1


def test_config_generation_and_unaligned_register_access(vmachine):
    t = attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    d.init()
    gen = d.r32(reg.CONFIG_GENERATION)
    t.config_changed()
    assert d.r32(reg.CONFIG_GENERATION) == gen + 1
    assert d.r32(reg.INTERRUPT_STATUS) & reg.INT_CONFIG
    assert vmachine.mmio.read(BASE + 1, 2) == bytes(2)
    vmachine.mmio.write(BASE + reg.STATUS, b"\x00")  # a 1-byte status write is ignored
    assert d.r32(reg.STATUS) & reg.S_DRIVER_OK
    assert t.stats["bad_access"] == 2


def test_reset_while_queued_work_stops_service(vmachine):
    attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    d.init()
    d.w32(reg.STATUS, 0)
    d.add(0, [(8, True)])
    d.kick(0)
    d.kick(0, "mmio")
    time.sleep(0.05)
    assert d.used_idx(0) == 0  # a reset device serves nothing


def test_doorbells_registered_per_queue_and_bus_fallback(vmachine):
    # With doorbells=False every QueueNotify is an MMIO write on the bus.
    t = attach(vmachine, Entropy(), BASE, GSI, doorbells=False)
    assert not vmachine.doorbells
    d = FakeDriver(vmachine)
    d.init()
    d.add(0, [(8, True)])
    d.kick(0, "mmio")
    d.wait_used(0)
    assert t.stats["notify_mmio"] == 1 and t.stats["notify_doorbell"] == 0


def test_without_irqchip_the_driver_polls(kvm):
    with Machine(kvm=kvm, memory_size=RAM, serial=False) as m:
        t = attach(m, Entropy(), BASE, GSI)
        d = FakeDriver(m)
        d.init()
        d.add(0, [(8, True)])
        d.kick(0)
        d.wait_used(0)
        assert t.stats["irq_none"] == 1 and d.r32(reg.INTERRUPT_STATUS) == reg.INT_VRING


class _StopPort:
    """A PIO device whose write ends the run (the guest's "I am done")."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.machine.stop("done")


def test_guest_write_to_queue_notify_is_a_doorbell_not_an_exit(vmachine):
    # A vCPU (not the host) notifies: `mov %eax, 0xd0000050` with EAX = 0 in flat 32-bit
    # mode. KVM matches the ioeventfd (datamatch 0) and signals the eventfd in the kernel;
    # the epoll worker serves the queue and the interrupt goes out through the irqfd.
    from pyvmm.loaders import pvh

    t = attach(vmachine, Entropy(), BASE, GSI)
    d = FakeDriver(vmachine)
    d.init()
    head, _ = d.add(0, [(32, True)])
    code = (b"\x31\xc0"                                     # xor %eax, %eax
            + b"\xa3" + struct.pack("<I", BASE + reg.QUEUE_NOTIFY)  # mov %eax, QueueNotify
            + b"\x66\xba\x00\x05\xef"                       # mov $0x500, %dx; out %eax, (%dx)
            + b"\xf4")                                      # hlt
    vmachine.memory.write(0x10000, code)
    vmachine.memory.write(pvh.GDT_ADDR, pvh.gdt())
    vmachine.vcpus[0].set_supported_cpuid()
    pvh.enter_flat32(vmachine.vcpus[0], 0x10000, ebx=0)
    vmachine.pio.register(0x500, 4, _StopPort(vmachine))
    result = vmachine.run(timeout=20)
    assert result.stop == "done", result.summary()
    assert d.wait_used(0) == [(head, 32)]
    assert t.stats["notify_doorbell"] == 1 and t.stats["notify_mmio"] == 0
    assert "MmioExit" not in result.exits  # the notification never left the kernel
    assert vmachine.interrupts[0].count == 1
