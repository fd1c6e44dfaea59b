# SPDX-License-Identifier: GPL-2.0-or-later
"""Running the debugged machine for the gdb stub: all-stop continue and step through
`Machine.run()`, the DebugExit handler, Ctrl-C, and the stop replies gdb gets.

A run goes through `Machine.run()` in a helper thread while the stub's thread keeps reading
what gdb sends (Ctrl-C stops the run: `Machine.stop()` kicks every vCPU). The DebugExit
handler ends a run at the debugger's stops (and stops the other vCPUs: all-stop), and gives
the guest back the #DB and #BP that are its own. Where no breakpoint can be planted, `c`
goes on by single steps (`continue_by_steps`).
"""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..exits import DebugExit
from ..runloop import RunResult
from ..ucall import PORT_DONE
from .target import Breakpoints, StopReason

__all__ = ["Runner"]

SIGINT, SIGTRAP, SIGABRT, SIGSEGV = 2, 5, 6, 11
_KVM_EXIT_IO = 2
#: How the end of a run that gdb did not ask for is shown to it (the guest stays stopped).
_STOP_SIGNALS = {"fail": SIGABRT, "fault": SIGSEGV, "shutdown": SIGSEGV, "error": SIGABRT,
                 "unhandled": SIGABRT, "hlt": SIGTRAP, "timeout": SIGINT, "closed": SIGINT}

Feed = Callable[[bytes], None]


class Runner:
    """The run side of one gdb session on `machine`: which vCPUs are still live, the runs
    made so far (`results`), and why the last one stopped."""

    def __init__(self, machine: Any, breakpoints: Breakpoints,
                 log: Callable[[str], None]) -> None:
        self.machine = machine
        self.breakpoints = breakpoints
        self.log = log
        self.live = [v.id for v in machine.vcpus]
        self.results: list[RunResult] = []
        self.interrupted = False
        self._event: tuple[int, StopReason] | None = None
        self._event_lock = threading.Lock()
        self._machine_running = False
        self._wake_r, self._wake_w = os.pipe()

    def vcpu(self, vcpu_id: int) -> Any:
        for vcpu in self.machine.vcpus:
            if vcpu.id == vcpu_id:
                return vcpu
        raise ValueError(f"no vCPU {vcpu_id}")

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- stopping

    def interrupt(self) -> None:
        """Ctrl-C (or gdb hung up): stop the run in progress."""
        self.interrupted = True
        if self._machine_running:               # between runs there is nothing to stop
            self.machine.stop("stopped")

    def on_debug(self, exit: DebugExit, vcpu: Any) -> str | None:
        """The machine's DebugExit handler (runs on the vCPU's thread)."""
        reason = self.breakpoints.classify(exit, vcpu)
        if reason is None:
            # The guest's own #DB/#BP (its int3, its TF, its debug registers): give it back.
            self.breakpoints.apply(vcpu, inject=exit.exception)
            return None
        with self._event_lock:
            if self._event is None:
                self._event = (vcpu.id, reason)
        self.machine.stop("stopped")                # all-stop: the other vCPUs stop too
        return "stopped"

    # -- running

    def _read(self, sock: socket.socket, feed: Feed) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if data:
            feed(data)
        else:                                   # gdb hung up while the guest runs
            self.interrupt()

    def run(self, vcpus: list[int], sock: socket.socket, feed: Feed) -> RunResult:
        """Machine.run() of `vcpus` in a helper thread, while this one passes what gdb sends
        to `feed` (which calls `interrupt()` on Ctrl-C)."""
        self._event, self.interrupted = None, False
        done: queue.Queue = queue.Queue()

        def body() -> None:
            try:
                done.put(self.machine.run(timeout=None, vcpus=vcpus))
            except BaseException as err:        # reported to gdb as an abort, never lost
                done.put(RunResult(stop="error", error=err))
            finally:
                os.write(self._wake_w, b"x")

        thread = threading.Thread(target=body, name="pyvmm-gdb-run", daemon=True)
        self._machine_running = True
        thread.start()
        watched: list[Any] = [sock, self._wake_r]
        while True:
            ready, _, _ = select.select(watched, [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 1)
                break
            self._read(sock, feed)
        thread.join()
        self._machine_running = False
        result = done.get()
        self.results.append(result)
        return result

    def continue_by_steps(self, sock: socket.socket, feed: Feed) -> tuple:
        """`c` where breakpoints cannot be planted (no int3 intercept, no debug-register
        breakpoints): single-step the live vCPUs in turn until one reaches a breakpoint,
        stops for another reason, or gdb sends Ctrl-C. Returns `stop_reply()`."""
        self.interrupted = False
        bps = self.breakpoints
        while True:
            for vcpu_id in list(self.live):
                vcpu = self.vcpu(vcpu_id)
                bps.stepping = vcpu_id
                bps.apply(vcpu)
                self._event = None
                result = self.machine.run(timeout=None, vcpus=[vcpu_id])
                self.results.append(result)
                bps.stepping = None
                bps.apply(vcpu)
                event = self._event
                if event is None and result.stop == "done" and self.finished(vcpu_id):
                    self.live.remove(vcpu_id)       # this vCPU is through; the others go on
                    if not self.live:
                        return self.stop_reply(result, [])
                    continue
                if event is None or event[1].kind != "step":
                    return self.stop_reply(result, [vcpu_id])
                sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
                if sregs.cs.base + regs.rip in bps.stepped:
                    self._event = (vcpu_id, StopReason("swbreak"))
                    return self.stop_reply(result, [vcpu_id])
            ready, _, _ = select.select([sock], [], [], 0)
            if ready:
                self._read(sock, feed)
            if self.interrupted:
                self._event = None
                return self.stop_reply(RunResult(stop="stopped"), [])

    # -- results

    def finished(self, vcpu_id: int) -> bool:
        """A vCPU whose last exit was the guest's DONE has ended (its loop ran it no
        further)."""
        run = self.vcpu(vcpu_id).kvm_run
        return (run.exit_reason == _KVM_EXIT_IO and run.io.port == PORT_DONE
                and run.io.direction == 1)

    def stop_reply(self, result: RunResult, ran: list[int]) -> tuple:
        """(the stop reply for gdb, the vCPU it names or None, "exited" when the guest is
        through, else None)."""
        for vcpu_id in ran:
            if self.finished(vcpu_id) and vcpu_id in self.live:
                self.live.remove(vcpu_id)
        if self._event is not None:
            vcpu_id, reason = self._event
            reply = f"T{SIGTRAP:02x}thread:{vcpu_id + 1:x};{reason.stop_reply_part()}"
            return reply, vcpu_id, None
        if not self.live:
            status = result.status if result.status is not None else 0
            self.log(f"the guest finished: {result.stop}, status {status}")
            return f"W{status & 0xFF:02x}", None, "exited"
        vcpu_id = (result.vcpu if result.vcpu is not None and result.vcpu in self.live
                   else self.live[0])
        if self.interrupted:
            signal = SIGINT
        elif result.stop == "done":
            signal = SIGTRAP                    # one vCPU finished; gdb sees the others
        else:
            signal = _STOP_SIGNALS.get(str(result.stop), SIGTRAP)
            self.log(f"the guest stopped: {result.summary().splitlines()[0]}"
                     + (f" ({result.event})" if result.event is not None else ""))
        return f"T{signal:02x}thread:{vcpu_id + 1:x};", vcpu_id, None

    def session_result(self, ending: str) -> RunResult:
        """One RunResult for the whole session: every run's reports, console and exits, the
        stop of the last run (or "stopped" after a kill)."""
        if not self.results:
            return RunResult(stop="stopped")
        last = self.results[-1]
        merged = RunResult(stop=last.stop if ending != "kill" else "stopped",
                           status=last.status, vcpu=last.vcpu, last_exit=last.last_exit,
                           event=last.event, error=last.error)
        exits: Counter = Counter()
        for r in self.results:
            exits.update(r.exits)
            merged.reports.extend(r.reports)
            merged.console += r.console
            merged.duration += r.duration
            for vcpu_id, counts in r.exits_per_vcpu.items():
                merged.exits_per_vcpu.setdefault(vcpu_id, Counter()).update(counts)
        merged.exits = exits
        return merged
