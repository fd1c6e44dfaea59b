# SPDX-License-Identifier: GPL-2.0-or-later
"""guest_memfd handles on the real /dev/kvm: creation, the checks before the ioctl, the fd's
lifetime and, where the host offers MMAP|INIT_SHARED, a host mapping of its pages."""

import errno
import mmap
import os

import pytest

from pyvmm.caps import Cap
from pyvmm.errors import ClosedError, KvmError, MissingCapability
from pyvmm.guest_memfd import (GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                               create_guest_memfd, guest_memfd_flag_names, vm_type_names)

MIB = 1 << 20


@pytest.mark.requires_cap(Cap.GUEST_MEMFD)
def test_create_gives_a_kernel_guest_memfd_that_close_releases(vm):
    gmem = create_guest_memfd(vm, 2 * MIB)
    fd = gmem.fileno()
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[kvm-gmem]"
    assert (gmem.size, gmem.flags, gmem.mappable) == (2 * MIB, 0, False)
    gmem.close()
    gmem.close()   # idempotent
    assert gmem.closed
    with pytest.raises(OSError) as err:
        os.fstat(fd)
    assert err.value.errno == errno.EBADF
    with pytest.raises(ClosedError):
        gmem.fileno()


@pytest.mark.parametrize("size", [0, -4096, 0x800, 4096 + 1, True, 4096.0, "4096"])
def test_bad_sizes_are_refused_before_the_ioctl(vm, size):
    # Arguments are checked first, so this holds with or without guest_memfd.
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        create_guest_memfd(vm, size)
    with pytest.raises(ValueError, match="flags"):
        create_guest_memfd(vm, 4096, -1)


def test_a_kvm_without_guest_memfd_says_which_capability(vm):
    if vm.check_extension(Cap.GUEST_MEMFD):
        pytest.skip("this KVM has guest_memfd: the refusal cannot be seen here")
    with pytest.raises(MissingCapability, match="GUEST_MEMFD") as err:
        create_guest_memfd(vm, 4096)
    assert "6.8" in str(err.value)


@pytest.mark.requires_cap(Cap.GUEST_MEMFD)
def test_flags_the_vm_does_not_offer_are_refused_by_name(vm):
    offered = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    unknown = 1 << 20
    assert not offered & unknown
    with pytest.raises(MissingCapability, match="bit 20"):
        create_guest_memfd(vm, MIB, unknown)
    with pytest.raises(ValueError):
        create_guest_memfd(vm, MIB, -1)


@pytest.mark.requires_cap(Cap.GUEST_MEMFD)
def test_kernel_errors_keep_their_errno(vm):
    # Larger than any address space KVM allows for a file: the kernel, not pyvmm, refuses it.
    with pytest.raises(KvmError) as err:
        create_guest_memfd(vm, 1 << 63)
    assert err.value.errno in (errno.EINVAL, errno.EFBIG, errno.ENOMEM)


@pytest.mark.requires_cap(Cap.GUEST_MEMFD_FLAGS)
def test_a_shared_guest_memfd_maps_into_the_host(vm):
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    if vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & flags != flags:
        pytest.fail("KVM_CAP_GUEST_MEMFD_FLAGS lacks MMAP|INIT_SHARED")
    with create_guest_memfd(vm, MIB, flags) as gmem:
        assert gmem.mappable
        with mmap.mmap(gmem.fileno(), MIB) as first, mmap.mmap(gmem.fileno(), MIB) as second:
            first[4096:4100] = b"gmem"
            assert second[4096:4100] == b"gmem"   # one set of pages, seen through both maps


def test_capability_masks_decode_to_names():
    assert vm_type_names(0b1) == ["DEFAULT"]
    assert vm_type_names(0b10) == ["SW_PROTECTED"]
    assert guest_memfd_flag_names(0b11) == ["MMAP", "INIT_SHARED"]
    assert guest_memfd_flag_names(1 << 5) == ["bit 5"]


def test_the_host_reports_its_vm_types(kvm):
    names = vm_type_names(kvm.check_extension(Cap.VM_TYPES)) if kvm.check_extension(
        Cap.VM_TYPES) else ["DEFAULT"]
    assert "DEFAULT" in names   # every KVM offers the default type
