"""ioeventfd doorbells: a guest write to a PIO port or MMIO address signals an eventfd inside
the kernel, so the notification never becomes a userspace exit. One epoll worker thread per
machine serves every doorbell (as kvmtool does), counting rings exactly and running callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..ioevent import IoEventAddress

if TYPE_CHECKING:
    from ..vm import Vm

log = logging.getLogger("pyvmm.devices")

Callback = Callable[["Doorbell", int], None]
#: Callback errors kept per doorbell and per worker (all are counted); a guest ringing a
#: broken device a million times must not grow the host's memory.
from ..errors import MAX_KEPT_ERRORS  # noqa: E402 - one definition, in errors


class Doorbell:
    """An eventfd registered with KVM_IOEVENTFD at `address` (wildcard length 0, or 1/2/4/8
    bytes, optionally only for writes of `datamatch`). `count` is the exact number of rings
    so far; `callback(doorbell, rings)` runs for every ring, in batches, one batch at a
    time: in the worker's thread when the doorbell has a worker (rings that a reader of
    `count` took from the eventfd are handed to the worker), else in the reading thread."""

    def __init__(self, vm: Vm, address: IoEventAddress, *, length: int = 0,
                 datamatch: int | None = None, callback: Callback | None = None,
                 worker: DoorbellWorker | None = None) -> None:
        self.vm = vm
        self.callback = callback
        self.errors: list[BaseException] = []   # the first MAX_KEPT_ERRORS callback errors
        self.error_count = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._count = 0
        self._undelivered = 0                  # rings counted but not yet given to callback
        self._deliver_lock = threading.Lock()  # one callback batch at a time
        self.worker = worker
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        registered = False
        try:
            vm.register_ioevent(self._fd, address, length=length, datamatch=datamatch)
            registered = True
            self.address, self.length, self.datamatch = address, length, datamatch
            if worker is not None:
                worker.add(self)
        except BaseException:
            if registered:
                vm.unregister_ioevent(self._fd, address, length=length, datamatch=datamatch)
            os.close(self._fd)
            self._fd = -1
            raise

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # -- counting ------------------------------------------------------------------------

    def _drain(self, deliver: bool | None = None) -> int:
        """Move the rings pending in the eventfd into the count, so it is exact at any time.
        Callbacks run here only when `deliver` (the worker; or, with no worker, any caller);
        otherwise the rings are left for the worker to deliver."""
        with self._lock:
            if self._fd < 0:
                return 0
            try:
                rings = os.eventfd_read(self._fd)
            except BlockingIOError:
                rings = 0
            self._count += rings
            if self.callback is not None:
                self._undelivered += rings
            if rings:
                self._cond.notify_all()
        if deliver is None:
            deliver = self.worker is None
        if deliver:
            self._deliver()
        elif rings and self.callback is not None:
            self.worker.poke(self)
        return rings

    def _deliver(self) -> None:
        callback = self.callback
        if callback is None:
            return
        with self._deliver_lock:
            with self._lock:
                rings, self._undelivered = self._undelivered, 0
            if not rings:
                return
            try:
                callback(self, rings)
            except Exception as err:  # a device bug must not stop the doorbells
                self.error_count += 1
                if len(self.errors) < MAX_KEPT_ERRORS:
                    self.errors.append(err)
                if self.worker is not None:
                    self.worker._report(self, err)
                else:
                    log.exception("doorbell callback failed for %s", self.address)

    @property
    def count(self) -> int:
        """Rings so far, exact: anything still pending in the eventfd is counted first."""
        self._drain()
        return self._count

    def wait(self, count: int | None = None, timeout: float | None = None) -> bool:
        """Block until the count reaches `count` (default: one more ring than now). Returns
        False on timeout."""
        target = (self.count + 1) if count is None else count
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._drain()
            with self._lock:
                if self._count >= target:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._fd < 0 or (remaining is not None and remaining <= 0):
                    return False  # removed (no ring can come any more), or out of time
                fd = self._fd
                if self.worker is not None and self.worker.running:
                    # The worker drains and notifies; the slice bounds a lost notification.
                    self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
                    continue
            # Another thread may drain the eventfd between our drain and this poll (a reader
            # of `count`, or Machine.run accounting for the last rings): poll in short slices.
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(max(1, int(min(0.02 if remaining is None else remaining, 0.02) * 1000)))

    async def wait_async(self, count: int | None = None, timeout: float | None = None) -> bool:
        """`wait()` for asyncio code (runs in the default executor)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.wait, count, timeout)

    # -- moving and removing -------------------------------------------------------------

    def move(self, address: IoEventAddress, *, length: int | None = None,
             datamatch: int | None | type(...) = ...) -> None:
        """Re-register at another address/length/datamatch while the guest may be running.
        Between the two ioctls the old address exits to userspace like any other access.
        The count carries over."""
        length = self.length if length is None else length
        datamatch = self.datamatch if datamatch is ... else datamatch
        self.vm.unregister_ioevent(self._fd, self.address, length=self.length,
                                   datamatch=self.datamatch)
        try:
            self.vm.register_ioevent(self._fd, address, length=length, datamatch=datamatch)
        except BaseException:
            self.vm.register_ioevent(self._fd, self.address, length=self.length,
                                     datamatch=self.datamatch)
            raise
        self.address, self.length, self.datamatch = address, length, datamatch

    def remove(self) -> None:
        """Deassign the ioeventfd (the address exits to userspace again), count what is
        still pending, and close the eventfd. Idempotent."""
        if self._fd < 0:
            return
        if self.worker is not None:
            self.worker.discard(self)
        if not self.vm.closed:
            self.vm.unregister_ioevent(self._fd, self.address, length=self.length,
                                       datamatch=self.datamatch)
        self._drain(deliver=True)  # the worker has let go: the last rings are delivered here
        with self._lock:
            os.close(self._fd)
            self._fd = -1
            self._cond.notify_all()

    close = remove

    def __repr__(self) -> str:
        match = "" if self.datamatch is None else f" datamatch={self.datamatch:#x}"
        return f"Doorbell({self.address}, length={self.length}{match}, count={self._count})"


class DoorbellWorker:
    """One epoll thread for all doorbells of a machine. Callback errors are recorded in
    `errors` (and passed to `on_error`), never allowed to stop the thread."""

    def __init__(self, name: str = "pyvmm-doorbells") -> None:
        self.name = name
        self.errors: list[tuple[Doorbell, BaseException]] = []
        self.on_error: Callable[[Doorbell, BaseException], None] | None = None
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._lock = threading.Lock()
        self._doorbells: dict[int, Doorbell] = {}
        self._poked: set[Doorbell] = set()   # rings counted by readers, to deliver here
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add(self, doorbell: Doorbell) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("doorbell worker is closed")
            self._doorbells[doorbell.fileno()] = doorbell
            self._epoll.register(doorbell.fileno(), select.EPOLLIN)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def poke(self, doorbell: Doorbell) -> None:
        """Have the worker run `doorbell`'s callback for rings another thread counted."""
        with self._lock:
            if self._stopping:
                return
            self._poked.add(doorbell)
        os.eventfd_write(self._wake, 1)

    def discard(self, doorbell: Doorbell) -> None:
        with self._lock:
            self._poked.discard(doorbell)
            fd = doorbell.fileno()
            if self._stopping:
                self._doorbells.pop(fd, None)
            elif self._doorbells.get(fd) is doorbell:
                del self._doorbells[fd]
                self._epoll.unregister(fd)

    def _report(self, doorbell: Doorbell, err: BaseException) -> None:
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append((doorbell, err))
        if doorbell.error_count == 1:  # log once per doorbell; error_count has the rest
            log.error("doorbell callback failed for %s: %r", doorbell.address, err)
        if self.on_error is not None:
            try:
                self.on_error(doorbell, err)
            except Exception:
                log.exception("doorbell on_error hook failed")

    def _loop(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):  # epoll closed under us
                return
            for fd, _mask in events:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    if self._stopping:
                        return
                    with self._lock:
                        poked, self._poked = self._poked, set()
                    for doorbell in poked:
                        try:
                            doorbell._deliver()
                        except Exception as err:
                            self._report(doorbell, err)
                    continue
                with self._lock:
                    doorbell = self._doorbells.get(fd)
                if doorbell is not None:
                    try:
                        doorbell._drain(deliver=True)
                    except Exception as err:
                        self._report(doorbell, err)

    def close(self) -> None:
        """Stop the thread (after it finishes the batch in hand) and release the epoll fd."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._epoll.close()
        os.close(self._wake)
