# SPDX-License-Identifier: GPL-2.0-or-later
"""Do per-vCPU fds scale? Doorbell rings per second with one vCPU, and with two vCPUs ringing
two separate doorbells (two ports, two ioeventfds, two eventfds) at the same time, each vCPU
in its own thread on its own fd. The guest is the doorbell harness (guests/doorbell.inc) at
CPL3, natively executed on kvm_pvm, and at CPL0, emulated; the host starts both vCPUs
(`Machine.load(..., start_aps=True)`).

Time per ring across the machine: with two vCPUs each rings half of the loops, so perfect
scaling halves the time per ring (a speed-up of 2.0 over the one-vCPU case; the host needs
two free CPUs for that). Pure pyvmm: there is no C side.

    python bench/bench_smp.py -o smp.json [--fast] [--cases 'smp.*.cpl3']
"""

from __future__ import annotations

from benchlib import Case, doorbell, lazy, main, perf_counter

#: Ports of the per-vCPU doorbells (vCPU i rings SMP_PORT + i).
SMP_PORT = 0x600
#: Two vCPUs must ring at least this much faster than one (time per ring, both at once).
SCALING_TARGET = 1.6
RUN_TIMEOUT = 120.0
MODES = ("cpl0", "cpl3")
MODE_TITLE = {"cpl0": "CPL0", "cpl3": "CPL3"}


class SmpDoorbells:
    """A Machine with `n` vCPUs, each set up by the host to ring its own PIO doorbell with
    4-byte writes; `reset(counts)` restarts every vCPU's guest (outside the timed region)."""

    def __init__(self, mode: str, n: int) -> None:
        from pyvmm import IoEventAddress, Kvm, Machine, guests

        scenario = doorbell(mode, mmio=False, width=4)
        self.kvm = Kvm()
        self.machine = Machine(kvm=self.kvm, vcpus=n, serial=False)
        self.payload = guests.build(scenario.payload)
        self.bells = [self.machine.doorbell(IoEventAddress.pio(SMP_PORT + i), length=4)
                      for i in range(n)]
        self.machine.load(self.payload, regs=scenario.reg_dict(0), start_aps=True,
                          vcpu_regs=lambda i: {"r8": SMP_PORT + i})
        self.state = [(v.get_sregs(), v.get_regs()) for v in self.machine.vcpus]

    def reset(self, counts: list[int]) -> None:
        self.machine.vm.memory.write(self.payload.load_address, self.payload.image)
        for vcpu, (sregs, regs), count in zip(self.machine.vcpus, self.state, counts,
                                              strict=True):
            vcpu.set_sregs(sregs)
            regs = regs.copy()
            regs.rcx = count
            vcpu.set_regs(regs)

    def close(self) -> None:
        self.machine.close()
        self.kvm.close()


def rings(mode: str, n: int):
    """Time for `loops` rings in all, split evenly over `n` vCPUs ringing at the same time."""
    import atexit

    smp = SmpDoorbells(mode, n)
    atexit.register(smp.close)

    def time_func(loops: int) -> float:
        counts = [loops // n + (1 if i < loops % n else 0) for i in range(n)]
        smp.reset(counts)
        before = [b.count for b in smp.bells]
        start = perf_counter()
        result = smp.machine.run(timeout=RUN_TIMEOUT)
        elapsed = perf_counter() - start
        if not result.ok:
            raise RuntimeError(f"smp doorbells did not finish:\n{result}")
        got = [b.count - c for b, c in zip(smp.bells, before, strict=True)]
        if got != counts:
            raise RuntimeError(f"rings counted {got}, expected {counts}")
        return elapsed

    return time_func


CASES = []
for _mode in MODES:
    _title = MODE_TITLE[_mode]
    CASES += [
        Case(f"smp.1vcpu.{_mode}", "smp", f"doorbell rings, 1 vCPU ({_title})",
             lazy(lambda m=_mode: rings(m, 1)), unit="ring"),
        Case(f"smp.2vcpus.{_mode}", "smp",
             f"doorbell rings, 2 vCPUs on separate doorbells at once ({_title})",
             lazy(lambda m=_mode: rings(m, 2)), unit="ring",
             target=f"speedup>={SCALING_TARGET}:smp.1vcpu.{_mode}"),
    ]

if __name__ == "__main__":
    main(CASES)
