# SPDX-License-Identifier: GPL-2.0-or-later
"""`VcpuState`: everything KVM needs to resume one x86 vCPU exactly, and the save/load of it.

What is saved (in about the order the KVM selftests' vcpu_save_state reads it, but MP state
first, see save_vcpu_state): MP state, vCPU events, general registers, XSAVE (or the legacy FPU
where the host has no XSAVE), XCRs, special registers, nested state (where the host has it),
the MSRs of KVM's save list (KVM_GET_MSR_INDEX_LIST) and of its feature list
(KVM_GET_MSR_FEATURE_INDEX_LIST) that this vCPU can read, debug registers, the local APIC (with
an in-kernel irqchip), the CPUID table and the TSC frequency.

Loading follows api.rst's constraints: CPUID first (it decides which MSRs and XSAVE features
are valid, and cannot change after the first KVM_RUN), the TSC frequency before any TSC value,
special registers before MSRs (EFER, APIC base), XCRs before XSAVE (XCR0 says which components
XSAVE may hold), events and MP state, debug and general registers, the local APIC, then
MSR_IA32_TSC_DEADLINE (KVM ignores it unless the LAPIC timer is in TSC-deadline mode) and nested
state last (it refers to the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..caps import Cap
from ..errors import KvmError
from ..cpuid import CpuidEntry
from ..structs import Fpu, LapicState, Regs, Sregs, VcpuEvents
from . import cpu
from .structs import DebugRegs, Xcrs, Xsave, from_bytes

if TYPE_CHECKING:
    from ..vcpu import Vcpu

__all__ = ["MSR_IA32_TSC_DEADLINE", "VcpuState", "load_vcpu_state",
           "read_msrs", "save_vcpu_state", "write_msrs"]

MSR_IA32_TSC_DEADLINE = 0x6E0

# Fields held as pyvmm CStructs, pickled and encoded as their bytes.
_STRUCT_FIELDS = {"regs": Regs, "sregs": Sregs, "fpu": Fpu, "events": VcpuEvents,
                  "lapic": LapicState, "xcrs": Xcrs, "debugregs": DebugRegs}


@dataclass(eq=False)
class VcpuState:
    """One vCPU's complete state. Picklable (structs travel as their bytes); `encode()` gives
    the same as JSON-friendly values. None marks what the source host does not have."""

    vcpu_id: int
    regs: Regs
    sregs: Sregs
    events: VcpuEvents
    mp_state: int
    msrs: dict[int, int]
    debugregs: DebugRegs
    cpuid: list[CpuidEntry] = field(default_factory=list)
    xsave: Xsave | None = None
    fpu: Fpu | None = None
    xcrs: Xcrs | None = None
    lapic: LapicState | None = None
    nested: bytes | None = None
    tsc_khz: int | None = None

    def encode(self) -> dict[str, Any]:
        """Plain values only (ints, strings of hex, lists, dicts): for JSON or any format."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif f.name in _STRUCT_FIELDS:
                out[f.name] = value.to_bytes().hex()
            elif f.name == "xsave":
                out[f.name] = bytes(value.data).hex()
            elif f.name == "nested":
                out[f.name] = value.hex()
            elif f.name == "msrs":
                out[f.name] = {str(k): v for k, v in value.items()}
            elif f.name == "cpuid":
                out[f.name] = [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]
                               for e in value]
            else:
                out[f.name] = value
        return out

    @classmethod
    def decode(cls, data: dict[str, Any]) -> VcpuState:
        """The inverse of encode(); ValueError for anything malformed."""
        try:
            kw: dict[str, Any] = {}
            for f in fields(cls):
                value = data.get(f.name)
                if value is None:
                    kw[f.name] = None
                elif f.name in _STRUCT_FIELDS:
                    kw[f.name] = from_bytes(_STRUCT_FIELDS[f.name], bytes.fromhex(value))
                elif f.name == "xsave":
                    kw[f.name] = Xsave(bytes.fromhex(value))
                elif f.name == "nested":
                    kw[f.name] = bytes.fromhex(value)
                elif f.name == "msrs":
                    kw[f.name] = {int(k): int(v) for k, v in value.items()}
                elif f.name == "cpuid":
                    kw[f.name] = [CpuidEntry(*map(int, e)) for e in value]
                else:
                    kw[f.name] = int(value)
            for required in ("vcpu_id", "regs", "sregs", "events", "mp_state", "msrs",
                             "debugregs"):
                if kw.get(required) is None:
                    raise ValueError(f"{required} is missing")
            if kw["cpuid"] is None:
                kw["cpuid"] = []
        except (TypeError, AttributeError, KeyError) as err:
            raise ValueError(f"not an encoded VcpuState: {err}") from None
        return cls(**kw)

    def __reduce__(self):
        return (VcpuState.decode, (self.encode(),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VcpuState) and self.encode() == other.encode()

    __hash__ = None  # type: ignore[assignment]


# -- MSRs --------------------------------------------------------------------------------------

def read_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """The MSRs of `indices` this vCPU can read (one KVM_GET_MSRS; one per MSR only when some
    cannot be read, which depends on the vCPU's CPUID)."""
    try:
        return vcpu.get_msrs(indices)
    except KvmError:
        pass
    values = {}
    for index in indices:
        try:
            values.update(vcpu.get_msrs([index]))
        except KvmError:
            continue
    return values


def write_msrs(vcpu: Vcpu, values: dict[int, int]) -> None:
    """KVM_SET_MSRS of `values`. An MSR KVM refuses is accepted only when the vCPU already
    holds that value (a read-only MSR saved from an identical vCPU); otherwise KvmError."""
    if not values:
        return
    try:
        vcpu.set_msrs(values)
        return
    except KvmError:
        pass
    for index, value in values.items():
        try:
            vcpu.set_msrs({index: value})
        except KvmError:
            if read_msrs(vcpu, [index]).get(index) != value:
                raise
    return


# -- save and load -----------------------------------------------------------------------------

def save_vcpu_state(vcpu: Vcpu, *, complete_io: bool = True) -> VcpuState:
    """Read everything KVM needs to resume `vcpu`. The vCPU must not be running. With
    `complete_io` (the default), the last exit's PIO/MMIO is completed first (a KVM_RUN with
    immediate_exit: api.rst requires it before saving, as RIP and an IN's register are only
    final after it); pass False when the vCPU has not exited since it was set up."""
    if vcpu.running:
        raise RuntimeError(f"vCPU {vcpu.id} is running: stop it before saving its state")
    if complete_io:
        vcpu.complete_io()
    # MP state first: reading it makes KVM accept a pending INIT/SIPI (resetting an AP or
    # starting it at the SIPI vector), which changes the events (latched_init) and registers
    # read after it. Read the other way round, a state saved while an INIT was pending
    # would latch that INIT again on load and put a started AP back to wait for a SIPI.
    mp_state = vcpu.get_mp_state()
    events = vcpu.get_events()
    regs = vcpu.get_regs()
    xsave = fpu = None
    if vcpu.host.check_extension(Cap.XSAVE):
        xsave = cpu.get_xsave(vcpu)
    else:
        fpu = vcpu.get_fpu()
    xcrs = cpu.get_xcrs(vcpu) if vcpu.host.check_extension(Cap.XCRS) else None
    sregs = vcpu.get_sregs()
    nested = cpu.get_nested_state(vcpu) if cpu.nested_state_size(vcpu) else None
    indices = list(vcpu.host.msr_indices)
    msrs = read_msrs(vcpu, indices)
    debugregs = cpu.get_debugregs(vcpu)
    lapic = vcpu.get_lapic() if cpu.lapic_in_kernel(vcpu) else None
    tsc_khz = cpu.get_tsc_khz(vcpu) if vcpu.host.check_extension(Cap.GET_TSC_KHZ) else None
    return VcpuState(vcpu_id=vcpu.id, regs=regs, sregs=sregs, events=events,
                     mp_state=mp_state, msrs=msrs, debugregs=debugregs,
                     cpuid=vcpu.get_cpuid(), xsave=xsave, fpu=fpu, xcrs=xcrs, lapic=lapic,
                     nested=nested, tsc_khz=tsc_khz)


TSS_AVAILABLE, TSS_BUSY = 0x9, 0xB


def _tr_for_host(vcpu: Vcpu, sregs: Sregs) -> Sregs:
    """On AMD, KVM_GET_SREGS reports TR busy whatever the CPU holds, and SVM itself ignores
    the busy bit; QEMU's TCG, though (stock kvm_amd in the nested runner), refuses the I/O
    bitmap of a busy TSS. So on AMD a busy TSS goes back as available: the guest sees no
    difference on hardware and keeps its port I/O under TCG. Intel's VM entry needs busy."""
    if sregs.tr.type != TSS_BUSY or vcpu.cpu_vendor not in ("AuthenticAMD", "HygonGenuine"):
        return sregs
    sregs = sregs.copy()
    sregs.tr.type = TSS_AVAILABLE
    return sregs


def load_vcpu_state(vcpu: Vcpu, state: VcpuState) -> None:
    """Put `state` into `vcpu`, a fresh vCPU that has not run (KVM refuses a CPUID change
    after the first KVM_RUN), of a VM set up like the source's (irqchip, memory)."""
    if not isinstance(state, VcpuState):
        raise TypeError(f"expected VcpuState, got {type(state).__name__}")
    if vcpu.running:
        raise RuntimeError(f"vCPU {vcpu.id} is running: stop it before loading a state")
    if state.lapic is not None and not cpu.lapic_in_kernel(vcpu):
        raise ValueError("the state has an in-kernel local APIC and this VM has none: "
                         "create_irqchip() before creating the vCPU")
    if state.cpuid:
        vcpu.set_cpuid(state.cpuid)
    if state.tsc_khz is not None and vcpu.host.check_extension(Cap.GET_TSC_KHZ):
        cpu.set_tsc_khz(vcpu, state.tsc_khz)
    vcpu.set_sregs(_tr_for_host(vcpu, state.sregs))
    msrs = dict(state.msrs)
    deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    write_msrs(vcpu, msrs)
    if state.xcrs is not None:
        cpu.set_xcrs(vcpu, state.xcrs)
    if state.xsave is not None:
        cpu.set_xsave(vcpu, state.xsave)
    elif state.fpu is not None:
        vcpu.set_fpu(state.fpu)
    vcpu.set_events(state.events)
    vcpu.set_mp_state(state.mp_state)
    cpu.set_debugregs(vcpu, state.debugregs)
    vcpu.set_regs(state.regs)
    if state.lapic is not None:
        vcpu.set_lapic(state.lapic)
    if deadline is not None:
        write_msrs(vcpu, {MSR_IA32_TSC_DEADLINE: deadline})
    if state.nested is not None:
        cpu.set_nested_state(vcpu, state.nested)

