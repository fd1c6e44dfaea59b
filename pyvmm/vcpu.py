"""`Vcpu`: a vCPU fd, its mmapped kvm_run page, and running it (the kick protocol is in
`pyvmm.kick`; the state accessors in `pyvmm.vcpu_state`)."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import ioctls as io
from ._ffi import ffi, libc
from .errors import ClosedError, KvmError, foreign_process
from .exits import Exit, ExitReason, IntrExit, IoExit, MmioExit, decode, fast_exits
from .runext import run_exit as _run_exit
from .kick import KICK_SIGNAL, check_timeout, eat_kicks, run_sigmask, thread_token, watchdog
from .kick import thread_state as _tls
from .guestdebug import GuestDebugMixin
from .state.host import VcpuHost
from .state.vcpu_methods import VcpuStateMethods
from .vcpu_state import VcpuStateMixin

if TYPE_CHECKING:
    from .stats import StatsReader

__all__ = ["KICK_SIGNAL", "KVM_RUN_X86_SMM", "Vcpu", "watchdog"]

KVM_RUN_X86_SMM = 1
_EINTR, _EAGAIN, _EFAULT = errno.EINTR, errno.EAGAIN, errno.EFAULT
_MEMORY_FAULT = int(ExitReason.MEMORY_FAULT)
_get_ident = threading.get_ident
_new: Any = object.__new__   # Any: an IoExit or MmioExit, built in run()
_view = memoryview
_KVM_RUN = io.KVM_RUN
# KVM_RUN through a non-variadic function pointer to libc's ioctl: cffi calls a variadic
# function by preparing a new libffi call interface on every call (about 1 us here, per exit),
# a fixed prototype reuses one. Integer arguments are passed identically either way (libffi
# also sets AL, the vector-register count a variadic callee reads, to 0).
_kvm_run = ffi.cast("int (*)(int, unsigned long, unsigned long)", ffi.addressof(libc, "ioctl"))


class Vcpu(VcpuStateMixin, GuestDebugMixin, VcpuStateMethods):
    """One vCPU. Made by `Vm.create_vcpu()`, which gives it what it needs: the kvm_run size,
    a provider of the supported-CPUID buffer, the vendor, whether SMM exists, the host facts
    its state code needs (`host`: capabilities, MSR list), and a callback for when it closes.
    It holds no reference back to its VM."""

    role = "vcpu"

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int, *,
                 supported_cpuid_buffer: Callable[[], object],
                 cpu_vendor: Callable[[], str] = lambda: "", has_smm: bool = False,
                 on_close: Callable[[Vcpu], None] | None = None,
                 host: VcpuHost | None = None) -> None:
        self.id = vcpu_id
        self.host = host if host is not None else VcpuHost()  # caps and MSRs it is given
        self._fd = fd
        self._pid = os.getpid()  # KVM fds work only in the process that created the VM
        self.supported_cpuid_buffer = supported_cpuid_buffer
        self._cpu_vendor = cpu_vendor
        self.has_smm = has_smm
        self._on_close = on_close
        # Python's mmap counts every buffer exported from the mapping, so close() unmaps the
        # page only when no exit's data view (or exit holding kvm_run) is left; otherwise the
        # last of them unmaps it, and only then is the mmap's own dup of the vCPU fd (which
        # keeps the kernel's VM alive) closed. Nothing can touch an unmapped page.
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._page = memoryview(self._map)
        self._run_ptr = ffi.from_buffer(self._map)
        self._run = ffi.cast("struct kvm_run *", self._run_ptr)
        self._run_addr = int(ffi.cast("uintptr_t", self._run_ptr))  # for pyvmm.runext
        self._fast, self._views = fast_exits(self._page)
        self._lock = threading.Lock()
        self._thread: int | None = None  # ident of the thread inside run()
        self._sigmask_owner: object | None = None  # the thread whose mask KVM has
        # Kick bookkeeping, all under _lock: the run()'s watchdog token, whether its timeout
        # fired, and whether a kick() from the application is outstanding.
        self._run_token: int | None = None
        self._timeout_fired = False
        self._kick_pending = False
        self._closing = False
        self._stats: StatsReader | None = None
        self.cpuid_set = False

    # -- basics --------------------------------------------------------------------------

    def fileno(self) -> int:
        """The vCPU fd (ClosedError once closed)."""
        if self._fd < 0:
            raise ClosedError(f"vCPU {self.id} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def cpu_vendor(self) -> str:
        """The CPU vendor KVM offers guests ("AuthenticAMD", "GenuineIntel", or "")."""
        return self._cpu_vendor()

    def ioctl(self, request: int, arg: object = 0, detail: str | None = None) -> int:
        """One ioctl on the vCPU fd. KVM serialises a vCPU's ioctls, so one issued while
        another thread is inside run() would wait for that run to end: that is refused with a
        RuntimeError instead (kick() the vCPU, or stop the run, first)."""
        thread = self._thread
        if thread is not None and thread != _get_ident():
            raise RuntimeError(f"vCPU {self.id} is running in another thread: its ioctls "
                               f"({io.NAMES.get(request, hex(request))}) would block until "
                               "that run() returns; stop or kick it first")
        try:
            return io.ioctl(self.fileno(), request, arg, self.role, detail)
        except KvmError as err:
            raise foreign_process(err, self._pid) from None

    @property
    def kvm_run(self):
        """The raw `struct kvm_run *` (for what the typed API does not cover). Each pointer
        holds the page mapped for as long as it lives, so it stays valid after close()."""
        if self._fd < 0 or self._map is None:
            raise ClosedError(f"vCPU {self.id} is closed")
        return ffi.from_buffer("struct kvm_run *", self._map, require_writable=True)

    # -- running -------------------------------------------------------------------------

    def _claim(self, timeout: float | None) -> int | None:
        """Make this thread the one inside run(); arms `timeout` once the run is ours, so a
        short deadline cannot fire before its run is registered (lock order: vCPU, then
        watchdog). Returns the watchdog token."""
        lock = self._lock
        lock.acquire()
        if self._fd < 0 or self._closing or self._thread is not None:
            closed = self._fd < 0 or self._closing
            lock.release()
            if closed:
                raise ClosedError(f"vCPU {self.id} is closed")
            raise RuntimeError(f"vCPU {self.id} is already running in another thread")
        self._thread = _get_ident()
        token = self._run_token = (watchdog.arm(self._timeout_kick, timeout)
                                   if timeout is not None else None)
        lock.release()
        return token

    def _leave(self, token: int | None) -> None:
        if token is not None:
            watchdog.disarm(token)
        lock = self._lock
        lock.acquire()
        self._thread = None
        self._run_token = None
        if self._timeout_fired:
            # The timeout fired after the run ended (on its own, or by an EINTR already
            # handled): withdraw that kick so it cannot end the next run(), unless the
            # application kicked too.
            self._timeout_fired = False
            if not self._kick_pending:
                self._run.immediate_exit = 0
                eat_kicks()
        lock.release()

    def _own_sigmask(self, token: object) -> None:
        # Once this thread owns the vCPU (another thread's KVM_RUN would block the ioctl) and
        # the kick signal is blocked here: KVM unblocks it only inside KVM_RUN.
        req = ffi.new("struct kvm_signal_mask *", {"len": 8, "sigset": 8})
        ffi.memmove(req.sigset, run_sigmask(), 8)
        try:
            io.ioctl(self._fd, io.KVM_SET_SIGNAL_MASK, req, self.role)
        except KvmError as err:
            raise foreign_process(err, self._pid) from None
        self._sigmask_owner = token

    def _interrupted(self, keep_kick: bool) -> bool:
        """After KVM_RUN's EINTR: consume the kick, say whether the run's timeout fired."""
        with self._lock:
            eat_kicks()
            timed_out = self._timeout_fired
            self._timeout_fired = False
            if keep_kick and self._kick_pending:
                self._run.immediate_exit = 1      # the application's kick is kept
            else:
                self._run.immediate_exit = 0
                self._kick_pending = False
        return timed_out

    def run(self, timeout: float | None = None) -> Exit:
        """KVM_RUN once; returns the typed exit. With `timeout` (seconds), a guest still
        running then is kicked and `IntrExit(timed_out=True)` comes back."""
        # The hot path of every exit (docs/ARCHITECTURE.md, "How an exit flows"): claim (inlined
        # _claim/_leave; acquire(False) first: CPython 3.11 reads the clock in a blocking one),
        # one C call, the exit built from its result and the vCPU's table, release.
        if timeout is not None:
            timeout = check_timeout(timeout)
        try:
            sigmask = _tls.token
        except AttributeError:
            sigmask = thread_token()
        lock = self._lock
        if not lock.acquire(False):
            lock.acquire()
        if self._fd < 0 or self._closing or self._thread is not None:
            lock.release()
            token = self._claim(timeout)  # raises (ClosedError, RuntimeError): re-checked there
        else:
            self._thread = _get_ident()
            token = self._run_token = (watchdog.arm(self._timeout_kick, timeout)
                                       if timeout is not None else None)
            lock.release()
        try:
            if self._sigmask_owner is not sigmask:
                self._own_sigmask(sigmask)
            if _run_exit is None:
                return self._run_slow(self._fd, self._page)
            fd, addr, fast = self._fd, self._run_addr, self._fast
            while True:
                r = _run_exit(fd, addr)
                if r > 0:
                    size, is_write, view = fast[r & 255]
                    if r & 1:   # IO
                        ex = _new(IoExit)
                        ex.port, ex.size, ex.count = r >> 8, size, 1
                    else:       # MMIO
                        ex = _new(MmioExit)
                        ex.address, ex.length = r >> 8, size
                    ex.is_write, ex.data = is_write, _view(view)
                    return ex
                if r == 0:
                    return decode(self._run, self._page)
                failed = self._failed(-r)
                if failed is not None:
                    return failed
        finally:
            if token is not None:
                watchdog.disarm(token)
            if not lock.acquire(False):
                lock.acquire()
            self._thread = None
            self._run_token = None
            if self._timeout_fired:
                self._timeout_fired = False   # see _leave
                if not self._kick_pending:
                    self._run.immediate_exit = 0
                    eat_kicks()
            lock.release()

    def _run_slow(self, fd: int, page: memoryview) -> Exit:
        run = self._run  # no compiled helper: KVM_RUN through _kvm_run, the page decoded
        while True:
            if _kvm_run(fd, _KVM_RUN, 0) >= 0:
                return decode(run, page)
            ex = self._failed(ffi.errno)
            if ex is not None:
                return ex

    def _failed(self, err: int) -> Exit | None:
        """A failed KVM_RUN's result: IntrExit, a memory fault, None to run again (EAGAIN: an
        AP woken by INIT/SIPI); any other errno is raised, kept."""
        if err == _EINTR:
            return IntrExit(self._interrupted(False))
        run = self._run
        if err == _EFAULT and run.exit_reason == _MEMORY_FAULT:
            # KVM reports a memory fault as -1/EFAULT with the exit filled in (api.rst,
            # KVM_EXIT_MEMORY_FAULT); the reason is cleared so a later, unrelated EFAULT is
            # not mistaken for it.
            ex = decode(run, self._page)
            run.exit_reason = 0
            return ex
        if err == _EAGAIN:
            return None
        raise foreign_process(KvmError(err, "KVM_RUN", self.role, f"vCPU {self.id}"),
                              self._pid)

    def complete_io(self) -> None:
        """Finish the last exit's I/O without entering the guest. KVM completes a PIO or
        MMIO exit (stores an IN's data, moves RIP past the instruction) only on the next
        KVM_RUN, and on some hosts (stock kvm_amd without next-RIP saving) RIP still points
        at the OUT until then. Call this before reading or replacing vCPU state after such an
        exit; it is a KVM_RUN with immediate_exit set, so the guest runs no instruction. A
        kick() still outstanding stays outstanding for the next run()."""
        sigmask = thread_token()
        token = self._claim(None)
        try:
            if self._sigmask_owner is not sigmask:
                self._own_sigmask(sigmask)
            self._run.immediate_exit = 1
            if _kvm_run(self._fd, _KVM_RUN, 0) >= 0:  # immediate_exit always gives EINTR
                raise KvmError(errno.EPROTO, "KVM_RUN", self.role, "expected an interrupted "
                               f"run, got {decode(self._run, self._page)!r}")
            err = ffi.errno
            if err != _EINTR:
                raise foreign_process(KvmError(err, "KVM_RUN", self.role, f"vCPU {self.id}"),
                                      self._pid)
            self._interrupted(True)
        finally:
            self._leave(token)

    def _timeout_kick(self, token: int) -> None:
        with self._lock:
            if self._run_token != token or self._thread is None:
                return  # that run() is over
            self._timeout_fired = True
            self._run.immediate_exit = 1
            signal.pthread_kill(self._thread, KICK_SIGNAL)

    def kick(self) -> None:
        """Make a run() in progress, or the next one, return IntrExit promptly."""
        with self._lock:
            if self._fd < 0:
                return
            self._kick_pending = True
            self._run.immediate_exit = 1
            if self._thread is not None:
                signal.pthread_kill(self._thread, KICK_SIGNAL)

    @property
    def running(self) -> bool:
        """Whether a thread is inside run() (or complete_io())."""
        return self._thread is not None

    @property
    def in_smm(self) -> bool:
        """Whether the vCPU was in System Management Mode when the last run() returned."""
        if self._run is None:
            raise ClosedError(f"vCPU {self.id} is closed")
        return bool(self._run.flags & KVM_RUN_X86_SMM)

    # -- stats ---------------------------------------------------------------------------

    def stats(self, histograms: bool = False) -> dict[str, int]:
        """The vCPU's counters from its binary stats fd (exits, io_exits, mmio_exits, ...)."""
        from .stats import StatsReader

        if self._stats is None:
            self._stats = StatsReader(self.ioctl(io.KVM_GET_STATS_FD))
        return self._stats.read(histograms)

    # -- lifetime ------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Close the vCPU. A run() in another thread is kicked and waited for first, so the
        kvm_run page is never unmapped under it."""
        with self._lock:
            if self._fd < 0:
                return
            self._closing = True
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                thread = self._thread
                if thread is None or thread == threading.get_ident():
                    break
                self._run.immediate_exit = 1
                signal.pthread_kill(thread, KICK_SIGNAL)
            if time.monotonic() > deadline:
                with self._lock:
                    self._closing = False
                raise TimeoutError(f"vCPU {self.id} did not leave KVM_RUN within {timeout}s")
            time.sleep(0.0005)
        with self._lock:
            if self._fd < 0:
                return
            if self._stats is not None:
                self._stats.close()
                self._stats = None
            ffi.release(self._run_ptr)
            self._run = self._run_ptr = None
            for view in self._views:   # templates only: an exit's view is its own
                view.release()
            self._fast = self._views = []
            try:
                self._page.release()
                self._map.close()
            except BufferError:
                pass  # an exit's view is alive: the page goes with the last such view
            self._page = self._map = None  # type: ignore[assignment]  # unread once _fd < 0
            os.close(self._fd)
            self._fd = -1
        if self._on_close is not None:
            self._on_close(self)

    def release_fds(self) -> None:
        """Close the fds only, touching no mapped memory (for finalizers: see Vm.__del__)."""
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, fd={self._fd})"
