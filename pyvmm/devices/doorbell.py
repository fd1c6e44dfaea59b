# SPDX-License-Identifier: GPL-2.0-or-later
"""ioeventfd doorbells: a guest write to a PIO port or MMIO address signals an eventfd inside
the kernel, so the notification never becomes a userspace exit. One epoll worker thread per
machine (pyvmm.devices.doorbell_worker) serves every doorbell that has a callback, as kvmtool
does.

Each eventfd has exactly one reader, so a ring is counted once and delivered once:

- a doorbell served by a :class:`DoorbellWorker` is read by the worker's thread only; its
  ``count`` is what the worker has taken so far, and ``flush()`` (of the doorbell or of the
  worker) waits until every ring already signalled has been taken and its callback has run;
- a counting-only doorbell (no worker) is read by whoever asks for ``count``, under its lock,
  so the count is exact at any time.

Lifetime: the worker's thread holds its doorbells by weak reference only, so a machine dropped
without ``close()`` can be collected; a collected ``Doorbell`` deassigns its ioeventfd (if
its VM is still open) and closes its eventfd, and a collected ``DoorbellWorker`` stops its
thread, which then releases the epoll fd.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import MAX_KEPT_ERRORS, KvmError
from ..ioevent import IoEventAddress
from .doorbell_worker import DoorbellWorker

if TYPE_CHECKING:
    from ..vm import Vm

__all__ = ["Callback", "Doorbell", "DoorbellWorker"]

Callback = Callable[["Doorbell", int], None]
_OPEN, _REMOVING, _CLOSED = "open", "removing", "closed"


def _release_eventfd(fd: int, vm_ref: weakref.ref, registration: list) -> None:
    """Finalizer of a doorbell's eventfd (at remove(), or when the doorbell is collected):
    deassign it while its VM is open, then close it. Holds the VM only weakly."""
    reg, registration[0] = registration[0], None
    vm = vm_ref()
    try:
        if reg is not None and vm is not None and not vm.closed:
            vm.unregister_ioevent(fd, reg[0], length=reg[1], datamatch=reg[2])
    except Exception:  # noqa: BLE001 - a finalizer has nobody to tell; the fd still closes
        pass
    finally:
        os.close(fd)


def _check_not_ram(vm: Vm, address: IoEventAddress, length: int) -> None:
    """An MMIO doorbell over a memslot can never ring: the guest's write goes to memory."""
    if not isinstance(address, IoEventAddress) or address.is_pio:
        return
    start, end = address.addr, address.addr + max(length, 1)
    for region in vm.memory.regions(0):
        if region.guest_addr < end and start < region.end:
            raise ValueError(f"an MMIO doorbell at {address} lies in guest RAM ({region!r}): "
                             "the guest's writes there go to memory and never ring it")


class Doorbell:
    """An eventfd registered with KVM_IOEVENTFD at `address` (wildcard length 0, or 1/2/4/8
    bytes, optionally only for writes of `datamatch`). `count` is the number of rings so far
    (see the module documentation for when it is exact). With a `callback`, the doorbell
    needs a `worker`, whose thread runs `callback(doorbell, rings)` for every ring, in
    batches, one batch at a time; a callback may remove its own doorbell (a one-shot bell)."""

    def __init__(self, vm: Vm, address: IoEventAddress, *, length: int = 0,
                 datamatch: int | None = None, callback: Callback | None = None,
                 worker: DoorbellWorker | None = None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError("a doorbell callback must be callable(doorbell, rings)")
        if callback is not None and worker is None:
            raise ValueError("a doorbell with a callback needs a DoorbellWorker to run it "
                             "(worker=...; Machine.doorbell() gives it the machine's)")
        _check_not_ram(vm, address, length)
        self.vm = vm
        self.callback = callback
        self.worker = worker
        self.errors: list[BaseException] = []   # the first MAX_KEPT_ERRORS callback errors
        self.error_count = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._count = 0
        self._state = _OPEN
        self._finish_in_worker = False  # remove() called from this doorbell's own callback
        self._registration: list = [None]  # (address, length, datamatch) while assigned
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._finalizer = weakref.finalize(self, _release_eventfd, self._fd, weakref.ref(vm),
                                           self._registration)
        self._finalizer.atexit = False  # at exit the process's fds close with it
        try:
            vm.register_ioevent(self._fd, address, length=length, datamatch=datamatch)
            self._registration[0] = (address, length, datamatch)
            self.address, self.length, self.datamatch = address, length, datamatch
            if worker is not None:
                worker.add(self)
        except BaseException:
            self._finalizer()
            self._fd, self._state = -1, _CLOSED
            raise

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        """True once remove() has begun: no ring can come any more."""
        return self._state != _OPEN

    # -- counting (the one reader: the worker, or the owner of a counting-only doorbell) ----

    def _take(self) -> int:
        with self._lock:
            if self._fd < 0:
                return 0
            try:
                rings = os.eventfd_read(self._fd)
            except BlockingIOError:
                return 0
            self._count += rings
            self._cond.notify_all()
            return rings

    def _call(self, rings: int) -> None:
        try:
            self.callback(self, rings)
        except Exception as err:  # a device bug must not stop the doorbells
            self.error_count += 1
            if len(self.errors) < MAX_KEPT_ERRORS:
                self.errors.append(err)
            self.worker.report(self, err)

    def _deliver(self) -> None:
        rings = self._take()
        if rings and self.callback is not None:
            self._call(rings)

    def serve(self) -> None:
        """Take the rings pending in the eventfd into the count and run the callback: what
        the worker's thread does when the eventfd is readable (nobody else may, for a
        worker's doorbell). A removal the callback asked for is finished here."""
        self._deliver()
        if self._finish_in_worker:
            self._finish_in_worker = False
            self.worker.discard(self)
            self._finish_removal()

    @property
    def count(self) -> int:
        """Rings so far: exact for a counting-only doorbell; for a worker's doorbell, what the
        worker has taken (exact after flush())."""
        if self.worker is None:
            self._take()
        return self._count

    def flush(self, timeout: float | None = None) -> bool:
        """Count every ring already signalled and, for a worker's doorbell, wait until their
        callbacks ran. False if `timeout` passed first (a callback still running)."""
        if self.worker is None:
            self._take()
            return True
        return self.worker.flush(timeout)

    def wait(self, count: int | None = None, timeout: float | None = None) -> bool:
        """Block until the count reaches `count` (default: one more ring than now). Returns
        False on timeout, or when the doorbell is removed first."""
        target = (self.count + 1) if count is None else count
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.worker is None:
                self._take()
            with self._lock:
                if self._count >= target:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._state != _OPEN or (remaining is not None and remaining <= 0):
                    return False
                slice_ = 0.05 if remaining is None else min(remaining, 0.05)
                if self.worker is not None:
                    self._cond.wait(slice_)  # the worker notifies when it counts
                    continue
                fd = self._fd
            # Another reader of `count` may take the rings between our read and this poll:
            # poll in short slices and read again.
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(max(1, int(min(slice_, 0.02) * 1000)))

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
        if self.closed:
            raise ValueError(f"{self!r} is removed")
        length = self.length if length is None else length
        datamatch = self.datamatch if datamatch is ... else datamatch
        _check_not_ram(self.vm, address, length)
        old = (self.address, self.length, self.datamatch)
        self.vm.unregister_ioevent(self._fd, old[0], length=old[1], datamatch=old[2])
        self._registration[0] = None
        try:
            self.vm.register_ioevent(self._fd, address, length=length, datamatch=datamatch)
        except BaseException:
            self.vm.register_ioevent(self._fd, old[0], length=old[1], datamatch=old[2])
            self._registration[0] = old
            raise
        self._registration[0] = (address, length, datamatch)
        self.address, self.length, self.datamatch = address, length, datamatch

    def _deassign(self) -> None:
        reg, self._registration[0] = self._registration[0], None
        if reg is None or self.vm.closed:
            return  # the kernel drops every ioeventfd with its VM
        try:
            self.vm.unregister_ioevent(self._fd, reg[0], length=reg[1], datamatch=reg[2])
        except KvmError as err:
            # ENOENT: someone deassigned it already (vm.unregister_ioevent on our fd); the
            # address exits to userspace, which is all remove() promises.
            if err.errno != errno.ENOENT:
                raise

    def _finish_removal(self) -> None:
        self._deliver()  # the last rings (none can come now): counted and delivered
        with self._lock:
            self._finalizer()
            self._fd, self._state = -1, _CLOSED
            self._cond.notify_all()

    def remove(self) -> None:
        """Deassign the ioeventfd (the address exits to userspace again), count and deliver
        what is still pending, and close the eventfd. Idempotent; the eventfd is closed even
        when the deassign fails. Called from the doorbell's own callback, the worker
        finishes the removal as soon as the callback returns."""
        with self._lock:
            if self._state != _OPEN:
                return
            self._state = _REMOVING
            self._cond.notify_all()
        try:
            self._deassign()
        finally:
            worker = self.worker
            if worker is not None and worker.in_batch(self):
                self._finish_in_worker = True
            else:
                if worker is not None:
                    worker.discard(self)  # from here on the worker never reads our fd
                self._finish_removal()

    close = remove

    def __repr__(self) -> str:
        match = "" if self.datamatch is None else f" datamatch={self.datamatch:#x}"
        return (f"Doorbell({getattr(self, 'address', '?')}, length={getattr(self, 'length', 0)}"
                f"{match}, count={self._count})")
