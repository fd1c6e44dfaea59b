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

from . import ioctls as io
from ._ffi import ffi, libc
from .errors import ClosedError, KvmError, foreign_process
from .exits import Exit, ExitReason, IntrExit, decode
from .kick import KICK_SIGNAL, check_timeout, eat_kicks, run_sigmask, thread_token, watchdog
from .vcpu_state import VcpuStateMixin

__all__ = ["KICK_SIGNAL", "KVM_RUN_X86_SMM", "Vcpu", "watchdog"]

KVM_RUN_X86_SMM = 1
_EINTR, _EAGAIN, _EFAULT = errno.EINTR, errno.EAGAIN, errno.EFAULT
_MEMORY_FAULT = int(ExitReason.MEMORY_FAULT)
_get_ident = threading.get_ident
_KVM_RUN = io.KVM_RUN
# KVM_RUN through a non-variadic function pointer to libc's ioctl: cffi calls a variadic
# function by preparing a new libffi call interface on every call (about 1 us here, per exit),
# a fixed prototype reuses one. Integer arguments are passed identically either way (libffi
# also sets AL, the vector-register count a variadic callee reads, to 0).
_kvm_run = ffi.cast("int (*)(int, unsigned long, unsigned long)", ffi.addressof(libc, "ioctl"))


class Vcpu(VcpuStateMixin):
    """One vCPU. Made by `Vm.create_vcpu()`, which gives it what it needs: the kvm_run size,
    a provider of the supported-CPUID buffer, the vendor, whether SMM exists, and a callback
    for when it closes. It holds no reference back to its VM."""

    role = "vcpu"

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int, *,
                 supported_cpuid_buffer: Callable[[], object],
                 cpu_vendor: Callable[[], str] = lambda: "", has_smm: bool = False,
                 on_close: Callable[[Vcpu], None] | None = None) -> None:
        self.id = vcpu_id
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
        self._lock = threading.Lock()
        self._thread: int | None = None  # ident of the thread inside run()
        self._sigmask_owner: object | None = None  # the thread whose mask KVM has
        # Kick bookkeeping, all under _lock: the run()'s watchdog token, whether its timeout
        # fired, and whether a kick() from the application is outstanding.
        self._run_token: int | None = None
        self._timeout_fired = False
        self._kick_pending = False
        self._closing = False
        self._stats = None
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
        # The hot path of every exit: no lock is taken with `with`, KVM_RUN goes through
        # _kvm_run (see there), not the variadic libc.ioctl, and the timeout is checked only
        # when there is one.
        if timeout is not None:
            timeout = check_timeout(timeout)
        sigmask = thread_token()
        token = self._claim(timeout)
        try:
            if self._sigmask_owner is not sigmask:
                self._own_sigmask(sigmask)
            fd, page, run = self._fd, self._page, self._run
            while True:
                if _kvm_run(fd, _KVM_RUN, 0) >= 0:
                    return decode(run, page)
                err = ffi.errno
                if err == _EINTR:
                    return IntrExit(self._interrupted(False))
                if err == _EFAULT and run.exit_reason == _MEMORY_FAULT:
                    # KVM reports a memory fault as -1/EFAULT with the exit filled in
                    # (api.rst, KVM_EXIT_MEMORY_FAULT); the reason is cleared so a later,
                    # unrelated EFAULT is not mistaken for it.
                    ex = decode(run, page)
                    run.exit_reason = 0
                    return ex
                if err != _EAGAIN:  # EAGAIN: an AP woken by INIT/SIPI; simply run again
                    raise foreign_process(KvmError(err, "KVM_RUN", self.role,
                                                   f"vCPU {self.id}"), self._pid)
        finally:
            self._leave(token)

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
            try:
                self._page.release()
                self._map.close()
            except BufferError:
                pass  # an exit's view is alive: the page goes with the last such view
            self._page = self._map = None
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

    # -- guest debugging --

    def set_guest_debug(self, *, single_step: bool = False, sw_breakpoints: bool = False,
                        hw_breakpoints=(), inject: int | None = None,
                        block_irqs: bool = False) -> None:
        """KVM_SET_GUEST_DEBUG: stop with a DebugExit after every instruction
        (`single_step`), at the guest's int3 (`sw_breakpoints`), at up to four debug-register
        breakpoints and watchpoints (`hw_breakpoints`: `guestdebug.HwBreakpoint`s or
        addresses). Every call replaces the whole configuration; no arguments turn it off.
        `inject=1` or `3` gives the guest a #DB or #BP of its own on the next run();
        `block_irqs` steps without taking interrupts (KVM_GUESTDBG_BLOCKIRQ)."""
        from .guestdebug import set_guest_debug

        set_guest_debug(self, single_step=single_step, sw_breakpoints=sw_breakpoints,
                        hw_breakpoints=hw_breakpoints, inject=inject, block_irqs=block_irqs)

    def translate(self, gva: int):
        """KVM_TRANSLATE: the guest-physical address of the linear address `gva` under the
        vCPU's current paging, as a `guestdebug.Translation(gpa, valid, writeable,
        usermode)`."""
        from .guestdebug import translate

        return translate(self, gva)

    # -- x86 state --
    # Thin faces of pyvmm.state (the ioctl and struct work lives there).

    def get_xsave(self, *, xsave2: bool | None = None):
        """KVM_GET_XSAVE2 (KVM_CAP_XSAVE2's size) or KVM_GET_XSAVE: a `pyvmm.state.Xsave`."""
        from .state import cpu
        return cpu.get_xsave(self, xsave2=xsave2)

    def set_xsave(self, xsave) -> None:
        """KVM_SET_XSAVE of a `pyvmm.state.Xsave`."""
        from .state import cpu
        cpu.set_xsave(self, xsave)

    def get_xcrs(self):
        """KVM_GET_XCRS: a `pyvmm.state.Xcrs` (XCR0 and any others)."""
        from .state import cpu
        return cpu.get_xcrs(self)

    def set_xcrs(self, xcrs) -> None:
        """KVM_SET_XCRS."""
        from .state import cpu
        cpu.set_xcrs(self, xcrs)

    def get_debugregs(self):
        """KVM_GET_DEBUGREGS: a `pyvmm.state.DebugRegs` (db[0..3], dr6, dr7)."""
        from .state import cpu
        return cpu.get_debugregs(self)

    def set_debugregs(self, regs) -> None:
        """KVM_SET_DEBUGREGS."""
        from .state import cpu
        cpu.set_debugregs(self, regs)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency in kHz."""
        from .state import cpu
        return cpu.get_tsc_khz(self)

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (needs KVM_CAP_TSC_CONTROL unless `khz` is already the rate)."""
        from .state import cpu
        cpu.set_tsc_khz(self, khz)

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest's kvmclock the host paused it."""
        from .state import cpu
        cpu.kvmclock_ctrl(self)

    def get_nested_state(self) -> bytes:
        """KVM_GET_NESTED_STATE (where the host has KVM_CAP_NESTED_STATE)."""
        from .state import cpu
        return cpu.get_nested_state(self)

    def set_nested_state(self, data: bytes) -> None:
        """KVM_SET_NESTED_STATE."""
        from .state import cpu
        cpu.set_nested_state(self, data)

    def set_sync_regs(self, mask: int) -> None:
        """Have KVM fill kvm_run's s.regs at every exit with these sets (pyvmm.state.SYNC_*)."""
        from .state import syncregs
        syncregs.set_sync_regs(self, mask)

    def get_synced_regs(self):
        """Copies of the register sets KVM synced at the last exit (`SyncedRegs`)."""
        from .state import syncregs
        return syncregs.get_synced_regs(self)

    def put_synced_regs(self, *, regs=None, sregs=None, events=None) -> None:
        """Write register sets into kvm_run for the next KVM_RUN to load (kvm_dirty_regs)."""
        from .state import syncregs
        syncregs.put_synced_regs(self, regs=regs, sregs=sregs, events=events)

    def save_state(self, *, complete_io: bool = True):
        """Everything KVM needs to resume this vCPU: a picklable `pyvmm.state.VcpuState`."""
        from .state import vcpu_state
        return vcpu_state.save_vcpu_state(self, complete_io=complete_io)

    def load_state(self, state) -> None:
        """Load a VcpuState into this fresh vCPU, in the order KVM requires."""
        from .state import vcpu_state
        vcpu_state.load_vcpu_state(self, state)
