"""1,000 create/run/close cycles of a machine with memory, vCPUs, doorbells and interrupts:
open fds, threads and RSS come back to where they started."""

from __future__ import annotations

import gc
import os
import threading

import psutil

from pyvmm import IoEventAddress, Machine, guests

CYCLES = int(os.environ.get("PYVMM_LEAK_CYCLES", "1000"))


def cycle(kvm, payload) -> None:
    with Machine(kvm=kvm, vcpus=2, irqchip=True) as m:
        irq = m.interrupt(5)
        m.doorbell(IoEventAddress.pio(0x510), length=1)
        m.doorbell(IoEventAddress.mmio(0xD000_0000), length=4,
                   callback=lambda bell, n: irq.trigger())
        m.load(payload)
        result = m.run(timeout=10, vcpus=[0])
        assert result.ok, result


def test_create_run_close_cycles_leak_nothing(kvm):
    payload = guests.build("hello")
    proc = psutil.Process()
    for _ in range(20):  # warm-up: caches, the watchdog thread, allocator arenas
        cycle(kvm, payload)
    gc.collect()
    fds, threads, rss = proc.num_fds(), threading.active_count(), proc.memory_info().rss
    for _ in range(CYCLES):
        cycle(kvm, payload)
    gc.collect()
    assert proc.num_fds() == fds
    assert threading.active_count() == threads
    grown = proc.memory_info().rss - rss
    # Each cycle maps 2 MiB of guest RAM and 2 vCPU pages: a leak of any of them over 1,000
    # cycles would be far above this bound.
    assert grown < 16 << 20, f"RSS grew by {grown >> 10} KiB over {CYCLES} cycles"
