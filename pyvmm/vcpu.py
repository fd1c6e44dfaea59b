"""`Vcpu`: a vCPU fd, its mmapped kvm_run page, and the run/kick machinery.

Kicking without a lost wake-up: the kick signal is blocked in every thread that runs a vCPU
and unblocked only inside KVM_RUN (KVM_SET_SIGNAL_MASK). A kick sets `immediate_exit` and
signals the running thread. If the signal lands while the thread is in userspace it stays
pending, and the next KVM_RUN returns EINTR at once; if it lands inside KVM_RUN the guest
is interrupted. Either way the kick is never lost, and the pending signal is consumed with
sigtimedwait after the EINTR, so it is never delivered to a handler.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import mmap
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Callable

from . import ioctls as io
from ._ffi import ffi, libc
from .caps import Cap
from .errors import ClosedError, KvmError, MissingCapability
from .exits import Exit, IntrExit, decode
from .kvm import CpuidEntry, cpuid_from_c, cpuid_to_c
from .structs import Fpu, LapicState, Regs, Sregs, VcpuEvents

if TYPE_CHECKING:
    from .vm import Vm

#: The signal used to kick vCPU threads out of KVM_RUN (a real-time one, so SIGUSR1/2 stay
#: the application's). Override with PYVMM_KICK_SIGNAL before importing pyvmm.
KICK_SIGNAL = int(os.environ.get("PYVMM_KICK_SIGNAL", signal.SIGRTMIN + 3))

KVM_RUN_X86_SMM = 1
_ZERO = ffi.cast("unsigned long", 0)
_EINTR, _EAGAIN = errno.EINTR, errno.EAGAIN
_get_ident = threading.get_ident
_thread_state = threading.local()  # .token: this thread blocks the kick signal
_KVM_RUN = io.KVM_RUN
# KVM_RUN through a non-variadic function pointer to libc's ioctl: cffi calls a variadic
# function by preparing a new libffi call interface on every call (about 1 us here, per exit),
# a fixed prototype reuses one. Integer arguments are passed identically either way (libffi
# also sets AL, the vector-register count a variadic callee reads, to 0).
_kvm_run = ffi.cast("int (*)(int, unsigned long, unsigned long)", ffi.addressof(libc, "ioctl"))


def _install_kick_handler() -> None:
    # The signal is always blocked or consumed, never delivered; a handler is installed anyway
    # so that a stray kick could never take the default action (terminate).
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, lambda signum, frame: None)


_install_kick_handler()


class Watchdog:
    """One thread for every deadline in pyvmm (run timeouts of vCPUs and machines): calls
    `callback(token)` when a deadline armed with `arm()` passes before `disarm(token)`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Callable[[int], None]] = {}
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, callback: Callable[[int], None], timeout: float) -> int:
        token = next(self._seq)
        deadline = time.monotonic() + timeout
        with self._cond:
            self._armed[token] = callback
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pyvmm-watchdog",
                                                daemon=True)
                self._thread.start()
            if earliest:  # otherwise the thread already sleeps less than this deadline
                self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)
            # Disarmed entries leave the heap lazily; keep them from piling up under a
            # long-lived earlier deadline.
            if len(self._heap) > 64 and len(self._heap) > 2 * len(self._armed):
                self._heap = [e for e in self._heap if e[1] in self._armed]
                heapq.heapify(self._heap)

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                callback = self._armed.pop(token)
                self._cond.release()  # never hold the watchdog's lock while taking a vCPU's
                try:
                    callback(token)
                except Exception:
                    pass  # a deadline's callback must not end the thread serving all others
                finally:
                    del callback
                    self._cond.acquire()


watchdog = Watchdog()


def _check_msr_indices(indices: list[int]) -> None:
    for index in indices:
        if not 0 <= index < 1 << 32:
            raise ValueError(f"MSR index {index:#x} is outside 0..0xffffffff")


def _eat_kicks() -> None:
    """Consume kick signals pending on this thread (where the signal is blocked)."""
    while signal.sigtimedwait((KICK_SIGNAL,), 0) is not None:
        pass


def _sigset_bytes(signals: Iterable[int]) -> bytes:
    bits = 0
    for sig in signals:
        bits |= 1 << (int(sig) - 1)
    return bits.to_bytes(8, "little")


class Vcpu:
    role = "vcpu"

    def __init__(self, vm: Vm, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self._fd = fd
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
        if self._fd < 0:
            raise ClosedError(f"vCPU {self.id} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _ioctl(self, request: int, arg=_ZERO, detail: str | None = None) -> int:
        return io.ioctl(self.fileno(), request, arg, self.role, detail)

    @property
    def kvm_run(self):
        """The raw `struct kvm_run *` (for what the typed API does not cover)."""
        return self._run

    # -- running -------------------------------------------------------------------------

    def _prepare_thread(self, thread_token: object) -> None:
        # Called once this thread owns the vCPU (another thread's KVM_RUN would block the
        # ioctl) and after the kick signal is already blocked here.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        inside = set(old) - {KICK_SIGNAL}
        req = ffi.new("struct kvm_signal_mask *", {"len": 8, "sigset": 8})
        ffi.memmove(req.sigset, _sigset_bytes(inside), 8)
        self._ioctl(io.KVM_SET_SIGNAL_MASK, req)
        self._sigmask_owner = thread_token

    def run(self, timeout: float | None = None) -> Exit:
        """KVM_RUN once; returns the typed exit. With `timeout` (seconds), a guest still
        running then is kicked and `IntrExit(timed_out=True)` comes back."""
        return self._enter(timeout, False)

    def complete_io(self) -> None:
        """Finish the last exit's I/O without entering the guest. KVM completes a PIO or
        MMIO exit (stores an IN's data, moves RIP past the instruction) only on the next
        KVM_RUN, and on some hosts (stock kvm_amd without next-RIP saving) RIP still points
        at the OUT until then. Call this before reading or replacing vCPU state after such an
        exit; it is a KVM_RUN with immediate_exit set, so the guest runs no instruction. A
        kick() still outstanding stays outstanding for the next run()."""
        exit = self._enter(None, True)
        if not isinstance(exit, IntrExit):  # immediate_exit always gives EINTR
            raise KvmError(errno.EPROTO, "KVM_RUN", self.role,
                           f"expected an interrupted run, got {exit!r}")

    def _enter(self, timeout: float | None, complete_only: bool) -> Exit:
        # The hot path of every exit: the lock is taken with acquire()/release() rather than
        # `with`, and KVM_RUN goes through _kvm_run (see there), not the variadic libc.ioctl.
        tls = _thread_state
        thread_token = getattr(tls, "token", None)
        if thread_token is None:
            # Blocked before this thread can be named as the target of a kick. Per thread,
            # not per thread id: Python reuses the ids of threads that have ended.
            signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
            thread_token = tls.token = object()
        ident = _get_ident()
        lock = self._lock
        lock.acquire()
        if self._fd < 0 or self._closing or self._thread is not None:
            closed = self._fd < 0 or self._closing
            lock.release()
            if closed:
                raise ClosedError(f"vCPU {self.id} is closed")
            raise RuntimeError(f"vCPU {self.id} is already running in another thread")
        self._thread = ident
        # Armed only now that the run is ours, so a short deadline cannot fire before the
        # run() it belongs to is registered (lock order: vCPU, then watchdog).
        token = self._run_token = (watchdog.arm(self._timeout_kick, timeout)
                                   if timeout is not None else None)
        run = self._run
        if complete_only:
            run.immediate_exit = 1
        lock.release()
        try:
            if self._sigmask_owner is not thread_token:
                self._prepare_thread(thread_token)
            fd, page = self._fd, self._page
            while True:
                if _kvm_run(fd, _KVM_RUN, 0) >= 0:
                    return decode(run, page)
                err = ffi.errno
                if err == _EINTR:
                    with lock:
                        _eat_kicks()
                        timed_out = self._timeout_fired
                        self._timeout_fired = False
                        if complete_only and self._kick_pending:
                            run.immediate_exit = 1      # the application's kick is kept
                        else:
                            run.immediate_exit = 0
                            self._kick_pending = False
                    return IntrExit(timed_out)
                if err != _EAGAIN:  # EAGAIN: an AP woken by INIT/SIPI; simply run again
                    raise KvmError(err, "KVM_RUN", self.role, f"vCPU {self.id}")
        finally:
            if token is not None:
                watchdog.disarm(token)
            lock.acquire()
            self._thread = None
            self._run_token = None
            if self._timeout_fired:
                # The timeout fired after the run ended (on its own, or by an EINTR already
                # handled): withdraw that kick so it cannot end the next run(), unless the
                # application kicked too.
                self._timeout_fired = False
                if not self._kick_pending:
                    run.immediate_exit = 0
                    _eat_kicks()
            lock.release()

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
        return self._thread is not None

    @property
    def in_smm(self) -> bool:
        """Whether the vCPU was in System Management Mode when the last run() returned."""
        if self._run is None:
            raise ClosedError(f"vCPU {self.id} is closed")
        return bool(self._run.flags & KVM_RUN_X86_SMM)

    # -- registers -----------------------------------------------------------------------

    def get_regs(self) -> Regs:
        regs = Regs()
        self._ioctl(io.KVM_GET_REGS, regs._c)
        return regs

    def set_regs(self, regs: Regs) -> None:
        self._ioctl(io.KVM_SET_REGS, Regs.cast(regs)._c)

    def get_sregs(self) -> Sregs:
        sregs = Sregs()
        self._ioctl(io.KVM_GET_SREGS, sregs._c)
        return sregs

    def set_sregs(self, sregs: Sregs) -> None:
        self._ioctl(io.KVM_SET_SREGS, Sregs.cast(sregs)._c)

    def get_fpu(self) -> Fpu:
        fpu = Fpu()
        self._ioctl(io.KVM_GET_FPU, fpu._c)
        return fpu

    def set_fpu(self, fpu: Fpu) -> None:
        self._ioctl(io.KVM_SET_FPU, Fpu.cast(fpu)._c)

    def get_lapic(self) -> LapicState:
        lapic = LapicState()
        self._ioctl(io.KVM_GET_LAPIC, lapic._c)
        return lapic

    def set_lapic(self, lapic: LapicState) -> None:
        self._ioctl(io.KVM_SET_LAPIC, LapicState.cast(lapic)._c)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        indices = list(indices)
        _check_msr_indices(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = self._ioctl(io.KVM_GET_MSRS, buf)
        if done < len(indices):
            raise KvmError(errno.EINVAL, "KVM_GET_MSRS", self.role,
                           f"MSR {indices[done]:#x} cannot be read")
        return {buf.entries[i].index: buf.entries[i].data for i in range(len(indices))}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        items = list(values.items())
        _check_msr_indices([index for index, _ in items])
        for index, value in items:
            if not 0 <= value < 1 << 64:
                raise ValueError(f"MSR {index:#x} value {value:#x} does not fit in 64 bits")
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, value) in enumerate(items):
            buf.entries[i].index = index
            buf.entries[i].data = value
        done = self._ioctl(io.KVM_SET_MSRS, buf)
        if done < len(items):
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS", self.role,
                           f"KVM rejected MSR {items[done][0]:#x} = {items[done][1]:#x}")

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        self._ioctl(io.KVM_SET_CPUID2, cpuid_to_c(entries))
        self.cpuid_set = True

    def set_supported_cpuid(self) -> None:
        """KVM_SET_CPUID2 with everything this KVM supports (the usual choice)."""
        self._ioctl(io.KVM_SET_CPUID2, self.vm.kvm.supported_cpuid_buffer())
        self.cpuid_set = True

    def get_cpuid(self) -> list[CpuidEntry]:
        nent = 256
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
        self._ioctl(io.KVM_GET_CPUID2, buf)
        return cpuid_from_c(buf)

    def get_events(self) -> VcpuEvents:
        events = VcpuEvents()
        self._ioctl(io.KVM_GET_VCPU_EVENTS, events._c)
        return events

    def set_events(self, events: VcpuEvents) -> None:
        self._ioctl(io.KVM_SET_VCPU_EVENTS, VcpuEvents.cast(events)._c)

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        self._ioctl(io.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        self._ioctl(io.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the vCPU fd with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        req = ffi.new("struct kvm_enable_cap *", {"cap": int(cap), "flags": flags,
                                                   "args": list(args)})
        self._ioctl(io.KVM_ENABLE_CAP, req)

    # -- events --------------------------------------------------------------------------

    def smi(self) -> None:
        """KVM_SMI: queue a System Management Interrupt for this vCPU."""
        if not self.vm.check_extension(Cap.X86_SMM):
            raise MissingCapability(Cap.X86_SMM, "KVM_SMI", self.role,
                                    "no System Management Mode on this host (stock KVM has "
                                    "it: try `pyvmm nested`)")
        self._ioctl(io.KVM_SMI)

    def nmi(self) -> None:
        self._ioctl(io.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: inject an external interrupt (only without the in-kernel irqchip)."""
        if not 0 <= vector <= 255:
            raise ValueError(f"interrupt vector {vector} is outside 0..255")
        self._ioctl(io.KVM_INTERRUPT, ffi.new("uint32_t *", vector))

    # -- stats ---------------------------------------------------------------------------

    def stats(self, histograms: bool = False) -> dict[str, int]:
        """The vCPU's counters from its binary stats fd (exits, io_exits, mmio_exits, ...)."""
        from .stats import StatsReader

        if self._stats is None:
            self._stats = StatsReader(self._ioctl(io.KVM_GET_STATS_FD))
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
        self.vm._forget_vcpu(self)

    def _release_fd(self) -> None:
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
