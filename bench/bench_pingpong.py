# SPDX-License-Identifier: GPL-2.0-or-later
"""notify -> interrupt round trips (the pingpong payload): the guest rings an ioeventfd
doorbell, a device answers on an irqfd, the guest's interrupt handler counts it. The device is
pyvmm's (a Doorbell callback on the epoll worker triggering an Interrupt) or cref.c's (an epoll
thread in C). Time per round trip.

    python bench/bench_pingpong.py -o pingpong.json [--fast]
"""

from __future__ import annotations

from benchlib import PINGPONG, PINGPONG_GSI, PINGPONG_PORT, Case, LoadedMachine, lazy, main, \
    perf_counter

RTT_TARGET = 1.5


def python_device():
    from pyvmm import IoEventAddress

    lm = LoadedMachine(PINGPONG)
    irq = lm.machine.interrupt(PINGPONG_GSI)

    def complete(bell, rings: int) -> None:
        for _ in range(rings):
            irq.trigger()

    bell = lm.machine.doorbell(IoEventAddress.pio(PINGPONG_PORT), length=1, callback=complete)

    def time_func(loops: int) -> float:
        lm.reset(loops)
        before = bell.count
        start = perf_counter()
        result = lm.run()
        elapsed = perf_counter() - start
        handled = [r.value for r in result.reports if r.tag == 0x99]
        if handled != [loops] or bell.count - before != loops:
            raise RuntimeError(f"pingpong: {handled} interrupts, {bell.count - before} "
                               f"notifies for {loops} rounds")
        return elapsed

    return time_func


CASES = [
    Case("pingpong", "pingpong", "notify -> interrupt RTT, device in Python vs C (CPL0)",
         lazy(python_device), PINGPONG, "pingpong", target=f"ratio<={RTT_TARGET}",
         unit="round trip"),
]

if __name__ == "__main__":
    main(CASES)
