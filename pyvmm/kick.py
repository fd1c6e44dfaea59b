# SPDX-License-Identifier: GPL-2.0-or-later
"""The kick protocol and pyvmm's one watchdog: how a vCPU thread is made to leave KVM_RUN.

Kicking without a lost wake-up: the kick signal is blocked in every thread that runs a vCPU
and unblocked only inside KVM_RUN (KVM_SET_SIGNAL_MASK). A kick sets `immediate_exit` and
signals the running thread. If the signal lands while the thread is in userspace it stays
pending, and the next KVM_RUN returns EINTR at once; if it lands inside KVM_RUN the guest
is interrupted. Either way the kick is never lost, and the pending signal is consumed with
sigtimedwait after the EINTR, so it is never delivered to a handler.

Deadlines (run timeouts of vCPUs and machines) are all served by one thread, `watchdog`,
which calls a callback (that kicks) when a deadline passes before it is disarmed. The thread
survives any callback error, is restarted if it ever ends, and a forked child gets a fresh
one (the parent's thread does not exist there).
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["KICK_SIGNAL", "MAX_TIMEOUT", "Watchdog", "check_timeout", "eat_kicks",
           "run_sigmask", "thread_token", "watchdog"]

#: The signal used to kick vCPU threads out of KVM_RUN (a real-time one, so SIGUSR1/2 stay
#: the application's). Override with PYVMM_KICK_SIGNAL before importing pyvmm.
KICK_SIGNAL = int(os.environ.get("PYVMM_KICK_SIGNAL", signal.SIGRTMIN + 3))

#: A timeout at least this long (seconds, about 31 years; also float("inf")) means "no
#: timeout": no run lasts that long, and such a deadline would overflow a thread wait.
MAX_TIMEOUT = 1e9

#: Per thread: .token once the thread blocks the kick signal (see thread_token()).
thread_state = threading.local()


def _install_kick_handler() -> None:
    # The signal is always blocked or consumed, never delivered; a handler is installed anyway
    # so that a stray kick could never take the default action (terminate).
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, lambda signum, frame: None)


_install_kick_handler()


def check_timeout(timeout: object, what: str = "timeout") -> float | None:
    """`timeout` as float seconds, or None for no timeout. Accepts None and real numbers
    (int, float, Fraction, numpy scalars) >= 0; inf and anything >= MAX_TIMEOUT mean none.
    Raises ValueError for anything else (bool, Decimal, timedelta, NaN, negative), before a
    caller takes any lock."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise ValueError(f"{what} must be None or a number of seconds, not "
                         f"{type(timeout).__name__} {timeout!r}")
    value = float(timeout)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{what} must be >= 0 seconds, not {timeout!r}")
    return None if value >= MAX_TIMEOUT else value


def thread_token() -> object:
    """This thread's token, blocking the kick signal here first if it is not yet. Per thread,
    not per thread id: Python reuses the ids of threads that have ended."""
    token = getattr(thread_state, "token", None)
    if token is None:
        # Blocked before this thread can be named as the target of a kick.
        signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        token = thread_state.token = object()
    return token


def eat_kicks() -> None:
    """Consume kick signals pending on this thread (where the signal is blocked)."""
    while signal.sigtimedwait((KICK_SIGNAL,), 0) is not None:
        pass


def _sigset_bytes(signals: Iterable[int]) -> bytes:
    bits = 0
    for sig in signals:
        bits |= 1 << (int(sig) - 1)
    return bits.to_bytes(8, "little")


def run_sigmask() -> bytes:
    """The 8-byte sigset KVM_SET_SIGNAL_MASK gets for this thread: its current mask without
    the kick signal, so a kick interrupts KVM_RUN and nothing else changes."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    return _sigset_bytes(set(old) - {KICK_SIGNAL})


class Watchdog:
    """One thread for every deadline in pyvmm: calls `callback(token)` when a deadline armed
    with `arm()` passes before `disarm(token)`."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # Also the child's side of a fork: the parent's thread (and whoever held the lock
        # there) does not exist in the child, and the parent's deadlines are not the child's.
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Callable[[int], None]] = {}
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, callback: Callable[[int], None], timeout: float) -> int:
        """Call `callback(token)` from the watchdog thread in `timeout` seconds (a number
        already checked by `check_timeout`) unless disarmed first; returns the token."""
        token = next(self._seq)
        deadline = time.monotonic() + timeout
        with self._cond:
            self._armed[token] = callback
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="pyvmm-watchdog",
                                                daemon=True)
                self._thread.start()
            elif earliest:  # otherwise the thread already sleeps less than this deadline
                self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        """Withdraw a deadline (harmless when it has fired already)."""
        with self._cond:
            self._armed.pop(token, None)
            # Disarmed entries leave the heap lazily; keep them from piling up under a
            # long-lived earlier deadline.
            if len(self._heap) > 64 and len(self._heap) > 2 * len(self._armed):
                self._heap = [e for e in self._heap if e[1] in self._armed]
                heapq.heapify(self._heap)

    @property
    def alive(self) -> bool:
        """Whether the watchdog thread is running (it starts with the first deadline)."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        cond = self._cond
        with cond:
            while True:
                try:
                    self._step(cond)
                except BaseException:  # noqa: BLE001 - nothing may end the thread that
                    pass               # serves every other deadline

    def _step(self, cond: threading.Condition) -> None:
        while self._heap and self._heap[0][1] not in self._armed:
            heapq.heappop(self._heap)
        if not self._heap:
            cond.wait()
            return
        deadline, token = self._heap[0]
        delay = deadline - time.monotonic()
        if delay > 0:
            cond.wait(min(delay, threading.TIMEOUT_MAX, MAX_TIMEOUT))
            return
        heapq.heappop(self._heap)
        callback = self._armed.pop(token)
        cond.release()  # never hold the watchdog's lock while taking a vCPU's
        try:
            callback(token)
        except BaseException:  # noqa: BLE001 - even SystemExit: this thread serves all others
            pass
        finally:
            del callback
            cond.acquire()


#: pyvmm's one watchdog.
watchdog = Watchdog()
