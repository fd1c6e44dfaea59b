# SPDX-License-Identifier: GPL-2.0-or-later
"""`Kvm`, the system fd, and KvmError/KvmUnavailable as callers see them."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
from helpers import open_kvm

from pyvmm import Cap, ClosedError, CpuidEntry, IoEventAddress, Kvm, KvmError, KvmUnavailable
from pyvmm import ioctls as io


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_api_version(kvm):
    assert kvm.api_version == 12


def test_check_extension(kvm):
    assert kvm.check_extension(Cap.IOEVENTFD) > 0
    assert kvm.has(Cap.USER_MEMORY)
    # NR_MEMSLOTS is a count, not a boolean: every KVM has at least 32 slots.
    assert kvm.check_extension(Cap.NR_MEMSLOTS) >= 32
    # A capability number no kernel defines is simply absent, not an error.
    assert kvm.check_extension(0x7FFF_0000) == 0


def test_vcpu_mmap_size(kvm, vm):
    size = kvm.vcpu_mmap_size
    assert size >= 4096 and size % 4096 == 0
    from pyvmm._ffi import ffi
    assert size >= ffi.sizeof("struct kvm_run")
    # The PIO data page (KVM_PIO_PAGE_OFFSET 1) lies inside the mapping on x86.
    assert size >= 2 * 4096


def test_supported_cpuid(kvm):
    entries = kvm.supported_cpuid()
    assert all(isinstance(e, CpuidEntry) for e in entries)
    by_leaf = {(e.function, e.index): e for e in entries}
    leaf0 = by_leaf[(0, 0)]
    assert leaf0.eax >= 1, "max basic leaf"
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine", b"CentaurHauls"), vendor
    assert (1, 0) in by_leaf
    assert by_leaf[(1, 0)].edx & 1, "leaf 1 EDX.FPU"
    # The KVM paravirt signature leaf is offered: "KVMKVMKVM\0\0\0".
    kvm_leaf = by_leaf.get((0x40000000, 0))
    assert kvm_leaf is not None
    assert (kvm_leaf.ebx, kvm_leaf.ecx, kvm_leaf.edx) == (0x4B4D564B, 0x564B4D56, 0x4D)
    assert len(by_leaf) == len(entries), "duplicate (function, index) pairs"


def test_msr_index_list(kvm):
    msrs = kvm.msr_index_list()
    assert 0x174 in msrs        # IA32_SYSENTER_CS
    assert 0xC0000081 in msrs   # STAR
    assert len(set(msrs)) == len(msrs)


def test_missing_device_says_how_to_fix():
    with pytest.raises(KvmUnavailable) as info:
        Kvm("/nonexistent/kvm")
    err = info.value
    assert err.errno == errno.ENOENT
    assert err.filename == "/nonexistent/kvm"
    message = str(err)
    assert "modprobe" in message and "nested" in message


def test_unreadable_device_mentions_kvm_group(tmp_path):
    """A device this user may not open: the message names the kvm group. As root (CI), the
    check runs in a forked child that has dropped to an unprivileged user first."""
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    path.chmod(0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just the check, reported through the pipe
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                Kvm(str(path))
                answer = "opened"
            except KvmUnavailable as err:
                answer = f"{err.errno} {err.strerror}"
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer.startswith(f"{errno.EACCES} "), answer
    assert "kvm` group" in answer


def test_not_a_kvm_device_is_a_clear_error_and_leaks_no_fd():
    """/dev/null opens fine but KVM_GET_API_VERSION fails with ENOTTY. The caller should get
    KvmUnavailable naming the path, and the fd must be closed by the time the error is seen
    (not later, by the garbage collector)."""
    before = _open_fds()
    try:
        Kvm("/dev/null")
    except (KvmUnavailable, KvmError) as err:
        leaked = _open_fds() - before
        caught = err
    else:
        pytest.fail("Kvm('/dev/null') succeeded")
    assert not leaked, f"fd(s) {sorted(leaked)} to /dev/null still open after the error"
    assert isinstance(caught, KvmUnavailable), (
        f"got {type(caught).__name__}: {caught}; expected KvmUnavailable")
    assert "/dev/null" in str(caught)
    assert caught.errno == errno.ENOTTY


def test_close_and_context_manager():
    with open_kvm() as k:
        fd = k.fileno()
        assert os.fstat(fd)
    assert k.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ClosedError):
        k.check_extension(Cap.IOEVENTFD)
    k.close()  # idempotent


def test_create_vm_rejected_type_is_a_system_kvmerror(kvm):
    with pytest.raises(KvmError) as info:
        kvm.create_vm(vm_type=0x7FFF)
    err = info.value
    assert err.errno == errno.EINVAL
    assert err.ioctl == "KVM_CREATE_VM"
    assert err.role == "system"
    assert isinstance(err, OSError)


def test_kvmerror_from_raw_duplicate_vcpu(vm):
    vm.create_vcpu(0)
    # The handle refuses the duplicate before any ioctl...
    with pytest.raises(ValueError):
        vm.create_vcpu(0)
    # ...and the kernel's answer, seen through the raw ioctl helper, is EEXIST.
    with pytest.raises(KvmError) as info:
        io.ioctl(vm.fileno(), io.KVM_CREATE_VCPU, 0, role=vm.role)
    err = info.value
    assert (err.errno, err.ioctl, err.role) == (errno.EEXIST, "KVM_CREATE_VCPU", "vm")
    assert "KVM_CREATE_VCPU" in str(err) and "vm fd" in str(err)


def test_kvmerror_from_duplicate_ioevent(vm):
    a, b = os.eventfd(0), os.eventfd(0)
    try:
        vm.register_ioevent(a, IoEventAddress.pio(0x510), length=2)
        # Same address and length again: EEXIST even with another eventfd.
        with pytest.raises(KvmError) as info:
            vm.register_ioevent(b, IoEventAddress.pio(0x510), length=2)
        err = info.value
        assert (err.errno, err.ioctl, err.role) == (errno.EEXIST, "KVM_IOEVENTFD", "vm")
        assert "0x510" in str(err)
        # Deassigning with the wrong fd: ENOENT.
        with pytest.raises(KvmError) as info:
            vm.unregister_ioevent(b, IoEventAddress.pio(0x510), length=2)
        assert info.value.errno == errno.ENOENT
        vm.unregister_ioevent(a, IoEventAddress.pio(0x510), length=2)
        # Gone now: registering again works.
        vm.register_ioevent(b, IoEventAddress.pio(0x510), length=2)
    finally:
        vm.close()
        os.close(a)
        os.close(b)


def test_kvmerror_pickles():
    err = KvmError(errno.EEXIST, "KVM_IOEVENTFD", "vm", "detail here")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.errno, copy.ioctl, copy.role, copy.detail) == (
        errno.EEXIST, "KVM_IOEVENTFD", "vm", "detail here")
    assert str(copy) == str(err)
