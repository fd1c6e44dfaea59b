# SPDX-License-Identifier: GPL-2.0-or-later
"""`pyvmm migrate-demo`: live-migrate a guest that keeps writing memory, at a few dirtying
rates, and show the pre-copy rounds, the pages sent and the downtime; the guest then finishes
on the target and its result is checked (every write it made, before and after the move, must
be in its buffer). With `--processes` the target is another process, reached over a socket
pair (pyvmm.migsocket)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from .migration import MigrationResult, migrate

BUFFER = 4 << 20


def _to_process(source, threshold: int) -> tuple[MigrationResult, dict]:
    """Send `source` to a new `python -m pyvmm.migrate_target` process; (result, what the
    target printed)."""
    from .migsocket import send

    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen([sys.executable, "-m", "pyvmm.migrate_target",
                                 str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                stdout=subprocess.PIPE, text=True)
        theirs.close()
        try:
            result = send(source, ours, threshold_pages=threshold)
        finally:
            ours.close()
            out = proc.communicate(timeout=300)[0]
    return result, json.loads(out.strip().splitlines()[-1] if out.strip() else "{}")


def _table(result: MigrationResult) -> None:
    print("  round      pages       MiB   seconds   pages/s")
    last = len(result.rounds) - 1
    for i, (n, secs) in enumerate(zip(result.rounds, result.round_seconds, strict=True)):
        name = "stop+copy" if i == last else str(i)
        rate = f"{n / secs:9.0f}" if secs > 0 else "        -"
        print(f"  {name:>9} {n:>8} {n * 4096 / (1 << 20):>9.1f} {secs:>9.4f} {rate}")
    moved = result.source_result is not None and result.source_result.stop == "stopped"
    print(f"  pages sent {result.pages_sent} ({result.bytes_sent / (1 << 20):.1f} MiB), "
          f"downtime {result.downtime * 1e3:.1f} ms, migration {result.duration:.2f} s"
          + ("" if moved else " (the guest had finished before the stop)"))


def one(memory_mb: int, pages: int, steps: int, spin: int, threshold: int,
        processes: bool = False) -> bool:
    """One migration of guests/dirty.S (to another process with `processes`); prints its
    table; True when the result is right."""
    from .machine import Machine

    source = Machine(serial=False)
    try:
        source.add_memory(0, memory_mb << 20)
        source.load("dirty", regs={"rcx": steps, "rsi": BUFFER, "rdi": pages, "rdx": spin})
        print(f"\nguest dirtying a {pages * 4 // 1024} MiB buffer, {spin} spins between "
              f"writes ({memory_mb} MiB of RAM)" + (", to another process" if processes else ""))
        if processes:
            result, got = _to_process(source, threshold)
        else:
            result = migrate(source, threshold_pages=threshold)
    finally:
        source.close()
    _table(result)
    want = steps * (steps + 1) // 2
    # Reports the guest made before the stop reached the source's run.
    earlier = result.source_result.reports if result.source_result is not None else []
    values = {r.tag: r.value64 for r in earlier}
    start = time.perf_counter()
    if result.source_result is not None and result.source_result.stop != "stopped":
        # The guest ended on the source during pre-copy (a fast machine, a slow round):
        # its result is the source's, and the target holds a guest past its end.
        if result.target is not None:
            result.target.close()
        ok = result.source_result.ok and values == {1: want, 2: want}
        print(f"  source: {result.source_result.stop} before the stop, buffer sum "
              f"{values.get(1)} ({'right' if ok else f'WRONG, expected {want}'})")
        return ok
    if processes:
        values.update({tag: value for tag, value, _ in got.get("reports", [])})
        ok = got.get("stop") == "done" and got.get("status") == 0
        stop = got.get("stop", got.get("error", "no answer"))
        seconds = got.get("run_seconds", 0.0)
    else:
        assert result.target is not None
        with result.target as target:
            done = target.run(timeout=120)
        values.update({r.tag: r.value64 for r in done.reports})
        ok, stop, seconds = done.ok, done.stop, time.perf_counter() - start
    ok = ok and values == {1: want, 2: want}
    print(f"  target: {stop} after {seconds:.2f} s, buffer sum {values.get(1)} "
          f"({'right' if ok else f'WRONG, expected {want}'})")
    return ok


def main(*, memory_mb: int = 64, pages: int = 4093, steps: int = 3_000_000,
         spins: tuple[int, ...] = (400, 50), threshold: int = 64,
         processes: bool = False) -> int:
    """Run the demo; 0 when every migrated guest finished with the right result."""
    if pages % 7 == 0 or pages <= 0:
        raise ValueError("the buffer's page count must be positive and not a multiple of 7")
    if (BUFFER >> 12) + pages > memory_mb << 8:
        raise ValueError(f"a {pages}-page buffer at 4 MiB does not fit in {memory_mb} MiB")
    print("live migration by pre-copy: memory is copied while the guest runs, then the pages "
          "it dirtied since, until a round sends few; then stop, copy the rest and the state")
    results = [one(memory_mb, pages, steps, spin, threshold, processes) for spin in spins]
    print("\nevery migrated guest finished with the result of an uninterrupted run"
          if all(results) else "\nSOME MIGRATED GUEST WENT WRONG")
    return 0 if all(results) else 1
