# SPDX-License-Identifier: GPL-2.0-or-later
"""The state accessors of a vCPU (registers, MSRs, CPUID, events, MP state, interrupts): one
ioctl each, on the vCPU handle's public `ioctl()`. `Vcpu` inherits them."""

from __future__ import annotations

import errno
from enum import IntEnum
from collections.abc import Callable, Iterable, Mapping

from . import ioctls as io
from ._ffi import ffi
from .caps import Cap
from .errors import KvmError, MissingCapability
from .cpuid import CpuidEntry, cpuid_from_c, cpuid_to_c, grow_cpuid
from .structs import Fpu, LapicState, Regs, Sregs, VcpuEvents

__all__ = ["MpState", "VcpuStateMixin", "check_msr_indices"]


class MpState(IntEnum):
    """KVM_GET/SET_MP_STATE values (x86). With the in-kernel irqchip the APs (vCPUs 1 and
    up) start UNINITIALIZED and wait in KVM_RUN for INIT and SIPI; set RUNNABLE to start one
    from the host instead."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


def check_msr_indices(indices: list[int]) -> None:
    """ValueError for an MSR index that does not fit KVM's 32 bits."""
    for index in indices:
        if not 0 <= index < 1 << 32:
            raise ValueError(f"MSR index {index:#x} is outside 0..0xffffffff")


class VcpuStateMixin:
    """Register, MSR, CPUID and event accessors of `Vcpu` (which provides `ioctl`, `role`,
    `id`, `has_smm`, `supported_cpuid_buffer` and `cpuid_set`)."""

    role: str
    id: int
    has_smm: bool
    cpuid_set: bool
    supported_cpuid_buffer: Callable[[], object]

    def ioctl(self, request: int, arg: object = 0, detail: str | None = None) -> int:
        raise NotImplementedError

    # -- registers -----------------------------------------------------------------------

    def get_regs(self) -> Regs:
        regs = Regs()
        self.ioctl(io.KVM_GET_REGS, regs.cdata)
        return regs

    def set_regs(self, regs: Regs) -> None:
        self.ioctl(io.KVM_SET_REGS, Regs.cast(regs).cdata)

    def get_sregs(self) -> Sregs:
        sregs = Sregs()
        self.ioctl(io.KVM_GET_SREGS, sregs.cdata)
        return sregs

    def set_sregs(self, sregs: Sregs) -> None:
        self.ioctl(io.KVM_SET_SREGS, Sregs.cast(sregs).cdata)

    def get_fpu(self) -> Fpu:
        fpu = Fpu()
        self.ioctl(io.KVM_GET_FPU, fpu.cdata)
        return fpu

    def set_fpu(self, fpu: Fpu) -> None:
        self.ioctl(io.KVM_SET_FPU, Fpu.cast(fpu).cdata)

    def get_lapic(self) -> LapicState:
        lapic = LapicState()
        self.ioctl(io.KVM_GET_LAPIC, lapic.cdata)
        return lapic

    def set_lapic(self, lapic: LapicState) -> None:
        self.ioctl(io.KVM_SET_LAPIC, LapicState.cast(lapic).cdata)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        indices = list(indices)
        check_msr_indices(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = self.ioctl(io.KVM_GET_MSRS, buf)
        if done < len(indices):
            raise KvmError(errno.EINVAL, "KVM_GET_MSRS", self.role,
                           f"MSR {indices[done]:#x} cannot be read")
        return {buf.entries[i].index: buf.entries[i].data for i in range(len(indices))}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        items = list(values.items())
        check_msr_indices([index for index, _ in items])
        for index, value in items:
            if not 0 <= value < 1 << 64:
                raise ValueError(f"MSR {index:#x} value {value:#x} does not fit in 64 bits")
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, value) in enumerate(items):
            buf.entries[i].index = index
            buf.entries[i].data = value
        done = self.ioctl(io.KVM_SET_MSRS, buf)
        if done < len(items):
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS", self.role,
                           f"KVM rejected MSR {items[done][0]:#x} = {items[done][1]:#x}")

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        self.ioctl(io.KVM_SET_CPUID2, cpuid_to_c(entries))
        self.cpuid_set = True

    def set_supported_cpuid(self) -> None:
        """KVM_SET_CPUID2 with everything this KVM supports (the usual choice)."""
        self.ioctl(io.KVM_SET_CPUID2, self.supported_cpuid_buffer())
        self.cpuid_set = True

    def get_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID table this vCPU has (the buffer grows as KVM asks)."""
        return cpuid_from_c(grow_cpuid(lambda buf: self.ioctl(io.KVM_GET_CPUID2, buf)))

    def get_events(self) -> VcpuEvents:
        events = VcpuEvents()
        self.ioctl(io.KVM_GET_VCPU_EVENTS, events.cdata)
        return events

    def set_events(self, events: VcpuEvents) -> None:
        self.ioctl(io.KVM_SET_VCPU_EVENTS, VcpuEvents.cast(events).cdata)

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        self.ioctl(io.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        self.ioctl(io.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the vCPU fd with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        req = ffi.new("struct kvm_enable_cap *", {"cap": int(cap), "flags": flags,
                                                   "args": list(args)})
        self.ioctl(io.KVM_ENABLE_CAP, req)

    # -- events --------------------------------------------------------------------------

    def smi(self) -> None:
        """KVM_SMI: queue a System Management Interrupt for this vCPU."""
        if not self.has_smm:
            raise MissingCapability(Cap.X86_SMM, "KVM_SMI", self.role,
                                    "no System Management Mode on this host (stock KVM has "
                                    "it: try `pyvmm nested`)")
        self.ioctl(io.KVM_SMI)

    def nmi(self) -> None:
        self.ioctl(io.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: inject an external interrupt (only without the in-kernel irqchip)."""
        if not 0 <= vector <= 255:
            raise ValueError(f"interrupt vector {vector} is outside 0..255")
        self.ioctl(io.KVM_INTERRUPT, ffi.new("uint32_t *", vector))
