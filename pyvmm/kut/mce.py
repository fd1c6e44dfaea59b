# SPDX-License-Identifier: GPL-2.0-or-later
"""Machine-check banks as a PC VMM presents them: KVM_X86_SETUP_MCE on each vCPU.

Without it KVM gives a vCPU its maximum of MCE banks (32); QEMU, which kvm-unit-tests'
expectations follow, sets up 10 banks with MCG_CTL_P and MCG_SER_P (what KVM supports of
them). msr.flat checks every bank's MSRs, so its check count depends on this.
"""

from __future__ import annotations

from .._ffi import ffi
from ..ioctls import IOC, IOC_READ, IOC_WRITE, KVMIO, ioctl

__all__ = ["DEFAULT_BANKS", "MCG_CTL_P", "MCG_SER_P", "mce_cap_supported", "setup_mce"]

#: KVM_X86_GET_MCE_CAP_SUPPORTED, _IOR(KVMIO, 0x9d, __u64), on the system fd.
KVM_X86_GET_MCE_CAP_SUPPORTED = IOC(IOC_READ, KVMIO, 0x9D, 8)
#: KVM_X86_SETUP_MCE, _IOW(KVMIO, 0x9c, __u64), on a vCPU fd before its first run.
KVM_X86_SETUP_MCE = IOC(IOC_WRITE, KVMIO, 0x9C, 8)

MCG_CTL_P = 1 << 8     # IA32_MCG_CTL present
MCG_SER_P = 1 << 24    # software error recovery
BANKS_MASK = 0xFF
#: QEMU's default bank count for x86 CPUs.
DEFAULT_BANKS = 10


#: KVM_CAP_MCE: KVM_CHECK_EXTENSION gives the most banks a vCPU can have.
KVM_CAP_MCE = 31


def mce_cap_supported(kvm) -> int:
    """The MCG_CAP bits KVM supports (KVM_X86_GET_MCE_CAP_SUPPORTED), with the most banks
    it allows (KVM_CAP_MCE) in the bank-count bits."""
    value = ffi.new("uint64_t *")
    ioctl(kvm.fileno(), KVM_X86_GET_MCE_CAP_SUPPORTED, value, role="system")
    banks = kvm.check_extension(KVM_CAP_MCE)
    return (int(value[0]) & ~BANKS_MASK) | min(banks, BANKS_MASK)


def setup_mce(vcpu, supported: int, *, banks: int = DEFAULT_BANKS) -> int:
    """Give `vcpu` `banks` MCE banks with MCG_CTL_P|MCG_SER_P, as far as `supported` (from
    `mce_cap_supported`) allows; returns the MCG_CAP set."""
    if not 1 <= banks <= BANKS_MASK:
        raise ValueError(f"banks must be 1..255, got {banks}")
    banks = min(banks, supported & BANKS_MASK)
    cap = ((MCG_CTL_P | MCG_SER_P) & supported) | banks
    value = ffi.new("uint64_t *", cap)
    ioctl(vcpu.fileno(), KVM_X86_SETUP_MCE, value, role="vcpu")
    return cap
