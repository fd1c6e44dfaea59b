# SPDX-License-Identifier: GPL-2.0-or-later
"""Doorbells and interrupts over their whole life: the worker as the one reader (flush()),
one-shot bells that remove themselves, dropped objects releasing their fds, thread and RAM,
and the configurations that could never work refused up front."""

from __future__ import annotations

import enum
import errno
import os
import threading
import time
import weakref

import pytest

from pyvmm import IoEventAddress, KvmError, Machine
from pyvmm.devices import Counter, Doorbell, DoorbellWorker, Interrupt
from pyvmm.devices.interrupt import default_gsis
from pyvmm.devices.limits import KVM_MAX_IRQ_ROUTES
from resources import open_fds, settle

PORT, OTHER = 0x510, 0x600
MMIO = 0xD0000000


def regs(rings: int, port: int = PORT) -> dict[str, int]:
    return {"rcx": rings, "rdi": 0, "r10": 1, "rsi": 0x5A, "r8": port, "r9": MMIO}


# ------------------------------------------------------------------- one reader, flush()

def test_flush_waits_for_every_signalled_ring_to_reach_its_callback(kvm):
    seen = []
    started = threading.Event()

    def slow(bell, n):
        started.set()
        time.sleep(0.01)  # a device that takes its time: flush() must wait for it
        seen.append(n)

    with Machine(kvm=kvm, serial=False) as m:
        bell = m.doorbell(IoEventAddress.pio(PORT), length=1, callback=slow)
        m.load("doorbell", regs=regs(200))
        assert m.run(timeout=30).ok
        # run() flushed: every ring the guest made has been delivered, exactly once.
        assert sum(seen) == 200 == bell.count
        assert started.is_set()
        assert bell.flush(timeout=5) and m.worker.flush(timeout=5)
        assert sum(seen) == 200


def test_counting_only_doorbell_is_exact_at_any_time_without_a_thread(kvm):
    threads = threading.active_count()
    with Machine(kvm=kvm, serial=False) as m:
        bell = m.doorbell(IoEventAddress.pio(PORT), length=1)
        assert bell.worker is None
        m.load("doorbell", regs=regs(300))
        assert m.run(timeout=30).ok
        assert bell.count == 300            # read straight from the eventfd
        assert threading.active_count() == threads


def test_a_callback_needs_a_worker(vm):
    with pytest.raises(ValueError, match="needs a DoorbellWorker"):
        Doorbell(vm, IoEventAddress.pio(PORT), callback=lambda bell, n: None)


# ------------------------------------------------------------ one-shot bells (issue 13.5)

def test_a_callback_that_removes_its_own_doorbell_does_not_deadlock(kvm):
    fired = []

    def once(bell, n):
        fired.append(n)
        bell.remove()

    with Machine(kvm=kvm, serial=False) as m:
        counter = Counter()
        m.pio.register(PORT, 1, counter)
        oneshot = m.doorbell(IoEventAddress.pio(PORT), length=1, callback=once)
        got = []
        other = m.doorbell(IoEventAddress.pio(OTHER), length=1,
                           callback=lambda bell, n: got.append(n))
        m.load("doorbell", regs=regs(50))
        result = m.run(timeout=10)
        assert result.ok, result
        assert oneshot.closed and oneshot.fileno() == -1
        # Every ring counted once: by the bell until it removed itself, by the bus after.
        assert oneshot.count + counter.count == 50 and sum(fired) == oneshot.count >= 1
        # The worker still serves the other doorbell.
        m.load("doorbell", regs=regs(7, OTHER))
        assert m.run(timeout=10).ok
        assert other.count == 7 == sum(got)


def test_close_closes_the_vm_when_a_doorbell_was_deassigned_behind_its_back(kvm):
    fds = open_fds()
    m = Machine(kvm=kvm, serial=False)
    bell = m.doorbell(IoEventAddress.pio(PORT), length=1, callback=lambda b, n: None)
    plain = m.doorbell(IoEventAddress.pio(OTHER), length=2)
    for b in (bell, plain):
        m.vm.unregister_ioevent(b.fileno(), b.address, length=b.length)
    m.close()                          # the deassign gets ENOENT: already done, not an error
    assert m.vm.closed and bell.closed and plain.closed
    assert open_fds() == fds


# --------------------------------------------------------- dropped objects (issue 13.8)

def test_a_dropped_doorbell_releases_its_eventfd_and_registration(vm):
    fds = open_fds()
    Doorbell(vm, IoEventAddress.pio(PORT), length=1)   # dropped at once
    worker = DoorbellWorker()
    Doorbell(vm, IoEventAddress.pio(OTHER), length=1, callback=lambda b, n: None,
             worker=worker)
    assert settle(lambda: open_fds() == fds + 2)          # the worker's epoll and wake fds
    # Their ioeventfds were deassigned too: the same addresses register again.
    again = [Doorbell(vm, IoEventAddress.pio(p), length=1) for p in (PORT, OTHER)]
    for bell in again:
        bell.remove()
    worker.close()
    assert open_fds() == fds


def test_a_dropped_interrupt_releases_its_eventfd(kvm):
    with Machine(kvm=kvm, irqchip=True, serial=False) as m:
        fds = open_fds()
        Interrupt(m.vm, 5)
        assert settle(lambda: open_fds() == fds)
        irq = Interrupt(m.vm, 5)
        irq.trigger()
        irq.close()
        assert open_fds() == fds


def test_a_machine_dropped_without_close_releases_fds_thread_and_ram(kvm):
    fds = open_fds()
    threads = threading.active_count()

    def make() -> tuple[weakref.ref, weakref.ref]:
        m = Machine(kvm=kvm, irqchip=True, serial=False)
        m.add_memory(0, 2 << 20)
        irq = m.interrupt(5)
        # The callback holds the machine (a cycle), as real devices do.
        m.doorbell(IoEventAddress.pio(PORT), length=1,
                   callback=lambda bell, n: (irq.trigger(), m.stop("done")))
        m.doorbell(IoEventAddress.pio(OTHER), length=1)
        assert m.worker.running
        return weakref.ref(m), weakref.ref(m.vm.memory.find(0))

    machine_ref, region_ref = make()
    assert settle(lambda: machine_ref() is None and region_ref() is None)
    assert settle(lambda: threading.active_count() == threads)
    assert settle(lambda: open_fds() == fds), os.listdir("/proc/self/fd")


# ------------------------------------------------------- silent misconfigurations (13.9)

def test_a_doorbell_over_guest_ram_is_refused(kvm):
    with Machine(kvm=kvm, serial=False) as m:
        m.add_memory(0, 2 << 20)
        fds = open_fds()
        for addr, length in ((0x1000, 4), (0x1FFFFF, 2), (0x0, 0)):
            with pytest.raises(ValueError, match="guest RAM"):
                m.doorbell(IoEventAddress.mmio(addr), length=length)
        assert open_fds() == fds and not m.doorbells
        bell = m.doorbell(IoEventAddress.mmio(2 << 20), length=4)   # just past the RAM
        with pytest.raises(ValueError, match="guest RAM"):
            bell.move(IoEventAddress.mmio(0x3000))
        assert bell.address == IoEventAddress.mmio(2 << 20)
        m.doorbell(IoEventAddress.pio(0x1000), length=1)   # a port is never RAM


class Pin(enum.IntEnum):
    TIMER = 5


class Index:
    """Anything operator.index takes is an integer (numpy integers are)."""

    def __index__(self) -> int:
        return 6


def test_interrupts_that_could_never_reach_the_guest_are_refused(kvm):
    with Machine(kvm=kvm, irqchip=True, serial=False) as m:
        fds = open_fds()
        for gsi in (KVM_MAX_IRQ_ROUTES, 2**31, 2**32, -1):
            with pytest.raises(ValueError, match="could never reach"):
                m.interrupt(gsi)
        with pytest.raises(ValueError, match="bool"):
            m.interrupt(True)
        with pytest.raises(ValueError, match="not an integer"):
            m.interrupt("5")
        with pytest.raises(ValueError, match="no route"):
            Interrupt(m.vm, 30, routed=default_gsis())
        assert open_fds() == fds
        # The bound is KVM's: its routing table takes no GSI at KVM_MAX_IRQ_ROUTES.
        with pytest.raises(KvmError) as info:
            m.vm.set_gsi_routing([("irqchip", KVM_MAX_IRQ_ROUTES, 2, 0)])
        assert info.value.errno == errno.EINVAL
        assert [m.interrupt(g).gsi for g in (Pin.TIMER, Index())] == [5, 6]
        assert Interrupt(m.vm, KVM_MAX_IRQ_ROUTES - 1).gsi == KVM_MAX_IRQ_ROUTES - 1


def test_gsi_routing_refuses_what_it_does_not_route(kvm):
    from pyvmm.devices.interrupt import GsiRouting

    with Machine(kvm=kvm, irqchip=True, serial=False) as m:
        routing = GsiRouting(m.vm)
        assert routing.interrupt(23).gsi == 23
        with pytest.raises(ValueError, match="no route"):
            routing.interrupt(24)                      # no MSI route yet
        irq = routing.msi_interrupt(0x40)
        assert irq.gsi == 24 and 24 in routing
        irq.trigger()
        assert routing.interrupt(24).gsi == 24       # routed now
        with pytest.raises(ValueError, match="no route"):
            routing.interrupt(25)
        with pytest.raises(ValueError, match="16..255"):
            routing.msi_interrupt(3)
        assert list(routing) == [*range(24), 24]


def test_a_dropped_machine_whose_callback_failed_is_still_released(kvm, caplog):
    """Found by the API fuzzer's long run: the worker's log record of a callback error held
    the exception, whose traceback held the doorbell, its worker and so the thread and the
    VM. Log records (kept by any handler, pytest's here) now hold only text."""
    fds = open_fds()
    threads = threading.active_count()

    def make() -> weakref.ref:
        m = Machine(kvm=kvm, serial=False)

        def broken(bell, n):
            raise RuntimeError("device bug")

        bell = m.doorbell(IoEventAddress.pio(PORT), length=1, callback=broken)
        os.eventfd_write(bell.fileno(), 1)   # what KVM does when the guest rings
        assert bell.flush(timeout=10) and bell.error_count == 1
        return weakref.ref(m.vm)

    vm_ref = make()
    assert "device bug" in caplog.text
    assert settle(lambda: vm_ref() is None)
    assert settle(lambda: threading.active_count() == threads), threading.enumerate()
    assert open_fds() == fds
