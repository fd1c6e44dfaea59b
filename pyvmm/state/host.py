# SPDX-License-Identifier: GPL-2.0-or-later
"""What the vCPU-side state functions need to know about this host's KVM: capabilities and
the MSR lists. A `Vcpu` holds no reference to its VM or to a `Kvm`, so these are asked of a
system fd of this module's own (/dev/kvm, or $PYVMM_KVM_DEVICE, opened on first use and kept
for the process; answers cached). For the capabilities used here (XSAVE2, XCRS, DEBUGREGS,
TSC, KVMCLOCK_CTRL, NESTED_STATE, SYNC_REGS) x86 KVM answers the system fd as it answers a
default VM's fd."""

from __future__ import annotations

import errno
import os
import threading

from .. import ioctls as io
from .._ffi import ffi
from ..errors import KvmError

__all__ = ["check_extension", "feature_msr_indices", "msr_index_list"]

_lock = threading.Lock()
_fd = -1
_caps: dict[int, int] = {}
_lists: dict[int, list[int]] = {}


def _system() -> int:
    global _fd
    with _lock:
        if _fd < 0:
            _fd = os.open(os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm"),
                          os.O_RDWR | os.O_CLOEXEC)
        return _fd


def check_extension(cap: int) -> int:
    """KVM_CHECK_EXTENSION on the system fd, cached."""
    cap = int(cap)
    if cap not in _caps:
        _caps[cap] = io.ioctl(_system(), io.KVM_CHECK_EXTENSION, cap, "system")
    return _caps[cap]


def _msr_list(request: int) -> list[int]:
    if request not in _lists:
        n = 64
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                io.ioctl(_system(), request, buf, "system")
            except KvmError as err:
                if err.errno == errno.E2BIG and n < 65536:
                    n *= 4
                    continue
                if err.errno in (errno.EINVAL, errno.ENOTTY):  # a list this host lacks
                    _lists[request] = []
                    break
                raise
            _lists[request] = [buf.indices[i] for i in range(buf.nmsrs)]
            break
    return list(_lists[request])


def msr_index_list() -> list[int]:
    """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for every vCPU."""
    return _msr_list(io.KVM_GET_MSR_INDEX_LIST)


def feature_msr_indices() -> list[int]:
    """KVM_GET_MSR_FEATURE_INDEX_LIST: the feature MSRs (capabilities userspace may set per
    vCPU, e.g. IA32_ARCH_CAPABILITIES); empty where the host has no such list."""
    return _msr_list(io.KVM_GET_MSR_FEATURE_INDEX_LIST)
