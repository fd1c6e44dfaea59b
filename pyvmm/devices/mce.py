# SPDX-License-Identifier: GPL-2.0-or-later
"""The machine-check architecture a PC vCPU reports (KVM_X86_SETUP_MCE).

Left alone, KVM gives a vCPU its maximum number of MCE banks (32). QEMU sets up 10 banks with
MCG_CTL_P and MCG_SER_P (as far as the host supports them) for every CPU model with MCE and
MCA, and test kernels that walk the banks (kvm-unit-tests' msr test) count them from
MCG_CAP. `setup_mce(vcpu)` does what QEMU does.
"""

from __future__ import annotations

from .._ffi import ffi
from ..ioctls import IOC, IOC_READ, IOC_WRITE, KVMIO, ioctl

#: _IOR(KVMIO, 0x9d, __u64) on the system fd; _IOW(KVMIO, 0x9c, __u64) on a vCPU fd.
KVM_X86_GET_MCE_CAP_SUPPORTED = IOC(IOC_READ, KVMIO, 0x9D, 8)
KVM_X86_SETUP_MCE = IOC(IOC_WRITE, KVMIO, 0x9C, 8)

MCG_CTL_P = 1 << 8
MCG_SER_P = 1 << 24
MCG_BANK_MASK = 0xFF
#: QEMU's default: 10 banks, MCG_CTL_P and MCG_SER_P.
DEFAULT_BANKS = 10
DEFAULT_CAP = MCG_CTL_P | MCG_SER_P
#: KVM_MAX_MCE_BANKS
MAX_BANKS = 32


def supported_mce_cap(kvm) -> int:
    """The MCG_CAP flag bits KVM supports (its bank count field reads 0: KVM allows up to
    32 banks)."""
    out = ffi.new("unsigned long long *")
    ioctl(kvm.fileno(), KVM_X86_GET_MCE_CAP_SUPPORTED, out, role="system")
    return int(out[0])


def setup_mce(vcpu, kvm, *, banks: int = DEFAULT_BANKS, flags: int = DEFAULT_CAP) -> int:
    """Give `vcpu` `banks` MCE banks and the MCG_CAP `flags` the host supports; returns the
    MCG_CAP it set."""
    if not 1 <= banks <= MAX_BANKS:
        raise ValueError(f"banks must be 1..{MAX_BANKS}, got {banks}")
    cap = (flags & supported_mce_cap(kvm) & ~MCG_BANK_MASK) | banks
    arg = ffi.new("unsigned long long *", cap)
    ioctl(vcpu.fileno(), KVM_X86_SETUP_MCE, arg, role="vcpu",
          detail=f"KVM_X86_SETUP_MCE with MCG_CAP {cap:#x}")
    return cap
