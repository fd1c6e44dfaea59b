# SPDX-License-Identifier: GPL-2.0-or-later
"""The exit loop: pyvmm's one place that calls `vcpu.run()` over and over.

`run_vcpu()` runs one vCPU until its guest is done, fails, stops, or a `RunControl` is told to
stop (a timeout, `Machine.stop()`, a device). Every exit goes one way: ucalls (the guest port
protocol, `guests.ucall`) are handled here; other port I/O goes to `io`, MMIO to `mmio` (the
buses); HLT and SHUTDOWN end the run; any other exit type goes to `handlers[type(exit)]`,
then to `default`. A handler is `handler(exit, vcpu) -> Stop | str | None`: anything but None
ends the run with that stop. `Machine` (one thread per vCPU), the guest runner (`pyvmm run`,
the tests' harness) and the SMM helpers all run on it.

Timeouts have one path too: `RunControl.arm(timeout)` sets a deadline on the one watchdog
(`pyvmm.kick`), whose callback is `stop("timeout")`, which kicks the vCPUs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .detached import detached_error
from .exits import Exit, HltExit, IntrExit, IoExit, MmioExit, ShutdownExit
from . import ucall
from .kick import check_timeout, watchdog

__all__ = ["MAX_CONSOLE", "MAX_EVENTS", "MAX_REPORTS", "STOPS", "ConsoleBuffer", "Handler",
           "Outcome", "RunControl", "RunResult", "Stop", "run_vcpu"]


class Stop(StrEnum):
    """Why a run ended. A `str`, so `result.stop == "done"` keeps working."""

    DONE = "done"            # the guest said DONE (status in RunResult.status)
    FAIL = "fail"            # a check in the guest failed (its code in status)
    FAULT = "fault"          # an exception reached the host's stubs
    HLT = "hlt"
    SHUTDOWN = "shutdown"    # a triple fault
    TIMEOUT = "timeout"
    STOPPED = "stopped"      # stop() from the application, a device or a handler
    CLOSED = "closed"        # the machine was closed under the run
    UNHANDLED = "unhandled"  # an exit nothing handles (including FailEntry, InternalError)
    ERROR = "error"          # a host-side exception (a device or handler raised)
    MAX_EXITS = "max_exits"  # the run's exit budget is spent


#: Every stop reason, as strings.
STOPS = tuple(s.value for s in Stop)

#: Default bounds of what a guest can make a run keep (settable per run and per Machine).
MAX_REPORTS = 10_000         # reports kept in RunResult.reports; later ones are counted
MAX_EVENTS = 10_000          # ucall events kept in RunResult.events (when events are kept)
MAX_CONSOLE = 1 << 20        # console bytes kept: the LAST ones (the end is what explains)

Handler = Callable[[Exit, Any], "Stop | str | None"]
UCALL_PORTS = ucall.PORTS


class ConsoleBuffer:
    """Console output of one machine or run: the last `limit` bytes are kept, the rest are
    counted in `dropped`; `sink(data)` (if set) sees every byte as it comes."""

    def __init__(self, limit: int = MAX_CONSOLE,
                 sink: Callable[[bytes], None] | None = None) -> None:
        self.limit = limit
        self.sink = sink
        self.dropped = 0
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        buf = self._buf
        buf += data
        # Trimmed in batches: a byte-at-a-time console must not copy the buffer every byte.
        if len(buf) > self.limit + max(self.limit, 4096):
            self._trim()

    def _trim(self) -> None:
        excess = len(self._buf) - max(self.limit, 0)
        if excess > 0:
            del self._buf[:excess]
            self.dropped += excess

    def clear(self) -> None:
        self._buf.clear()
        self.dropped = 0

    def getvalue(self) -> bytes:
        """The kept bytes (at most `limit`)."""
        self._trim()
        return bytes(self._buf)


@dataclass
class RunResult:
    """What a run saw. `stop` is a `Stop`; `status` the guest's DONE value (or a FAIL code,
    or what `stop(..., status=)` gave). `reports`/`events`/`console` keep at most their limits;
    `dropped_*` count what went past them. `overrun` is how many seconds the run ended after
    its deadline (a device call that blocked: Python cannot cut it short); `callbacks_pending`
    says a doorbell callback was still running when run() stopped waiting for it."""

    stop: str = Stop.STOPPED
    status: int | None = None
    exits: Counter = field(default_factory=Counter)
    console: str = ""
    reports: list = field(default_factory=list)
    duration: float = 0.0
    vcpu: int | None = None
    last_exit: Exit | None = None
    event: Any = None
    error: BaseException | None = None
    exits_per_vcpu: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    console_bytes: bytes = b""
    dropped_reports: int = 0
    dropped_events: int = 0
    dropped_console: int = 0
    overrun: float = 0.0
    callbacks_pending: bool = False

    @property
    def ok(self) -> bool:
        """Done with status 0."""
        return self.stop == Stop.DONE and self.status == 0

    @property
    def values(self) -> list[int]:
        """The reported values, in order."""
        return [r.value for r in self.reports]

    @property
    def detail(self) -> str:
        """A line on why the run ended, when the stop itself does not say it all."""
        if self.error is not None:
            return f"{self.error!r}" + (f" on vCPU {self.vcpu}" if self.vcpu is not None else "")
        if self.stop in (Stop.FAIL, Stop.FAULT) and self.event is not None:
            return str(self.event)
        if self.stop == Stop.SHUTDOWN:
            return "triple fault (an exception with no usable handler)"
        if self.stop == Stop.UNHANDLED:
            return repr(self.event if self.event is not None else self.last_exit)
        if self.callbacks_pending:
            return "a doorbell callback was still running when the run ended"
        if self.overrun > 0.05:
            return f"ended {self.overrun:.3f} s after its deadline (a device call blocked)"
        return ""

    def _dropped_line(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.dropped_reports, "reports"),
                                               (self.dropped_events, "events"),
                                               (self.dropped_console, "console bytes")) if n]
        return ("dropped past the limits: " + ", ".join(parts)) if parts else ""

    def summary(self) -> str:
        """The stop, its detail and the exit counts, one per line."""
        lines = [f"stop: {self.stop}" + (f" (status {self.status})" if self.status is not None
                                         else "") + f" after {self.duration * 1e3:.1f} ms"]
        if self.detail:
            lines.append(f"  {self.detail}")
        if self._dropped_line():
            lines.append(f"  {self._dropped_line()}")
        total = sum(self.exits.values())
        lines.append(f"exits: {total}" + "".join(f"\n  {name:<18} {n}" for name, n in
                                                sorted(self.exits.items(),
                                                       key=lambda kv: -kv[1])))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class Outcome:
    """How one vCPU's loop ended."""

    stop: str
    status: int | None = None
    event: Any = None
    last_exit: Exit | None = None
    error: BaseException | None = None
    vcpu: int | None = None
    ended: float = 0.0       # time.monotonic() when the loop returned


class RunControl:
    """The stop request of a run, shared by its vCPU loops. `stop()` may be called from any
    thread: the first reason wins, and every vCPU in `vcpus` is kicked so its loop sees it."""

    def __init__(self, vcpus: Iterable[Any] = ()) -> None:
        self.reason: str | None = None
        self.status: int | None = None
        self.vcpus = list(vcpus)
        self.deadline: float | None = None   # monotonic, when armed
        self._lock = threading.Lock()
        self._token: int | None = None

    def stop(self, reason: str = Stop.STOPPED, *, status: int | None = None) -> bool:
        """Ask the run to end; True if this call set the reason (it was the first)."""
        with self._lock:
            first = self.reason is None
            if first:
                self.reason = _stop(reason)
                self.status = status
        for vcpu in self.vcpus:
            vcpu.kick()
        return first

    def arm(self, timeout: float | None) -> None:
        """Stop with "timeout" after `timeout` seconds (None: never); `disarm()` ends it."""
        timeout = check_timeout(timeout)
        if timeout is None:
            return
        self.deadline = time.monotonic() + timeout
        self._token = watchdog.arm(self._fire, timeout)

    def _fire(self, token: int) -> None:
        if token == self._token:
            self.stop(Stop.TIMEOUT)

    def disarm(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            watchdog.disarm(token)

    def overrun(self, ended: float) -> float:
        """Seconds past the deadline at `ended` (0 when not armed or not past it)."""
        return max(0.0, ended - self.deadline) if self.deadline is not None else 0.0


def _ucall(ex: IoExit, vcpu: Any, result: RunResult, console: ConsoleBuffer,
           max_reports: int, keep_events: bool, max_events: int,
           on_report: Callable[[Any, Any], Any] | None) -> Outcome | bool:
    """One exit on a ucall port: an Outcome that ends the run, True when consumed, False when
    it is not a ucall (an IN there: the bus gets it)."""
    event = ucall.decode(ex, vcpu)
    if event is None:
        return False
    if keep_events:
        if len(result.events) < max_events:
            result.events.append(event)
        else:
            result.dropped_events += 1
    if isinstance(event, ucall.ConsoleOutput):
        console.write(event.data)
        return True
    if isinstance(event, ucall.Report):
        if len(result.reports) < max_reports:
            result.reports.append(event)
        else:
            result.dropped_reports += 1
        if on_report is not None:
            stop = on_report(event, vcpu)
            if stop is not None:
                return Outcome(_stop(stop), None, event, ex)
        return True
    ends = ucall.outcome(event)
    assert ends is not None  # every other event ends the run
    return Outcome(Stop(ends[0]), ends[1], event, ex)


def _stop(value: Any) -> Any:
    """A handler's stop as a `Stop` where it names one (other strings are kept as they are)."""
    return Stop(value) if isinstance(value, str) and value in STOPS else value


class _BudgetSpent(Exception):
    """max_exits exits have been run."""


def _budget(run: Callable[[], Exit], max_exits: int) -> Callable[[], Exit]:
    # Only a run with max_exits counts its exits: the loop itself stays as lean as it is.
    left = max_exits

    def counted() -> Exit:
        nonlocal left
        if left <= 0:
            raise _BudgetSpent
        left -= 1
        return run()
    return counted


def _through_handlers(cls: type, handlers: Mapping[type, Handler], default: Handler | None,
                      vcpu: Any) -> Callable[[Exit], Any]:
    # Port I/O or MMIO with no bus: served like any other exit.
    def serve(ex: Exit) -> Any:
        handler = handlers.get(cls) or default
        return handler(ex, vcpu) if handler is not None else Stop.UNHANDLED
    return serve


def run_vcpu(vcpu: Any, control: RunControl, result: RunResult, *,
             console: ConsoleBuffer, counts: Counter,
             io: Callable[[IoExit], Any] | None = None,
             mmio: Callable[[MmioExit], Any] | None = None,
             handlers: Mapping[type, Handler] | None = None,
             default: Handler | None = None, max_exits: int | None = None,
             max_reports: int = MAX_REPORTS, keep_events: bool = False,
             max_events: int = MAX_EVENTS, ucall_ports: frozenset = UCALL_PORTS,
             on_report: Callable[[Any, Any], Any] | None = None,
             wrap_run: Callable[[Any], Callable[[], Exit]] | None = None) -> Outcome:
    """Run `vcpu` until its guest or `control` ends the run; returns how it ended.

    Reports (and, with `keep_events`, every ucall event) go to `result`, console bytes to
    `console`, exit counts by type name to `counts`. `io(exit)`/`mmio(exit)` serve port I/O off
    the ucall ports and MMIO (None: they go through `handlers`/`default` like any other exit);
    they may return a stop too. An exception from any of them ends the run as Stop.ERROR with
    the exception in `Outcome.error`; a BaseException that is not an Exception
    (KeyboardInterrupt, SystemExit) also stops the rest of the run and is in `error` too: the
    caller re-raises it once every vCPU has stopped. `ucall_ports=frozenset()` turns the
    guest port protocol off (every port I/O exit goes to `io`). `on_report(report, vcpu)` sees
    each report as it comes (the registers are captured); it may return a stop too.
    `wrap_run(vcpu.run)` replaces vcpu.run if given (Machine's coalesced-ring drain)."""
    handlers = handlers if handlers is not None else {}
    io = io if io is not None else _through_handlers(IoExit, handlers, default, vcpu)
    mmio = mmio if mmio is not None else _through_handlers(MmioExit, handlers, default, vcpu)
    run = vcpu.run if wrap_run is None else wrap_run(vcpu.run)
    run = run if max_exits is None else _budget(run, max_exits)
    # The two hot exits are counted in locals and folded into `counts` when the loop ends
    # (their keys are still created at their first occurrence, in exit order).
    n_io = n_mmio = 0
    ex: Any = None   # the last exit (Any: the loop narrows it by `type(ex) is`)
    try:
        while True:
            if control.reason is not None:
                return Outcome(control.reason, control.status, None, ex)
            ex = run()
            cls = type(ex)
            if cls is IoExit:
                n_io += 1
                if n_io == 1:
                    counts["IoExit"] += 0
                if ex.port in ucall_ports:
                    done = _ucall(ex, vcpu, result, console, max_reports, keep_events,
                                  max_events, on_report)
                    if done is True:
                        continue
                    if isinstance(done, Outcome):
                        return done
                stop = io(ex)
                if stop is not None:
                    return Outcome(_stop(stop), None, ex, ex)
                continue
            if cls is MmioExit:
                n_mmio += 1
                if n_mmio == 1:
                    counts["MmioExit"] += 0
                stop = mmio(ex)
                if stop is not None:
                    return Outcome(_stop(stop), None, ex, ex)
                continue
            counts[cls.__name__] += 1
            if cls is IntrExit:
                continue  # a kick or a timeout: the loop head sees why
            if cls is HltExit:
                return Outcome(Stop.HLT, None, None, ex)
            if cls is ShutdownExit:
                return Outcome(Stop.SHUTDOWN, None, None, ex)
            handler = handlers.get(cls) or default
            if handler is None:
                return Outcome(Stop.UNHANDLED, None, ex, ex)
            stop = handler(ex, vcpu)
            if stop is not None:
                return Outcome(_stop(stop), None, ex, ex)
    except _BudgetSpent:
        return Outcome(Stop.MAX_EXITS, None, None, ex)
    except BaseException as err:  # a device model bug ends this run, not the host process
        return Outcome(Stop.ERROR, None, None, ex, err)
    finally:
        if n_io:
            counts["IoExit"] += n_io
        if n_mmio:
            counts["MmioExit"] += n_mmio


def finish(result: RunResult, outcome: Outcome, control: RunControl, started: float,
           console: ConsoleBuffer) -> RunResult:
    """Fill `result` from the outcome that explains the run. Exits are detached copies: the
    live ones view the vCPU's kvm_run page, and a result that outlives the vCPU must not keep
    that mapping (and the kernel's VM) alive."""
    event, last = outcome.event, outcome.last_exit
    result.stop, result.status, result.vcpu = outcome.stop, outcome.status, outcome.vcpu
    # A kept traceback would keep the vCPU (and its VM and RAM) alive as long as the result;
    # a KeyboardInterrupt/SystemExit is raised again by the caller, traceback and all.
    err = outcome.error
    result.error = detached_error(err) if isinstance(err, Exception) else err
    result.event = event.detached() if isinstance(event, Exit) else event
    result.last_exit = last.detached() if last is not None else None
    ended = time.monotonic()
    result.duration = ended - started
    result.overrun = control.overrun(ended)
    result.console_bytes = console.getvalue()
    result.console = result.console_bytes.decode("utf-8", "replace")
    result.dropped_console = console.dropped
    return result
