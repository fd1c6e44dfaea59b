# SPDX-License-Identifier: GPL-2.0-or-later
"""Snapshot save and restore: `Machine.snapshot(path)` and `Machine.restore(path)` of a paused
guest with 64 MiB and with 1 GiB of RAM, every page written (the worst case: the file holds
all of RAM), and the save of an idle 1 GiB guest (only its payload's pages are non-zero, so the
file is small). The guest is state_user stopped mid-loop at CPL3. Time per snapshot or
restore; the file goes to $PYVMM_BENCH_TMP (default: the system's temporary directory).
Pure pyvmm: there is no C side. The file sizes are printed before the runs.

    python bench/bench_snapshot.py -o snapshot.json [--fast] [--cases 'snapshot.*64m*']

Each operation moves up to 1 GiB, so pyperf's defaults are trimmed to 4 worker processes of 2
values each unless the command line says otherwise.
"""

from __future__ import annotations

import os
import sys
import tempfile
from functools import partial

from benchlib import Case, lazy, main, perf_counter

MIB = 1 << 20
SIZES = {"64m": 64 * MIB, "1g": 1024 * MIB}


def _tmpdir() -> str:
    return os.environ.get("PYVMM_BENCH_TMP") or tempfile.gettempdir()


def paused_machine(ram: int, *, fill: bool):
    """A Machine running state_user, stopped mid-loop; with `fill`, every page of RAM above
    the payload's first 2 MiB written by the host first."""
    from pyvmm import Machine

    m = Machine(serial=False, memory_size=ram)
    m.load("state_user", regs={"rcx": 10**12})
    if fill:
        view = m.memory.view(2 * MIB, ram - 2 * MIB)
        pattern = bytes(range(1, 256)) * (MIB // 255 + 1)
        for off in range(0, len(view), MIB):
            view[off:off + MIB] = pattern[:MIB]
    result = m.run(timeout=0.02)
    if result.stop != "timeout":
        raise RuntimeError(f"the guest did not keep running: {result}")
    return m


def save(ram: int, fill: bool):
    import atexit

    m = paused_machine(ram, fill=fill)
    fd, path = tempfile.mkstemp(prefix="pyvmm-bench-", suffix=".snap", dir=_tmpdir())
    os.close(fd)
    atexit.register(lambda: (m.close(), os.unlink(path)))

    def time_func(loops: int) -> float:
        start = perf_counter()
        for _ in range(loops):
            m.snapshot(path)
        return perf_counter() - start

    return time_func


def restore(ram: int):
    import atexit

    from pyvmm import Kvm, Machine

    kvm = Kvm()
    fd, path = tempfile.mkstemp(prefix="pyvmm-bench-", suffix=".snap", dir=_tmpdir())
    os.close(fd)
    with paused_machine(ram, fill=True) as m:
        m.snapshot(path)
    atexit.register(lambda: (os.unlink(path), kvm.close()))

    def time_func(loops: int) -> float:
        elapsed = 0.0
        for _ in range(loops):
            start = perf_counter()
            m2 = Machine.restore(path, kvm=kvm)
            elapsed += perf_counter() - start
            m2.close()  # unmapping 1 GiB is not part of a restore
        return elapsed

    return time_func


def print_sizes() -> None:
    for name, ram, fill in (("64m", SIZES["64m"], True), ("1g", SIZES["1g"], True),
                            ("1g idle", SIZES["1g"], False)):
        fd, path = tempfile.mkstemp(prefix="pyvmm-bench-", suffix=".snap", dir=_tmpdir())
        os.close(fd)
        try:
            with paused_machine(ram, fill=fill) as m:
                m.snapshot(path)
            size = os.path.getsize(path)
        finally:
            os.unlink(path)
        print(f"snapshot file, {name} guest: {size / MIB:.1f} MiB ({size} bytes)",
              file=sys.stderr)


CASES = []
for _name, _ram in SIZES.items():
    _label = "64 MiB" if _name == "64m" else "1 GiB"
    CASES.append(Case(f"snapshot.save.{_name}", "snapshot",
                      f"snapshot save, {_label} guest, every page written",
                      lazy(partial(save, _ram, True)), unit="snapshot"))
    CASES.append(Case(f"snapshot.restore.{_name}", "snapshot",
                      f"snapshot restore, {_label} guest, every page written",
                      lazy(partial(restore, _ram)), unit="restore"))
CASES.append(Case("snapshot.save.1g-idle", "snapshot",
                  "snapshot save, 1 GiB guest, idle (zero chunks left out)",
                  lazy(partial(save, SIZES["1g"], False)), unit="snapshot"))

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--worker" not in argv:
        if not any(a.startswith(("-p", "--processes", "-n", "--values")) for a in argv):
            sys.argv[1:1] = ["--processes", "4", "--values", "2"]
        if "--paired" not in " ".join(argv):
            print_sizes()
    main(CASES)
