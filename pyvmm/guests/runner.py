# SPDX-License-Identifier: GPL-2.0-or-later
"""Run a payload on a fresh VM with one vCPU: the simple exit loop behind ``pyvmm run NAME``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import ucall
from .payload import Payload

__all__ = ["STOP", "GuestResult", "run", "run_loop"]


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


#: Returned by a handler to end the run (stop reason ``"stopped"``).
STOP: Any = _Stop()

#: Why a run ended.
STOP_REASONS = ("done", "fail", "fault", "hlt", "shutdown", "timeout", "error", "unhandled",
                "stopped", "max_exits")


@dataclass
class GuestResult:
    """What a run produced; ``str()`` gives the console text and an exit summary."""

    name: str
    stop_reason: str = "error"
    status: int | None = None        # the Done status
    console_bytes: bytes = b""
    reports: list[ucall.Report] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    exits: Counter[str] = field(default_factory=Counter)
    last_exit: Any = None
    elapsed: float = 0.0
    detail: str = ""

    @property
    def console(self) -> str:
        return self.console_bytes.decode("utf-8", "replace")

    @property
    def values(self) -> list[int]:
        return [r.value for r in self.reports]

    @property
    def ok(self) -> bool:
        return self.stop_reason == "done" and self.status == 0

    def summary(self) -> str:
        exits = ", ".join(f"{k} {v}" for k, v in sorted(self.exits.items())) or "none"
        how = self.stop_reason
        if self.stop_reason == "done":
            how += f" (status {self.status})"
        if self.detail:
            how += f": {self.detail}"
        lines = [f"{self.name}: {how} after {self.elapsed * 1000:.1f} ms",
                 f"exits: {sum(self.exits.values())} ({exits})"]
        lines += [f"  {r}" for r in self.reports]
        return "\n".join(lines)

    def __str__(self) -> str:
        text = self.console
        if text and not text.endswith("\n"):
            text += "\n"
        return text + self.summary()


def run_loop(vcpu: Any, result: GuestResult, *, timeout: float | None = 10.0,
             handler: Callable[[Any, Any], Any] | None = None,
             max_exits: int | None = None) -> GuestResult:
    """Run ``vcpu`` until done/fail/fault/hlt/shutdown/timeout, filling ``result``."""
    from .. import exits as ex_types

    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    n = 0
    try:
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result.stop_reason = "timeout"
                    break
                ex = vcpu.run(timeout=remaining)
            else:
                ex = vcpu.run()
            n += 1
            result.last_exit = ex
            result.exits[type(ex).__name__] += 1
            ev = ucall.decode(ex, vcpu)
            if ev is not None:
                result.events.append(ev)
                if isinstance(ev, ucall.ConsoleOutput):
                    result.console_bytes += ev.data
                elif isinstance(ev, ucall.Report):
                    result.reports.append(ev)
                else:
                    result.stop_reason, status = ucall.outcome(ev)
                    if result.stop_reason == "done":
                        result.status = status
                    else:
                        result.detail = str(ev)
                    break
            elif isinstance(ex, ex_types.HltExit):
                result.stop_reason = "hlt"
                break
            elif isinstance(ex, ex_types.ShutdownExit):
                result.stop_reason = "shutdown"
                result.detail = "triple fault (an exception with no usable handler)"
                break
            elif isinstance(ex, ex_types.IntrExit):
                if getattr(ex, "timed_out", False) or (
                        deadline is not None and time.monotonic() >= deadline):
                    result.stop_reason = "timeout"
                    break
                continue  # a signal or a kick: go on
            elif isinstance(ex, (ex_types.FailEntryExit, ex_types.InternalErrorExit)):
                result.stop_reason, result.detail = "error", repr(ex)
                break
            elif handler is not None:
                if handler(ex, vcpu) is STOP:
                    result.stop_reason = "stopped"
                    break
            else:
                result.stop_reason, result.detail = "unhandled", repr(ex)
                break
            if max_exits is not None and n >= max_exits:
                result.stop_reason = "max_exits"
                break
    finally:
        result.elapsed = time.monotonic() - start
    return result


def run(payload: str | Payload, *, memory_size: int | None = None, timeout: float | None = 10.0,
        handler: Callable[[Any, Any], Any] | None = None,
        setup: Callable[[Any, Any, Payload], Any] | None = None,
        max_exits: int | None = None, kvm: Any = None) -> GuestResult:
    """Build (if given a name), load and run a payload on a new VM; close everything after.

    ``handler(exit, vcpu)`` gets every exit that is not a ucall or an ending exit (HLT,
    SHUTDOWN, errors); it fills ``exit.data`` for IN and MMIO reads, and may return
    :data:`STOP`. Without a handler such an exit ends the run ("unhandled").
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
            close = getattr(kvm, "close", None)
            if close is not None:
                close()
    return result
