# SPDX-License-Identifier: GPL-2.0-or-later
"""Run a payload on a fresh VM with one vCPU: the simple exit loop behind ``pyvmm run NAME``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..runloop import (
    MAX_REPORTS,
    ConsoleBuffer,
    RunControl,
    RunResult,
    Stop,
    finish,
    run_vcpu,
)
from ..runloop import STOPS as STOP_REASONS
from .payload import Payload

__all__ = ["STOP", "STOP_REASONS", "GuestResult", "run", "run_loop"]

#: What a handler returns to end the run (stop reason ``"stopped"``); any `Stop` or stop
#: string does too.
STOP = Stop.STOPPED


class GuestResult(RunResult):
    """What a run of a payload produced: a `RunResult` with the payload's `name`, and the
    older field names (`stop_reason` is `stop`, `elapsed` is `duration`). Every ucall event
    is kept in `events` (up to the limit). ``str()`` gives the console text and a summary."""

    def __init__(self, name: str = "", **fields: Any) -> None:
        fields.setdefault("stop", Stop.ERROR)
        super().__init__(**fields)
        self.name = name

    @property
    def stop_reason(self) -> str:
        """The stop (the older name)."""
        return self.stop

    @stop_reason.setter
    def stop_reason(self, value: str) -> None:
        self.stop = value

    @property
    def elapsed(self) -> float:
        """The duration in seconds (the older name)."""
        return self.duration

    def summary(self) -> str:
        exits = ", ".join(f"{k} {v}" for k, v in sorted(self.exits.items())) or "none"
        how = str(self.stop)
        if self.stop == Stop.DONE:
            how += f" (status {self.status})"
        if self.detail:
            how += f": {self.detail}"
        lines = [f"{self.name}: {how} after {self.duration * 1000:.1f} ms",
                 f"exits: {sum(self.exits.values())} ({exits})"]
        lines += [f"  {r}" for r in self.reports]
        if self._dropped_line():
            lines.append(f"  {self._dropped_line()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        text = self.console
        if text and not text.endswith("\n"):
            text += "\n"
        return text + self.summary()


def run_loop(vcpu: Any, result: GuestResult, *, timeout: float | None = 10.0,
             handler: Callable[[Any, Any], Any] | None = None,
             max_exits: int | None = None, max_reports: int = MAX_REPORTS,
             console: ConsoleBuffer | None = None) -> GuestResult:
    """Run ``vcpu`` on the run loop until done/fail/fault/hlt/shutdown/timeout, filling
    ``result``. ``handler(exit, vcpu)`` gets every exit the loop does not handle itself
    (port I/O off the ucall ports, MMIO, and any other exit type) and may return a stop."""
    control = RunControl([vcpu])
    console = console if console is not None else ConsoleBuffer()
    counts: Counter = Counter()
    started = time.monotonic()
    control.arm(timeout)
    try:
        outcome = run_vcpu(vcpu, control, result, console=console, counts=counts,
                           default=handler, max_exits=max_exits, max_reports=max_reports,
                           keep_events=True)
    finally:
        control.disarm()
        result.exits.update(counts)
    finish(result, outcome, control, started, console)
    if result.error is not None and not isinstance(result.error, Exception):
        raise result.error
    return result


def run(payload: str | Payload, *, memory_size: int | None = None, timeout: float | None = 10.0,
        handler: Callable[[Any, Any], Any] | None = None,
        setup: Callable[[Any, Any, Payload], Any] | None = None,
        max_exits: int | None = None, kvm: Any = None) -> GuestResult:
    """Build (if given a name), load and run a payload on a new VM; close everything after.

    ``handler(exit, vcpu)`` gets every exit that is not a ucall or an ending exit (HLT,
    SHUTDOWN, errors); it fills ``exit.data`` for IN and MMIO reads, and may return
    :data:`STOP` (or any stop). Without a handler such an exit ends the run ("unhandled").
    ``setup(vm, vcpu, payload)`` runs after loading and before the first ``KVM_RUN`` (add a
    read-only slot, poke parameters by symbol...).
    """
    from .. import Kvm
    from .toolchain import build

    if not isinstance(payload, Payload):
        payload = build(payload)
    result = GuestResult(payload.name)
    own_kvm = kvm is None
    if own_kvm:
        kvm = Kvm()
    try:
        with kvm.create_vm() as vm:
            vcpu = payload.prepare(vm, memory_size=memory_size, cpuid=kvm.supported_cpuid())
            if setup is not None:
                setup(vm, vcpu, payload)
            run_loop(vcpu, result, timeout=timeout, handler=handler, max_exits=max_exits)
    finally:
        if own_kvm:
            kvm.close()
    return result
