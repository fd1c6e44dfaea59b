# SPDX-License-Identifier: GPL-2.0-or-later
"""Exit paths, the seed's table: one doorbell ring through a userspace PIO or MMIO exit (served
through pyvmm's Machine and bus by a Counter device, or by a bare `Vcpu.run()` loop) or through
an ioeventfd (the kernel signals an eventfd; no userspace exit), with the guest at CPL0 and at
CPL3. Time per ring, pyvmm against the C reference running the same guest.

    python bench/bench_exits.py -o exits.json [--fast] [--cases 'exit.pio.*']
"""

from __future__ import annotations

from benchlib import (
    DOORBELL_MMIO,
    DOORBELL_PORT,
    Case,
    LoadedMachine,
    counted_machine,
    serve_rings,
    doorbell,
    lazy,
    main,
    perf_counter,
)

#: ioeventfd doorbells must beat the userspace exit path by this much (issue 8).
SPEEDUP_TARGET = {"pio": 3.5, "mmio": 3.0}
#: pyvmm's userspace exit within this factor of C.
EXIT_TARGET = 1.08
MODES = ("cpl0", "cpl3")
MODE_TITLE = {"cpl0": "CPL0", "cpl3": "CPL3"}


def machine_exit(mode: str, path: str):
    """Userspace exits dispatched by Machine's run loop to a Counter on the PIO/MMIO bus."""
    lm, device = counted_machine(mode, path)

    def time_func(loops: int) -> float:
        lm.reset(loops)
        before = device.count
        start = perf_counter()
        lm.run()
        elapsed = perf_counter() - start
        if device.count - before != loops:
            raise RuntimeError(f"counted {device.count - before} rings for {loops}")
        return elapsed

    return time_func


def run_loop_exit(mode: str, path: str):
    """The same exits through `Vcpu.run()` alone: the loop cref.c runs, written in Python."""
    lm = LoadedMachine(doorbell(mode, path == "mmio"))
    vcpu = lm.vcpu
    mmio = path == "mmio"

    def time_func(loops: int) -> float:
        lm.reset(loops)
        start = perf_counter()
        rings, _exits, last = serve_rings(vcpu, mmio)
        elapsed = perf_counter() - start
        if rings != loops or (loops and not last):
            raise RuntimeError(f"counted {rings} rings for {loops}")
        return elapsed

    return time_func


def ioeventfd(mode: str, path: str):
    """An ioeventfd doorbell (counting in its eventfd): the guest loop never leaves the kernel."""
    from pyvmm import IoEventAddress

    lm = LoadedMachine(doorbell(mode, path == "mmio"))
    address = (IoEventAddress.mmio(DOORBELL_MMIO) if path == "mmio"
               else IoEventAddress.pio(DOORBELL_PORT))
    bell = lm.machine.doorbell(address, length=4)

    def time_func(loops: int) -> float:
        lm.reset(loops)
        before = bell.count
        start = perf_counter()
        lm.run()
        elapsed = perf_counter() - start
        if bell.count - before != loops:
            raise RuntimeError(f"counted {bell.count - before} rings for {loops}")
        return elapsed

    return time_func


def cases() -> list[Case]:
    out = []
    for mode in MODES:
        for path in ("mmio", "pio"):
            scenario = doorbell(mode, path == "mmio")
            up = path.upper()
            out.append(Case(
                f"exit.{path}.{mode}.machine", f"exits-{mode}",
                f"userspace {up} exit, Machine + bus ({MODE_TITLE[mode]})",
                lazy(lambda m=mode, p=path: machine_exit(m, p)), scenario, f"exit-{path}",
                target=f"ratio<={EXIT_TARGET}", unit="ring"))
            out.append(Case(
                f"exit.{path}.{mode}.run", f"exits-{mode}",
                f"userspace {up} exit, Vcpu.run() alone ({MODE_TITLE[mode]})",
                lazy(lambda m=mode, p=path: run_loop_exit(m, p)), scenario, f"exit-{path}",
                target=f"ratio<={EXIT_TARGET}", unit="ring"))
            out.append(Case(
                f"ioevent.{path}.{mode}", f"exits-{mode}",
                f"ioeventfd {up} ({MODE_TITLE[mode]})",
                lazy(lambda m=mode, p=path: ioeventfd(m, p)), scenario, f"ioevent-{path}",
                target=f"speedup>={SPEEDUP_TARGET[path]}:exit.{path}.{mode}.machine",
                unit="ring"))
    return out


CASES = cases()

if __name__ == "__main__":
    main(CASES)
