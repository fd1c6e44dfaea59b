# SPDX-License-Identifier: GPL-2.0-or-later
"""What the vCPU-side state functions need to know about this host's KVM: capabilities and
the MSR lists. A `Vcpu` holds no reference to its VM or to /dev/kvm, so these are asked of
the system fd (one `Kvm` opened on first use, kept for the process, answers cached). For the
capabilities used here (XSAVE2, XCRS, DEBUGREGS, TSC, KVMCLOCK_CTRL, NESTED_STATE, SYNC_REGS)
x86 KVM answers the system fd as it answers a default VM's fd."""

from __future__ import annotations

import errno
import threading

from .._ffi import ffi
from .. import ioctls as io
from ..errors import KvmError

__all__ = ["check_extension", "feature_msr_indices", "msr_index_list"]

_lock = threading.Lock()
_kvm = None
_caps: dict[int, int] = {}
_lists: dict[str, list[int]] = {}


def _system():
    global _kvm
    with _lock:
        if _kvm is None or _kvm.closed:
            from ..kvm import Kvm

            _kvm = Kvm()
        return _kvm


def check_extension(cap: int) -> int:
    """KVM_CHECK_EXTENSION on /dev/kvm, cached."""
    cap = int(cap)
    if cap not in _caps:
        _caps[cap] = _system().check_extension(cap)
    return _caps[cap]


def msr_index_list() -> list[int]:
    """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for every vCPU."""
    if "save" not in _lists:
        _lists["save"] = _system().msr_index_list()
    return list(_lists["save"])


def feature_msr_indices() -> list[int]:
    """KVM_GET_MSR_FEATURE_INDEX_LIST: the feature MSRs (capabilities userspace may set per
    vCPU, e.g. IA32_ARCH_CAPABILITIES); empty where the host has no such list."""
    if "feature" not in _lists:
        kvm, n = _system(), 64
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                kvm.ioctl(io.KVM_GET_MSR_FEATURE_INDEX_LIST, buf)
            except KvmError as err:
                if err.errno == errno.E2BIG and n < 65536:
                    n *= 4
                    continue
                if err.errno in (errno.EINVAL, errno.ENOTTY):
                    _lists["feature"] = []
                    break
                raise
            _lists["feature"] = [buf.indices[i] for i in range(buf.nmsrs)]
            break
    return list(_lists["feature"])
