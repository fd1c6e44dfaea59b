# SPDX-License-Identifier: GPL-2.0-or-later
"""Live migration by pre-copy: a running machine's memory is copied to a new machine while
the guest keeps running, then again the pages it dirtied meanwhile (KVM's dirty log), round
after round until few are left; then the source is stopped, the rest and every vCPU's, the
VM's and the devices' state are copied, and the target is ready to run on from there.

Both machines live in this process (the copy is a memcpy between their guest memories);
`migrate()` reports the rounds, the pages sent in each and the downtime (from the source's
stop to a target ready to run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import snapshot

if TYPE_CHECKING:
    from .kvm import Kvm
    from .machine import Machine, RunResult

__all__ = ["MigrationResult", "migrate"]

PAGE = 4096


@dataclass
class MigrationResult:
    """How a migration went. `rounds[i]` is the number of pages sent in round i (round 0 is
    all of memory, the last one is the stop-and-copy round)."""

    target: Machine
    rounds: list[int] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    downtime: float = 0.0
    duration: float = 0.0
    source_result: RunResult | None = None

    @property
    def pages_sent(self) -> int:
        """Pages copied in all rounds."""
        return sum(self.rounds)


def _copy_pages(src: memoryview, dst: memoryview, pages: list[int]) -> None:
    # Runs of consecutive pages are copied in one slice assignment.
    i = 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        start, end = pages[i] * PAGE, (pages[j] + 1) * PAGE
        dst[start:end] = src[start:end]
        i = j + 1


def _dirty_round(vm, pairs) -> int:
    """Read (and clear) every source region's dirty log and copy those pages; returns how
    many were copied."""
    sent = 0
    for src_region, src_view, dst_view in pairs:
        pages = vm.dirty_log(src_region).pages()
        _copy_pages(src_view, dst_view, pages)
        sent += len(pages)
    return sent


def migrate(source: Machine, *, kvm: Kvm | None = None,
            setup: Callable[[Machine], object] | None = None, max_rounds: int = 30,
            threshold_pages: int = 256, run_timeout: float | None = None,
            on_round: Callable[[int, int], object] | None = None) -> MigrationResult:
    """Live-migrate `source`, which must not be running: this starts its run() in a
    thread, copies memory while the guest runs, stops it and hands back a target Machine
    that continues from there (run() it). Pre-copy ends when a round sends at most
    `threshold_pages` pages or after `max_rounds` rounds. `setup(target)` recreates the
    caller's devices, doorbells and interrupts before states are loaded (as for restore).
    `on_round(round, pages)` is called after each round. If the guest finishes on its own
    before that, the target gets its final state (and would finish at once)."""
    regions = snapshot.machine_vm(source).memory.regions(None)
    description = snapshot.layout(source)
    target = snapshot.build(description, type(source), kvm=kvm)
    result = MigrationResult(target=target)
    started = time.perf_counter()
    runner: threading.Thread | None = None
    try:
        for region in regions:
            snapshot.machine_vm(source).set_log_dirty(region, True)          # logging from here on
        target_regions = snapshot.machine_vm(target).memory.regions(None)
        pairs = [(r, r.view(), t.view()) for r, t in zip(regions, target_regions, strict=True)]
        outcome: dict[str, RunResult] = {}
        runner = threading.Thread(target=lambda: outcome.setdefault(
            "result", source.run(timeout=run_timeout)), name="pyvmm-migration-source")
        runner.start()
        def record(sent: int, since: float) -> None:
            result.rounds.append(sent)
            result.round_seconds.append(time.perf_counter() - since)
            if on_round:
                on_round(len(result.rounds) - 1, sent)

        # Round 0: everything. Pages written while it is copied show in the next log.
        since, sent = time.perf_counter(), 0
        for _, src_view, dst_view in pairs:
            dst_view[:] = src_view
            sent += len(src_view) // PAGE
        record(sent, since)
        while len(result.rounds) < max_rounds and runner.is_alive():
            since = time.perf_counter()
            sent = _dirty_round(snapshot.machine_vm(source), pairs)
            record(sent, since)
            if sent <= threshold_pages:
                break
        # Stop and copy.
        stop_at = time.perf_counter()
        source.stop()
        runner.join()
        result.source_result = outcome.get("result")
        sent = _dirty_round(snapshot.machine_vm(source), pairs)
        saved = snapshot.paused_state(source)
        # Completing the vCPUs' last I/O (in paused_state) may write memory once more.
        sent += _dirty_round(snapshot.machine_vm(source), pairs)
        record(sent, stop_at)
        if setup is not None:
            setup(target)
        snapshot.load_paused_state(target, saved)
        result.downtime = time.perf_counter() - stop_at
        result.duration = time.perf_counter() - started
    except BaseException:
        if runner is not None and runner.is_alive():
            source.stop()
            runner.join()
        target.close()
        raise
    return result
