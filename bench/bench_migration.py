# SPDX-License-Identifier: GPL-2.0-or-later
"""Live migration to another process (pyvmm.migsocket over a Unix stream socket): the downtime
(from the source's stop to the target's ACK of the loaded state) and the total time of
migrating a 64 MiB guest that dirties memory at a set rate, in pages per second: guests/dirty.S
at CPL3 writing one page of its 16 MiB buffer per step, spinning between two writes; the spin
count for a rate is calibrated on this host first (a run of the guest at two spin counts).
The target process (one per pyperf worker) accepts a connection per migration, receives the
machine and closes it. Pure pyvmm: there is no C side. Before the runs, one migration per rate
prints its rounds, pages and bytes sent, downtime and total time.

    python bench/bench_migration.py -o migration.json [--fast] [--cases 'migration.*']

Each migration moves tens of MiB, so pyperf's defaults are trimmed to 4 worker processes of
2 values each unless the command line says otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from functools import partial

from benchlib import Case, lazy, main, perf_counter

MIB = 1 << 20
RAM = 64 * MIB
BUFFER, PAGES = 4 * MIB, 4093          # dirty.S's buffer (not a multiple of 7 pages)
RATES = {"10k": 10_000, "100k": 100_000}   # pages dirtied per second
THRESHOLD = 64

TARGET = """
import socket, sys
from pyvmm.migsocket import MigrationError, receive
server = socket.socket(fileno=int(sys.argv[1]))
while True:
    conn, _ = server.accept()
    with conn:
        try:
            receive(conn).machine.close()
        except MigrationError as err:
            print(err, file=sys.stderr)
"""

_spin_cost: list[tuple[float, float]] = []


def _run_seconds(spin: int, steps: int) -> float:
    from pyvmm import Machine

    with Machine(serial=False, memory_size=RAM) as m:
        m.load("dirty", regs={"rcx": steps, "rsi": BUFFER, "rdi": PAGES, "rdx": spin})
        start = time.perf_counter()
        result = m.run(timeout=60)
        if not result.ok:
            raise RuntimeError(f"the dirtying guest failed: {result}")
        return time.perf_counter() - start


def spin_for(rate: int) -> int:
    """The spin count that makes dirty.S write `rate` pages per second on this host: a step
    costs a + b * spin seconds, a and b measured once per process."""
    if not _spin_cost:
        _run_seconds(0, 10_000)                    # warm the guest build cache
        base = _run_seconds(0, 2_000_000) / 2_000_000
        spun = _run_seconds(20_000, 2_000) / 2_000
        _spin_cost.append((base, max(spun - base, 1e-12) / 20_000))
    base, per_spin = _spin_cost[0]
    return max(0, round((1 / rate - base) / per_spin))


class Target:
    """A target process listening on an abstract Unix socket."""

    def __init__(self) -> None:
        self.address = f"\0pyvmm-bench-migration-{os.getpid()}-{id(self)}"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.address)
        server.listen(1)
        self.proc = subprocess.Popen([sys.executable, "-c", TARGET, str(server.fileno())],
                                     pass_fds=[server.fileno()])
        server.close()

    def migrate(self, spin: int):
        """One migration of a freshly started dirtying guest; its MigrationResult."""
        from pyvmm import Machine
        from pyvmm.migsocket import send

        with Machine(serial=False, memory_size=RAM) as m, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            m.load("dirty", regs={"rcx": 10**15, "rsi": BUFFER, "rdi": PAGES, "rdx": spin})
            sock.connect(self.address)
            return send(m, sock, threshold_pages=THRESHOLD)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def timer(rate: int, what: str):
    import atexit

    target = Target()
    atexit.register(target.close)
    spin = spin_for(rate)

    def time_func(loops: int) -> float:
        total = 0.0
        for _ in range(loops):
            result = target.migrate(spin)
            total += result.downtime if what == "downtime" else result.duration
        return total

    return time_func


def print_summary() -> None:
    target = Target()
    try:
        for name, rate in RATES.items():
            spin = spin_for(rate)
            r = target.migrate(spin)
            print(f"migration, guest dirtying {name} pages/s (spin {spin}): {len(r.rounds)} "
                  f"rounds {r.rounds}, {r.pages_sent} pages, {r.bytes_sent / MIB:.1f} MiB "
                  f"sent, downtime {r.downtime * 1e3:.1f} ms, total {r.duration * 1e3:.0f} ms",
                  file=sys.stderr)
    finally:
        target.close()


CASES = []
for _name, _rate in RATES.items():
    CASES.append(Case(f"migration.downtime.{_name}", "migration",
                      f"live migration downtime, 64 MiB guest dirtying {_name} pages/s",
                      lazy(partial(timer, _rate, "downtime")), unit="migration"))
    CASES.append(Case(f"migration.total.{_name}", "migration",
                      f"live migration total time, 64 MiB guest dirtying {_name} pages/s",
                      lazy(partial(timer, _rate, "total")), unit="migration"))

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--worker" not in argv:
        if not any(a.startswith(("-p", "--processes", "-n", "--values")) for a in argv):
            sys.argv[1:1] = ["--processes", "4", "--values", "2"]
        if "--paired" not in " ".join(argv):
            print_summary()
    main(CASES)
