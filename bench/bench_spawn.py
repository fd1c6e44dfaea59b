# SPDX-License-Identifier: GPL-2.0-or-later
"""Micro-VM spawn: create a VM, its memslot and vCPU, load the doorbell payload (0 rings: it
reports and finishes), run it to its end, close everything. Through the Vm/Vcpu API and
through Machine; cref.c does the same ioctls. Time per spawn; /dev/kvm stays open.

    python bench/bench_spawn.py -o spawn.json [--fast]
"""

from __future__ import annotations

from benchlib import PORT_DONE, Case, doorbell, lazy, main, payload, perf_counter

SPAWN_TARGET = 1.5
SCENARIO = doorbell("cpl0", False)


def vm_api():
    from pyvmm import Kvm
    from pyvmm.exits import IoExit

    kvm = Kvm()
    p = payload(SCENARIO.payload)
    regs = SCENARIO.reg_dict(0)

    def time_func(loops: int) -> float:
        start = perf_counter()
        for _ in range(loops):
            with kvm.create_vm() as vm:
                vcpu = p.prepare(vm, regs=regs)  # the Kvm's cached CPUID
                while True:
                    ex = vcpu.run()
                    if type(ex) is IoExit and ex.port == PORT_DONE:
                        if ex.value != 0:
                            raise RuntimeError(f"status {ex.value}")
                        break
                    if type(ex) is not IoExit:
                        raise RuntimeError(f"unexpected {ex}")
        return perf_counter() - start

    return time_func


def machine():
    from pyvmm import Kvm, Machine

    kvm = Kvm()
    p = payload(SCENARIO.payload)
    regs = SCENARIO.reg_dict(0)

    def time_func(loops: int) -> float:
        start = perf_counter()
        for _ in range(loops):
            with Machine(kvm=kvm, serial=False) as m:
                m.load(p, regs=regs)
                result = m.run(timeout=10)
                if not result.ok:
                    raise RuntimeError(str(result))
        return perf_counter() - start

    return time_func


CASES = [
    Case("spawn.vm", "spawn", "micro-VM spawn, Vm/Vcpu API (CPL0 payload)", lazy(vm_api),
         SCENARIO, "spawn", target=f"ratio<={SPAWN_TARGET}", unit="spawn"),
    Case("spawn.machine", "spawn", "micro-VM spawn, Machine (CPL0 payload)", lazy(machine),
         SCENARIO, "spawn", target=f"ratio<={SPAWN_TARGET}", unit="spawn"),
]

if __name__ == "__main__":
    main(CASES)
