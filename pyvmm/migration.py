# SPDX-License-Identifier: GPL-2.0-or-later
"""Live migration by pre-copy: a running machine's memory is copied to a new machine while
the guest keeps running, then again the pages it dirtied meanwhile (KVM's dirty log), round
after round until few are left; then the source is stopped, the rest and every vCPU's, the
VM's and the devices' state are copied, and the target is ready to run on from there.

`precopy()` is that loop; where the pages go is a `PageSink`. `migrate()` moves a machine to
a new one in this process (the copy is a memcpy between their guest memories);
`pyvmm.migsocket.send()` moves it to another process over a socket. Both report the rounds,
the pages (and bytes) sent in each and the downtime (from the source's stop to a target
ready to run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import snapshot

if TYPE_CHECKING:
    from .kvm import Kvm
    from .machine import Machine, RunResult
    from .memory import MemoryRegion

__all__ = ["MigrationResult", "PageSink", "migrate", "page_runs", "precopy"]

PAGE = 4096


@dataclass
class MigrationResult:
    """How a migration went. `rounds[i]` is the number of pages sent in round i (round 0 is
    all of memory, the last one is the stop-and-copy round). `target` is the new machine of a
    migration in this process (None when it went to another process)."""

    target: Machine | None = None
    rounds: list[int] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    downtime: float = 0.0
    duration: float = 0.0
    bytes_sent: int = 0
    source_result: RunResult | None = None

    @property
    def pages_sent(self) -> int:
        """Pages copied in all rounds."""
        return sum(self.rounds)


class PageSink(Protocol):
    """Where a pre-copy sends memory and, at the end, the state."""

    def first_round(self, regions: list[MemoryRegion], views: list[memoryview]) -> int:
        """Send all of memory (what the target does not have yet); returns pages sent."""

    def pages(self, region: MemoryRegion, view: memoryview, pages: list[int]) -> None:
        """Send `pages` (page numbers in `region`, ascending) from `view`."""

    def end_round(self, number: int, pages: int) -> None:
        """Round `number` is over; it sent `pages` pages."""

    def switch_over(self, saved: dict[str, Any]) -> None:
        """Hand over the paused source's state (from snapshot.paused_state); when this
        returns, the target is the machine and the source must never run again."""

    def sent_bytes(self) -> int:
        """Bytes sent so far (pages and headers)."""


def page_runs(pages: list[int], limit: int | None = None) -> list[tuple[int, int]]:
    """Ascending page numbers as (first, count) runs of consecutive pages, each at most
    `limit` long."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page and (limit is None
                                                           or runs[-1][1] < limit):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


class _LocalSink:
    """Copies into the memory of a target machine of this process."""

    def __init__(self, target: Machine, setup: Callable[[Machine], object] | None) -> None:
        self.target, self.setup, self.copied = target, setup, 0
        self.dst = [r.view() for r in snapshot.machine_vm(target).memory.regions(None)]
        self.index: dict[int, int] = {}

    def first_round(self, regions: list[MemoryRegion], views: list[memoryview]) -> int:
        sent = 0
        for i, (region, view) in enumerate(zip(regions, views, strict=True)):
            self.index[id(region)] = i
            self.dst[i][:] = view
            sent += len(view) // PAGE
        self.copied += sent * PAGE
        return sent

    def pages(self, region: MemoryRegion, view: memoryview, pages: list[int]) -> None:
        dst = self.dst[self.index[id(region)]]
        for first, count in page_runs(pages):
            start, end = first * PAGE, (first + count) * PAGE
            dst[start:end] = view[start:end]
        self.copied += len(pages) * PAGE

    def end_round(self, number: int, pages: int) -> None:
        pass

    def switch_over(self, saved: dict[str, Any]) -> None:
        if self.setup is not None:
            self.setup(self.target)
        snapshot.load_paused_state(self.target, saved)

    def sent_bytes(self) -> int:
        return self.copied


def precopy(source: Machine, sink: PageSink, result: MigrationResult, *, max_rounds: int = 30,
            threshold_pages: int = 256, run_timeout: float | None = None,
            on_round: Callable[[int, int], object] | None = None,
            restore_logging: bool = False) -> MigrationResult:
    """Run `source` (which must not be running) in a thread while its memory goes to `sink`,
    round after round, until a round sends at most `threshold_pages` pages or `max_rounds`
    rounds are done; then stop it, send the rest and hand the state over. Fills `result`.
    On any error the source is stopped and left paused and intact (with `restore_logging`,
    its regions' dirty logging is put back as it was) and the error propagates."""
    vm = snapshot.machine_vm(source)
    regions = vm.memory.regions(None)
    was_logging = [r.log_dirty for r in regions]
    started = time.perf_counter()
    runner: threading.Thread | None = None
    outcome: dict[str, RunResult] = {}

    def record(sent: int, since: float) -> None:
        result.rounds.append(sent)
        result.round_seconds.append(time.perf_counter() - since)
        result.bytes_sent = sink.sent_bytes()
        sink.end_round(len(result.rounds) - 1, sent)
        if on_round:
            on_round(len(result.rounds) - 1, sent)

    def dirty_round() -> int:
        # Read (and clear) every region's dirty log and send those pages.
        sent = 0
        for region, view in zip(regions, views, strict=True):
            pages = vm.dirty_log(region).pages()
            if pages:
                sink.pages(region, view, pages)
            sent += len(pages)
        return sent

    try:
        for region in regions:
            vm.set_log_dirty(region, True)          # logging from here on
        views = [r.view() for r in regions]
        runner = threading.Thread(target=lambda: outcome.setdefault(
            "result", source.run(timeout=run_timeout)), name="pyvmm-migration-source")
        runner.start()
        # Round 0: everything. Pages written while it is sent show in the next log.
        since = time.perf_counter()
        record(sink.first_round(regions, views), since)
        while len(result.rounds) < max_rounds and runner.is_alive():
            since = time.perf_counter()
            sent = dirty_round()
            record(sent, since)
            if sent <= threshold_pages:
                break
        # Stop and copy.
        stop_at = time.perf_counter()
        source.stop()
        runner.join()
        result.source_result = outcome.get("result")
        sent = dirty_round()
        saved = snapshot.paused_state(source)
        # Completing the vCPUs' last I/O (in paused_state) may write memory once more.
        sent += dirty_round()
        record(sent, stop_at)
        sink.switch_over(saved)
        result.downtime = time.perf_counter() - stop_at
        result.duration = time.perf_counter() - started
        result.bytes_sent = sink.sent_bytes()
    except BaseException:
        if runner is not None and runner.is_alive():
            source.stop()
            runner.join()
        result.source_result = outcome.get("result", result.source_result)
        if restore_logging and not vm.closed:
            for region, logging in zip(regions, was_logging, strict=True):
                if not logging and region.log_dirty:
                    vm.set_log_dirty(region, False)
        raise
    return result


def migrate(source: Machine, *, kvm: Kvm | None = None,
            setup: Callable[[Machine], object] | None = None, max_rounds: int = 30,
            threshold_pages: int = 256, run_timeout: float | None = None,
            on_round: Callable[[int, int], object] | None = None) -> MigrationResult:
    """Live-migrate `source`, which must not be running, to a new machine of this process:
    this starts its run() in a thread, copies memory while the guest runs, stops it and
    hands back a target Machine (`result.target`) that continues from there (run() it).
    Pre-copy ends when a round sends at most `threshold_pages` pages or after `max_rounds`
    rounds. `setup(target)` recreates the caller's devices, doorbells and interrupts before
    states are loaded (as for restore). `on_round(round, pages)` is called after each round.
    If the guest finishes on its own before that, the target gets its final state (and
    would finish at once)."""
    target = snapshot.build(snapshot.layout(source), type(source), kvm=kvm)
    result = MigrationResult(target=target)
    try:
        precopy(source, _LocalSink(target, setup), result, max_rounds=max_rounds,
                threshold_pages=threshold_pages, run_timeout=run_timeout, on_round=on_round)
    except BaseException:
        target.close()
        raise
    return result
