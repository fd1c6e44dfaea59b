# SPDX-License-Identifier: GPL-2.0-or-later
"""The doorbell worker: one epoll thread that serves the doorbells of a machine. It is the
only reader of their eventfds: when one is readable, the thread calls its ``serve()``.
``flush()`` makes it serve every doorbell now and waits until that is done.

The thread holds a doorbell by weak reference only, so neither it nor the VM behind it is
kept alive by the thread; a ``DoorbellWorker`` dropped without ``close()`` stops the thread
when collected, and the thread releases its epoll and wake-up fds as it ends.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import MAX_KEPT_ERRORS
from .logs import log_failure

if TYPE_CHECKING:
    from .doorbell import Doorbell

__all__ = ["DoorbellWorker"]


class _WorkerCore:
    """What the worker's thread holds: the epoll set and weak references to the doorbells,
    never the doorbells (and so their VM and its RAM) themselves."""

    def __init__(self, name: str) -> None:
        self.epoll = select.epoll()
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.epoll.register(self.wake, select.EPOLLIN)
        self.name = name
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.bells: dict[int, weakref.ref] = {}
        self.serving: list[Doorbell] = []   # the doorbells whose batch is in hand, innermost last
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.released = False               # epoll and wake fds closed
        self.flush_asked = self.flush_done = 0

    def on_thread(self) -> bool:
        return self.thread is threading.current_thread()

    def add(self, bell: Doorbell) -> None:
        with self.lock:
            if self.stopping:
                raise RuntimeError("doorbell worker is closed")
            self.epoll.register(bell.fileno(), select.EPOLLIN)
            self.bells[bell.fileno()] = weakref.ref(bell)
            if self.thread is None:
                self.thread = threading.Thread(target=self.loop, name=self.name, daemon=True)
                self.thread.start()

    def discard(self, bell: Doorbell) -> None:
        with self.lock:
            fd = bell.fileno()
            ref = self.bells.get(fd)
            if ref is not None and ref() is bell:
                del self.bells[fd]
                if not self.released:
                    try:
                        self.epoll.unregister(fd)
                    except (OSError, ValueError):
                        pass
            if not self.on_thread():
                while bell in self.serving:   # let the batch in hand finish first
                    self.cond.wait()

    def serve(self, bell) -> None:
        with self.lock:
            self.serving.append(bell)
        try:
            bell.serve()
        except Exception as err:  # serve() reports callback errors itself: a bug of ours
            log_failure(f"serving {bell!r}", err)
        finally:
            with self.lock:
                self.serving.remove(bell)
                self.cond.notify_all()

    def serve_all(self) -> None:
        with self.lock:
            bells = [ref() for ref in self.bells.values()]
        for bell in bells:
            if bell is not None and bell not in self.serving:
                self.serve(bell)

    def flush(self, timeout: float | None) -> bool:
        if self.on_thread():   # from a callback: serve the others now (ours is in hand)
            self.serve_all()
            return True
        with self.lock:
            if self.stopping or self.thread is None:
                return True
            self.flush_asked += 1
            ticket = self.flush_asked
            os.eventfd_write(self.wake, 1)
            return self.cond.wait_for(lambda: self.flush_done >= ticket or self.released,
                                      timeout)

    def loop(self) -> None:
        try:
            while True:
                try:
                    events = self.epoll.poll()
                except InterruptedError:
                    continue
                for fd, _mask in events:
                    if fd == self.wake:
                        if self.woken():
                            return
                        continue
                    with self.lock:
                        ref = self.bells.get(fd)
                        bell = ref() if ref is not None else None
                        if ref is not None and bell is None:
                            del self.bells[fd]  # collected; its finalizer closed the fd
                    if bell is not None:
                        self.serve(bell)
                    del bell
        finally:
            with self.lock:
                self.released = True
                self.bells.clear()
                self.epoll.close()
                os.close(self.wake)
                self.cond.notify_all()

    def woken(self) -> bool:
        """A wake-up: stop (True), or serve a flush."""
        try:
            os.eventfd_read(self.wake)
        except BlockingIOError:
            pass
        with self.lock:
            if self.stopping:
                return True
            ticket = self.flush_asked
        if ticket > self.flush_done:
            self.serve_all()
            with self.lock:
                self.flush_done = ticket
                self.cond.notify_all()
        return False

    def stop(self) -> None:
        """End the thread after the batch in hand (it releases the fds); with no thread,
        release them here. Safe from any thread, a finalizer included."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            if self.thread is None:
                self.released = True
                self.epoll.close()
                os.close(self.wake)
            elif not self.released:
                os.eventfd_write(self.wake, 1)
            self.cond.notify_all()


class DoorbellWorker:
    """One epoll thread for the doorbells of a machine. Callback errors are counted in
    `error_count`, the first ones kept in `errors` (and each passed to `on_error`); they never
    stop the thread. A worker dropped without close() stops its thread when collected."""

    def __init__(self, name: str = "pyvmm-doorbells") -> None:
        self.name = name
        self.errors: list[tuple[Doorbell, BaseException]] = []
        self.error_count = 0
        self.on_error: Callable[[Doorbell, BaseException], None] | None = None
        self._core = _WorkerCore(name)
        weakref.finalize(self, self._core.stop).atexit = False

    @property
    def running(self) -> bool:
        thread = self._core.thread
        return thread is not None and thread.is_alive()

    def add(self, doorbell: Doorbell) -> None:
        """Serve `doorbell` (Doorbell() does this for its worker)."""
        self._core.add(doorbell)

    def discard(self, doorbell: Doorbell) -> None:
        """Stop serving `doorbell`; once this returns (outside the worker's thread) no batch
        of it is in hand and the worker never reads its eventfd again."""
        self._core.discard(doorbell)

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver every ring already signalled on the worker's doorbells and wait until their
        callbacks ran. False if `timeout` passed first. From a callback (the worker's own
        thread) the other doorbells are served at once; the calling one's rings stay for its
        next batch."""
        return self._core.flush(timeout)

    def in_batch(self, doorbell: Doorbell) -> bool:
        """True when called from `doorbell`'s own callback (on the worker's thread)."""
        core = self._core
        return core.on_thread() and doorbell in core.serving

    def report(self, doorbell: Doorbell, err: BaseException) -> None:
        """Record a callback error of `doorbell` (Doorbell.serve() calls this)."""
        self.error_count += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append((doorbell, err))
        if doorbell.error_count <= 1:  # log once per doorbell; error_count has the rest
            log_failure(f"doorbell callback for {doorbell.address}", err)
        if self.on_error is not None:
            try:
                self.on_error(doorbell, err)
            except Exception as hook_err:
                log_failure("doorbell on_error hook", hook_err)

    def close(self) -> None:
        """Stop the thread (after it finishes the batch in hand) and release the epoll fd.
        Idempotent; from a callback it returns at once and the thread ends after it."""
        core = self._core
        core.stop()
        thread = core.thread
        if thread is not None and not core.on_thread():
            thread.join()
