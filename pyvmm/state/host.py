# SPDX-License-Identifier: GPL-2.0-or-later
"""What the vCPU-side state functions need to know about their host's KVM: the capabilities
they check and the MSRs a vCPU's state holds. A `Vcpu` holds no reference to its VM or to a
`Kvm`, so these facts are handed to it at creation, as a `VcpuHost` (`Kvm.create_vm()` asks
them once per Kvm handle and puts them in the VmConfig; `Vm.create_vcpu()` passes them on).
For the capabilities listed here (XSAVE, XSAVE2, XCRS, DEBUGREGS, TSC, KVMCLOCK_CTRL,
NESTED_STATE, SYNC_REGS) x86 KVM answers the system fd as it answers a default VM's fd."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..caps import Cap

__all__ = ["VCPU_CAPS", "VcpuHost", "ask"]

#: The capabilities the vCPU-side state code decides on.
VCPU_CAPS = (Cap.XSAVE, Cap.XSAVE2, Cap.XCRS, Cap.GET_TSC_KHZ, Cap.TSC_CONTROL,
             Cap.KVMCLOCK_CTRL, Cap.NESTED_STATE, Cap.SYNC_REGS)


@dataclass(frozen=True)
class VcpuHost:
    """The host facts a vCPU is created with: KVM_CHECK_EXTENSION's answers for VCPU_CAPS,
    and the MSRs of KVM_GET_MSR_INDEX_LIST followed by those of
    KVM_GET_MSR_FEATURE_INDEX_LIST (without repeats)."""

    caps: Mapping[int, int] = field(default_factory=dict)
    msr_indices: tuple[int, ...] = ()

    def check_extension(self, cap: int) -> int:
        """The capability's value as the host answered it (0 = absent). ValueError for a
        capability that is not one of VCPU_CAPS (it was never asked)."""
        try:
            return self.caps[int(cap)]
        except KeyError:
            raise ValueError(f"capability {cap!r} is not one a vCPU is given; ask the Vm "
                             "or Kvm handle") from None


def ask(check_extension: Callable[[int], int], msr_lists: Callable[[], tuple[list[int],
        list[int]]]) -> VcpuHost:
    """A VcpuHost from a handle's check_extension and a provider of (the MSR save list, the
    feature MSR list)."""
    saved, features = msr_lists()
    return VcpuHost(caps={int(c): check_extension(c) for c in VCPU_CAPS},
                    msr_indices=tuple(dict.fromkeys(list(saved) + list(features))))
