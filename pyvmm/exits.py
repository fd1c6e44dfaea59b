"""Typed exits: `Vcpu.run()` returns one of these per KVM_RUN return.

Each class carries exactly the data of its exit. Memoryviews (`IoExit.data`, `MmioExit.data`)
point into the vCPU's kvm_run page and stay valid until the next `run()`: for IN and MMIO
reads, fill them before running again; for writes, copy them if you need them later.
Settable fields of hypercall and MSR exits write through to kvm_run and reach the guest on the
next `run()`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from ._ffi import ffi
from .exit_answered import HypercallExit, MsrExit
from .exit_base import Exit, ExitReason

_R = ExitReason


class IoExit(Exit):
    """Port I/O. `data` holds `size * count` bytes: what was written (OUT, OUTS) or the buffer
    to fill (IN, INS)."""

    __slots__ = ("count", "data", "is_write", "port", "size")
    exit_reason = _R.IO

    def __init__(self, port: int, size: int, count: int, is_write: bool, data: memoryview):
        self.port, self.size, self.count = port, size, count
        self.is_write, self.data = is_write, data

    def detached(self) -> IoExit:
        return IoExit(self.port, self.size, self.count, self.is_write,
                      memoryview(bytearray(self.data)))

    @property
    def value(self) -> int:
        """The data as a little-endian integer (for a single, non-string access)."""
        return int.from_bytes(self.data[: self.size], "little")


class MmioExit(Exit):
    """An access to guest-physical memory that no writable memslot backs."""

    __slots__ = ("address", "data", "is_write", "length")
    exit_reason = _R.MMIO

    def __init__(self, address: int, length: int, is_write: bool, data: memoryview):
        self.address, self.length, self.is_write, self.data = address, length, is_write, data

    def detached(self) -> MmioExit:
        return MmioExit(self.address, self.length, self.is_write,
                        memoryview(bytearray(self.data)))

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")


class HltExit(Exit):
    __slots__ = ()
    exit_reason = _R.HLT


class ShutdownExit(Exit):
    """Triple fault (or another shutdown): the vCPU cannot go on."""

    __slots__ = ()
    exit_reason = _R.SHUTDOWN


class IntrExit(Exit):
    """KVM_RUN was interrupted by a signal: a kick, a run timeout, or a signal such as SIGINT.
    `timed_out` says the run's own timeout fired."""

    __slots__ = ("timed_out",)
    exit_reason = _R.INTR

    def __init__(self, timed_out: bool = False):
        self.timed_out = timed_out


class SystemEventExit(Exit):
    __slots__ = ("data", "type")
    exit_reason = _R.SYSTEM_EVENT

    def __init__(self, type: int, data: tuple[int, ...]):
        self.type, self.data = type, data


class FailEntryExit(Exit):
    """The hardware refused to enter the guest (invalid guest state)."""

    __slots__ = ("cpu", "reason")
    exit_reason = _R.FAIL_ENTRY

    def __init__(self, reason: int, cpu: int):
        self.reason, self.cpu = reason, cpu


class InternalErrorExit(Exit):
    """KVM could not handle the exit itself (suberror 1: emulation failure)."""

    __slots__ = ("data", "suberror")
    exit_reason = _R.INTERNAL_ERROR

    def __init__(self, suberror: int, data: tuple[int, ...]):
        self.suberror, self.data = suberror, data


class DebugExit(Exit):
    """A guest-debugging stop: `exception` 1 (#DB, the cause in `dr6`) or 3 (#BP, at `pc`)."""

    __slots__ = ("dr6", "dr7", "exception", "pc")
    exit_reason = _R.DEBUG

    def __init__(self, exception: int, pc: int, dr6: int, dr7: int):
        self.exception, self.pc, self.dr6, self.dr7 = exception, pc, dr6, dr7

    single_step = property(lambda self: self.exception == 1 and bool(self.dr6 >> 14 & 1),
                           doc="DR6.BS: the stop follows a single step.")
    breakpoints = property(lambda self: tuple(i for i in range(4) if self.dr6 >> i & 1)
                           if self.exception == 1 else (), doc="DR6.B0-B3: the slots hit.")


class ExceptionExit(Exit):
    __slots__ = ("error_code", "exception")
    exit_reason = _R.EXCEPTION

    def __init__(self, exception: int, error_code: int):
        self.exception, self.error_code = exception, error_code


class IrqWindowOpenExit(Exit):
    __slots__ = ()
    exit_reason = _R.IRQ_WINDOW_OPEN


class SetTprExit(Exit):
    __slots__ = ()
    exit_reason = _R.SET_TPR


class TprAccessExit(Exit):
    __slots__ = ("is_write", "rip")
    exit_reason = _R.TPR_ACCESS

    def __init__(self, rip: int, is_write: bool):
        self.rip, self.is_write = rip, is_write


class NmiExit(Exit):
    __slots__ = ()
    exit_reason = _R.NMI


class IoapicEoiExit(Exit):
    __slots__ = ("vector",)
    exit_reason = _R.IOAPIC_EOI

    def __init__(self, vector: int):
        self.vector = vector


class DirtyRingFullExit(Exit):
    __slots__ = ()
    exit_reason = _R.DIRTY_RING_FULL


class ApResetHoldExit(Exit):
    __slots__ = ()
    exit_reason = _R.AP_RESET_HOLD


class BusLockExit(Exit):
    __slots__ = ()
    exit_reason = _R.X86_BUS_LOCK


class NotifyExit(Exit):
    __slots__ = ("flags",)
    exit_reason = _R.NOTIFY

    def __init__(self, flags: int):
        self.flags = flags


class MemoryFaultExit(Exit):
    __slots__ = ("flags", "gpa", "size")
    exit_reason = _R.MEMORY_FAULT

    def __init__(self, flags: int, gpa: int, size: int):
        self.flags, self.gpa, self.size = flags, gpa, size


class RawExit(Exit):
    """An exit whose payload pyvmm does not decode (Hyper-V, Xen): the 256 raw union bytes."""

    __slots__ = ("exit_reason", "raw")

    def __init__(self, exit_reason: int, raw: bytes):
        self.exit_reason, self.raw = exit_reason, raw


class UnknownExit(Exit):
    """KVM_EXIT_UNKNOWN (with the hardware's own exit reason), or a reason this pyvmm does not
    know."""

    __slots__ = ("hardware_exit_reason", "reason")

    def __init__(self, reason: int, hardware_exit_reason: int = 0):
        self.reason, self.hardware_exit_reason = reason, hardware_exit_reason

    @property
    def exit_reason(self) -> int:  # type: ignore[override]
        return self.reason


# --- decoding -------------------------------------------------------------------------------

_UNION = ffi.offsetof("struct kvm_run", "hw")
_MMIO_DATA = _UNION + 8
#: Where kvm_run.mmio.data is in the vCPU's page (for Vcpu.run()'s fast path).
MMIO_DATA_OFFSET = _MMIO_DATA
_PIO_DATA = 4096  # a single PIO access's data (the compiled helper's IO kind promises it)


# The two hottest exits are unpacked straight from the page: one struct call is several times
# cheaper than walking the cffi struct field by field.
_MMIO_FIELDS = struct.Struct("<Q8xIB")      # phys_addr, (data), len, is_write
_REASON = struct.Struct("<I")
_REASON_OFFSET = ffi.offsetof("struct kvm_run", "exit_reason")
# exit_reason, then the io fields (direction, size, port, count, data_offset) at the union:
# what decode() reads first.
_HEAD = struct.Struct(f"<{_REASON_OFFSET}xI{_UNION - _REASON_OFFSET - 4}xBBHIQ")
assert ffi.offsetof("struct kvm_run", "io") == _UNION and _UNION == 32


def _mmio(run, page: memoryview) -> Exit:
    address, length, is_write = _MMIO_FIELDS.unpack_from(page, _UNION)
    if length > 8:  # kvm_run.mmio.data holds 8 bytes; the kernel never says more
        length = 8
    return MmioExit(address, length, is_write == 1, page[_MMIO_DATA: _MMIO_DATA + length])


def fast_exits(page: memoryview) -> tuple[list[Any], list[memoryview]]:
    """What `Vcpu.run()` builds a PIO or MMIO exit from, per vCPU: indexed by the low byte of
    the compiled helper's result (pyvmm/_build_runext.py: kind, write bit, size), `(size,
    is_write, view)` where `view` is a template view of the exit's data in `page`, which each
    exit copies (`memoryview(view)`: a new view of the same bytes, about half the cost of
    slicing the page); and the templates, which the vCPU releases when it closes (an exit's
    own view keeps the mapping alive, as a slice of the page does)."""
    table: list[Any] = [None] * 256
    views = [page[_PIO_DATA: _PIO_DATA + n] for n in range(16)]
    views += [page[_MMIO_DATA: _MMIO_DATA + n] for n in range(9)]
    for size in range(16):
        for write in (0, 1):
            table[1 | write << 3 | size << 4] = (size, write == 1, views[size])
            length = min(size, 8)
            table[2 | write << 3 | size << 4] = (length, write == 1, views[16 + length])
    return table, views


def _hypercall(run, page):
    hc = run.hypercall
    return HypercallExit(run, hc.nr, tuple(hc.args), hc.longmode, page[:0])


def _msr(run, page):
    msr = run.msr
    return MsrExit(run, msr.index, run.exit_reason == _R.X86_WRMSR, msr.reason, page[:0])


def _internal(run, page):
    internal = run.internal
    return InternalErrorExit(internal.suberror, tuple(internal.data[0: min(internal.ndata, 16)]))


def _system_event(run, page):
    ev = run.system_event
    return SystemEventExit(ev.type, tuple(ev.data[0: min(ev.ndata, 16)]))


def _raw(run, page):
    return RawExit(run.exit_reason, bytes(page[_UNION: _UNION + 256]))


_DECODERS: dict[int, Callable[[Any, memoryview], Exit]] = {
    _R.UNKNOWN: lambda run, page: UnknownExit(0, run.hw.hardware_exit_reason),
    _R.EXCEPTION: lambda run, page: ExceptionExit(run.ex.exception, run.ex.error_code),
    _R.HYPERCALL: _hypercall,
    _R.DEBUG: lambda run, page: DebugExit(run.debug.arch.exception, run.debug.arch.pc,
                                          run.debug.arch.dr6, run.debug.arch.dr7),
    _R.HLT: lambda run, page: HltExit(),
    _R.IRQ_WINDOW_OPEN: lambda run, page: IrqWindowOpenExit(),
    _R.SHUTDOWN: lambda run, page: ShutdownExit(),
    _R.FAIL_ENTRY: lambda run, page: FailEntryExit(
        run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu),
    _R.INTR: lambda run, page: IntrExit(),
    _R.SET_TPR: lambda run, page: SetTprExit(),
    _R.TPR_ACCESS: lambda run, page: TprAccessExit(run.tpr_access.rip,
                                                   bool(run.tpr_access.is_write)),
    _R.NMI: lambda run, page: NmiExit(),
    _R.INTERNAL_ERROR: _internal,
    _R.SYSTEM_EVENT: _system_event,
    _R.IOAPIC_EOI: lambda run, page: IoapicEoiExit(run.eoi.vector),
    _R.HYPERV: _raw,
    _R.X86_RDMSR: _msr,
    _R.X86_WRMSR: _msr,
    _R.DIRTY_RING_FULL: lambda run, page: DirtyRingFullExit(),
    _R.AP_RESET_HOLD: lambda run, page: ApResetHoldExit(),
    _R.X86_BUS_LOCK: lambda run, page: BusLockExit(),
    _R.XEN: _raw,
    _R.NOTIFY: lambda run, page: NotifyExit(run.notify.flags),
    _R.MEMORY_FAULT: lambda run, page: MemoryFaultExit(run.memory_fault.flags,
                                                       run.memory_fault.gpa,
                                                       run.memory_fault.size),
}

# A list indexed by reason keeps the per-exit lookup cheap on the hot path.
_TABLE: list[Callable[[Any, memoryview], Exit] | None] = [None] * (max(_DECODERS) + 1)
for _reason, _decoder in _DECODERS.items():
    _TABLE[_reason] = _decoder


def decode(run, page: memoryview) -> Exit:
    """Turn the exit recorded in `run` (a `struct kvm_run *`) into a typed exit. `page` is a
    memoryview of the whole vCPU mmap, which the data views slice."""
    # One unpack reads the exit reason and, in case it is KVM_EXIT_IO (the common case), the
    # io fields; IO and MMIO skip the table lookup.
    reason, direction, size, port, count, offset = _HEAD.unpack_from(page, 0)
    if reason == 2:  # KVM_EXIT_IO
        return IoExit(port, size, count, direction == 1, page[offset: offset + size * count])
    if reason == 6:  # KVM_EXIT_MMIO
        return _mmio(run, page)
    decoder = _TABLE[reason] if reason < len(_TABLE) else None
    if decoder is None:
        return UnknownExit(reason)
    return decoder(run, page)


__all__ = [name for name, obj in globals().items()
           if isinstance(obj, type) and issubclass(obj, Exit) and not name.startswith("_")]
__all__.append("ExitReason")
