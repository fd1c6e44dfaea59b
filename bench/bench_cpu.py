# SPDX-License-Identifier: GPL-2.0-or-later
"""CPU per exit: what pyvmm's own code costs on each userspace exit, beside the C reference.

On this host a KVM_RUN round trip is mostly kernel time (kvm_pvm emulates CPL0 code), so wall
time per exit hides pyvmm's share; the user CPU time per exit is the honest figure of what
Python adds (on a host with hardware virtualisation, where an exit costs 1-2 us, that share is
what a user pays). Every exit path is measured on the same doorbell guests as bench_exits.py:

- C: bench/cref.c's bare KVM_RUN loop (it reports its own getrusage times),
- run: a `Vcpu.run()` loop in Python counting the rings,
- machine: `Machine.run()` with a Counter device on the PIO or MMIO bus,

for PIO and MMIO, at CPL0 and CPL3. Two outputs:

- pyperf rows `cpu.<path>.<mode>.<side>` (in `pyvmm bench`): pyvmm's user CPU per exit, with
  the goal as target (Vcpu.run() <= 1.0 us, Machine <= 1.5 us);
- `--paired JSON` / `--table`: every side measured in turn in one process, several rounds
  (the same machine load for all), printing user, system and wall time per exit and the ratios
  to C, and writing the user-CPU ratios for the table's "paired" column.

    python bench/bench_cpu.py --table [--rounds 5] [--exits 20000]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from benchlib import (
    Case,
    CRef,
    LoadedMachine,
    counted_machine,
    serve_rings,
    doorbell,
    dump_state,
    lazy,
    main,
    tmpdir,
)

MODES = ("cpl0", "cpl3")
PATHS = ("pio", "mmio")
SIDES = ("run", "machine")
TITLE = {"run": "Vcpu.run() loop", "machine": "Machine + bus device"}
#: The goal, user CPU seconds per exit (issue 18).
USER_GOAL = {"run": 1.0e-6, "machine": 1.5e-6}

#: A measurement: (wall, user, system) seconds and the exits they cover.
Times = tuple[float, float, float, int]


def cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process: getrusage, as cref.c reads its own (with
    microsecond resolution, where os.times() counts 10 ms clock ticks)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def run_side(mode: str, path: str) -> Callable[[int], Times]:
    """`loops` rings through a bare `Vcpu.run()` loop (the loop cref.c runs, in Python)."""
    lm = LoadedMachine(doorbell(mode, path == "mmio"))
    vcpu, mmio = lm.vcpu, path == "mmio"

    def measure(loops: int) -> Times:
        lm.reset(loops)
        u0, s0 = cpu()
        w0 = _clock()
        rings, exits, last = serve_rings(vcpu, mmio)
        w1 = _clock()
        u1, s1 = cpu()
        if rings != loops or (loops and not last):
            raise RuntimeError(f"counted {rings} rings for {loops}")
        return w1 - w0, u1 - u0, s1 - s0, exits

    return measure


def machine_side(mode: str, path: str) -> Callable[[int], Times]:
    """`loops` rings served by `Machine.run()` and a Counter on the bus."""
    lm, device = counted_machine(mode, path)

    def measure(loops: int) -> Times:
        lm.reset(loops)
        before = device.count
        u0, s0 = cpu()
        w0 = _clock()
        result = lm.run()
        w1 = _clock()
        u1, s1 = cpu()
        if device.count - before != loops:
            raise RuntimeError(f"counted {device.count - before} rings for {loops}")
        return w1 - w0, u1 - u0, s1 - s0, sum(result.exits.values())

    return measure


def c_side(mode: str, path: str) -> Callable[[int], Times]:
    """The same rings through cref.c, which reports its own wall and CPU times."""
    state = dump_state(doorbell(mode, path == "mmio"),
                       tmpdir() / f"cpu-{os.getpid()}-{mode}-{path}.bin")
    ref = CRef(f"exit-{path}", state)

    def measure(loops: int) -> Times:
        wall, rings, exits, user, system = ref.run_cpu(loops)
        if rings != loops:
            raise RuntimeError(f"cref counted {rings} rings for {loops}")
        return wall, user, system, exits

    return measure


SIDE_FACTORY = {"run": run_side, "machine": machine_side, "C": c_side}


def _clock() -> float:
    import time

    return time.perf_counter()


def user_timer(side: str, mode: str, path: str) -> Callable[[int], float]:
    """A pyperf time function: the user CPU seconds of `loops` exits (per exit, not per ring,
    so the few ucall exits of a run are counted as the exits they are)."""
    def factory() -> Callable[[int], float]:
        measure = SIDE_FACTORY[side](mode, path)

        def time_func(loops: int) -> float:
            _wall, user, _sys, exits = measure(loops)
            return user * loops / max(exits, 1)

        return time_func

    return lazy(factory)


def cases() -> list[Case]:
    out = []
    for mode in MODES:
        for path in PATHS:
            for side in SIDES:
                out.append(Case(
                    f"cpu.{path}.{mode}.{side}", f"cpu-{mode}",
                    f"user CPU per {path.upper()} exit, {TITLE[side]} ({mode.upper()})",
                    user_timer(side, mode, path),
                    # at CPL3 the guest's own (native) time is user time too: no bound there
                    target=f"max<={USER_GOAL[side]:g}" if mode == "cpl0" else "",
                    unit="exit"))
    return out


CASES = cases()


def interleaved(rounds: int, exits: int, combos: list[tuple[str, str]]) -> dict[str, dict]:
    """Every side of every (mode, path) measured in turn, `rounds` times: the median user,
    system and wall seconds per exit of each, with the per-round ratios to C."""
    sides = {}
    for mode, path in combos:
        for side in ("C", *SIDES):
            measure = SIDE_FACTORY[side](mode, path)
            measure(100)  # warm: the first run of a VM faults its pages in
            sides[(mode, path, side)] = measure
    samples: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {
        key: [] for key in sides}
    for _ in range(rounds):
        for key, measure in sides.items():
            wall, user, system, n = measure(exits)
            samples[key].append((wall / n, user / n, system / n))
    out: dict[str, dict] = {}
    for (mode, path, side), values in samples.items():
        c = samples[(mode, path, "C")]
        entry = {f"{what}": [v[i] for v in values] for i, what in enumerate(("wall", "user",
                                                                             "sys"))}
        entry["wall_ratios"] = [a[0] / b[0] for a, b in zip(values, c, strict=True)]
        out[f"{mode}.{path}.{side}"] = entry
    return out


def format_interleaved(data: dict[str, dict]) -> str:
    med = statistics.median
    head = (f"{'path':<22} {'user/exit':>10} {'sys/exit':>10} {'wall/exit':>10} "
            f"{'wall/C':>7} {'user-C':>8}  goal")
    lines = [head, "-" * len(head)]
    for key, entry in data.items():
        mode, path, side = key.split(".")
        c = data[f"{mode}.{path}.C"]
        user, c_user = med(entry["user"]), med(c["user"])
        goal = ""
        if side in USER_GOAL:
            met = user - c_user <= USER_GOAL[side]
            goal = f"user-C <= {USER_GOAL[side] * 1e6:.1f} us: {'met' if met else 'MISSED'}"
            if mode == "cpl0":
                ok = med(entry["wall_ratios"]) <= 1.08
                goal += f"; wall <= 1.08x C: {'met' if ok else 'MISSED'}"
        name = f"{mode} {path} {side}"
        lines.append(f"{name:<22} {user * 1e6:>7.2f} us {med(entry['sys']) * 1e6:>7.2f} us "
                     f"{med(entry['wall']) * 1e6:>7.2f} us {med(entry['wall_ratios']):>6.2f}x "
                     f"{(user - c_user) * 1e6:>+5.2f} us  {goal}")
    return "\n".join(lines)


def _arg(name: str, default: int) -> int:
    if name in sys.argv:
        return int(sys.argv[sys.argv.index(name) + 1])
    return default


def paired_main(target: Path | None) -> None:
    """`--paired JSON` (what `pyvmm bench` runs) or `--table`: the interleaved measurement."""
    import fnmatch

    globs = [g for g in (sys.argv[sys.argv.index("--cases") + 1].split(",")
                         if "--cases" in sys.argv else []) if g]
    combos = [(m, p) for m in MODES for p in PATHS
              if not globs or any(fnmatch.fnmatch(f"cpu.{p}.{m}.{side}", g)
                                  for g in globs for side in SIDES)]
    if not combos:   # `pyvmm bench --cases` selected none of these rows
        if target is not None:
            target.unlink(missing_ok=True)
        return
    data = interleaved(_arg("--rounds", 5), _arg("--exits", 20000), combos)
    print(f"load average {os.getloadavg()[0]:.1f}; medians of interleaved rounds; user-C is "
          "pyvmm's user CPU per exit minus C's\n(at CPL3 the guest runs natively and its own "
          "time counts as user time: there user-C is pyvmm's share)")
    print(format_interleaved(data))
    if target is not None:
        rows = {}
        for mode, path in combos:
            c = data[f"{mode}.{path}.C"]
            for side in SIDES:
                entry = data[f"{mode}.{path}.{side}"]
                ratios = [a / max(b, 1e-9) for a, b in zip(entry["user"], c["user"],
                                                           strict=True)]
                rows[f"cpu.{path}.{mode}.{side}"] = {"pyvmm": entry["user"], "c": c["user"],
                                                     "ratios": ratios, "detail": entry}
        target.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if "--table" in sys.argv:
        paired_main(None)
    elif "--paired" in sys.argv:
        paired_main(Path(sys.argv[sys.argv.index("--paired") + 1]))
    else:
        main(CASES)
