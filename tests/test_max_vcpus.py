# SPDX-License-Identifier: GPL-2.0-or-later
"""As many vCPUs as KVM allows in one VM, in the spirit of the kernel's
kvm_create_max_vcpus selftest (our own code): KVM_CAP_MAX_VCPUS vCPUs with the highest ids
below KVM_CAP_MAX_VCPU_ID, each with its kvm_run mapping; one more is refused with a clear
KvmError that keeps errno; closing the VM releases every fd."""

from __future__ import annotations

import errno
import os
import resource

import pytest
from resources import open_fds

from pyvmm import Cap, KvmError
from pyvmm import ioctls as io

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms


def need_fds(count: int) -> None:
    """Raise the soft fd limit to `count` more than are open (skip if the hard one is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = open_fds() + count + 64
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"{count} vCPUs need {want} fds; RLIMIT_NOFILE's hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def vcpu_fds() -> int:
    """Open fds on vCPUs (Python's mmap of kvm_run holds a dup of its vCPU's fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:kvm-vcpu")
        except OSError:
            pass
    return count


def test_max_vcpus_in_one_vm_with_the_highest_ids(kvm):
    max_vcpus = kvm.check_extension(Cap.MAX_VCPUS)
    max_id = kvm.max_vcpu_id                 # KVM_CAP_MAX_VCPU_ID, or MAX_VCPUS without it
    assert 0 < max_vcpus <= max_id
    need_fds(2 * max_vcpus)
    before, before_vcpus = open_fds(), vcpu_fds()
    vm = kvm.create_vm()
    try:
        assert vm.check_extension(Cap.MAX_VCPUS) == max_vcpus
        ids = range(max_id - max_vcpus, max_id)
        vcpus = [vm.create_vcpu(i) for i in ids]
        assert sorted(vm.vcpus) == list(ids)
        assert max_vcpus <= vcpu_fds() - before_vcpus <= 2 * max_vcpus
        # Each has its own fd and kvm_run mapping, and answers ioctls.
        assert len({v.fileno() for v in vcpus}) == max_vcpus
        for vcpu in (vcpus[0], vcpus[-1]):
            regs = vcpu.get_regs()
            regs.rax = vcpu.id
            vcpu.set_regs(regs)
            assert vcpu.get_regs().rax == vcpu.id
        # One more: ids below the range are free, but the VM is full. KVM says EINVAL; the
        # error names the ioctl and the limit.
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(0)
        err = info.value
        assert (err.errno, err.ioctl, err.role) == (errno.EINVAL, "KVM_CREATE_VCPU", "vm")
        assert f"KVM_CAP_MAX_VCPUS allows {max_vcpus}" in str(err)
        assert 0 not in vm.vcpus and len(vm.vcpus) == max_vcpus
        # An id at or past KVM_CAP_MAX_VCPU_ID is refused before any ioctl.
        with pytest.raises(ValueError, match="MAX_VCPU_ID"):
            vm.create_vcpu(max_id)
    finally:
        vm.close()
    assert all(v.closed for v in vcpus)
    assert vcpu_fds() == before_vcpus and open_fds() == before


def test_vcpu_ids_up_to_max_vcpu_id_minus_one(kvm):
    """The lowest and the highest id in a VM of two vCPUs; the one past is ValueError before
    any ioctl, a duplicate is ValueError too (KVM would say EEXIST through the raw ioctl)."""
    max_id = kvm.max_vcpu_id
    with kvm.create_vm() as vm:
        assert [vm.create_vcpu(i).id for i in (0, max_id - 1)] == [0, max_id - 1]
        with pytest.raises(ValueError, match=f"0..{max_id - 1}"):
            vm.create_vcpu(max_id)
        with pytest.raises(ValueError, match="already exists"):
            vm.create_vcpu(max_id - 1)
        with pytest.raises(KvmError) as info:
            vm.ioctl(io.KVM_CREATE_VCPU, max_id - 1)
        assert info.value.errno == errno.EEXIST
