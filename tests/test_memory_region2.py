# SPDX-License-Identifier: GPL-2.0-or-later
"""KVM_SET_USER_MEMORY_REGION2 (Vm.set_user_memory_region2) on the real /dev/kvm: a slot set
with it serves a guest like any other, moves and is deleted with it, its refusals keep their
errno, and (where a KVM offers guest_memfd) it binds a guest_memfd to a slot."""

import errno
import mmap

import pytest
from helpers import LOAD, code, real_mode, run_to

from pyvmm import exits
from pyvmm._ffi import ffi
from pyvmm.caps import Cap
from pyvmm.errors import KvmError
from pyvmm.guest_memfd import create_guest_memfd
from pyvmm.vm_memory import KVM_MEM_GUEST_MEMFD

SIZE = 0x10000
# Real mode: read the byte at 0x2000, send it to port 0x80, read again, send it to 0x81.
READER = """
    movb 0x2000, %al
    outb %al, $0x80
    movb 0x2000, %al
    outb %al, $0x81
    hlt
"""

pytestmark = pytest.mark.both_kvms


def host_memory(size: int = SIZE) -> tuple[mmap.mmap, int]:
    mem = mmap.mmap(-1, size)
    return mem, int(ffi.cast("uintptr_t", ffi.from_buffer(mem)))


@pytest.mark.requires_cap(Cap.USER_MEMORY2)
def test_a_region2_slot_serves_a_guest_and_moves_and_goes(kvm, vm):
    text, text_host = host_memory(0x2000)            # slot 0: the code, 0..0x2000
    data, data_host = host_memory(0x1000)            # slot 1: the byte read, at 0x2000
    text[LOAD:LOAD + len(code(READER))] = code(READER)
    data[0] = 0x5A
    vm.set_user_memory_region2(0, 0, 0, 0x2000, text_host)
    vm.set_user_memory_region2(1, 0, 0x2000, 0x1000, data_host)
    vcpu = vm.create_vcpu()
    real_mode(vcpu)
    first, _ = run_to(vcpu, exits.IoExit)
    assert (first.port, bytes(first.data)) == (0x80, b"\x5a")
    # Slot 1 moved to 0x10000: the second read at 0x2000 finds no memory, an MMIO exit,
    # answered with 0x77.
    vm.set_user_memory_region2(1, 0, 0x10000, 0x1000, data_host)
    mmio = []

    def answer(ex):
        assert isinstance(ex, exits.MmioExit) and not ex.is_write
        mmio.append(ex.address)
        ex.data[:1] = b"\x77"
    second, _ = run_to(vcpu, exits.IoExit, handler=answer)
    assert (second.port, bytes(second.data), mmio) == (0x81, b"\x77", [0x2000])
    vm.set_user_memory_region2(1, 0, 0x10000, 0, data_host)      # deleted (size 0)
    with pytest.raises(KvmError) as err:                            # nothing left to delete
        vm.set_user_memory_region2(1, 0, 0x10000, 0, data_host)
    assert err.value.errno == errno.EINVAL
    vm.set_user_memory_region2(0, 0, 0, 0, text_host)
    text.close()
    data.close()


@pytest.mark.requires_cap(Cap.USER_MEMORY2)
def test_region2_refusals_keep_their_errno(kvm, vm):
    mem, host = host_memory()
    with pytest.raises(KvmError) as err:
        vm.set_user_memory_region2(0, 0, 0, SIZE - 1, host)          # not a page multiple
    assert err.value.errno == errno.EINVAL and "SET_USER_MEMORY_REGION2" in str(err.value)
    with pytest.raises(KvmError) as err:
        vm.set_user_memory_region2(0, 1 << 20, 0, SIZE, host)         # an unknown flag
    assert err.value.errno == errno.EINVAL
    if not vm.check_extension(Cap.GUEST_MEMFD):
        # The guest_memfd flag where KVM has none: refused, and the message names the fd.
        with pytest.raises(KvmError) as err:
            vm.set_user_memory_region2(0, KVM_MEM_GUEST_MEMFD, 0, SIZE, host, guest_memfd=0)
        assert err.value.errno == errno.EINVAL and "guest_memfd 0" in str(err.value)
    vm.set_user_memory_region2(1, 0, 0, SIZE, host)
    with pytest.raises(KvmError) as err:                               # overlaps slot 1
        vm.set_user_memory_region2(2, 0, 0x8000, SIZE, host)
    assert err.value.errno == errno.EEXIST
    vm.set_user_memory_region2(1, 0, 0, 0, host)
    mem.close()


@pytest.mark.requires_cap(Cap.GUEST_MEMFD)
def test_region2_binds_a_guest_memfd(kvm, vm):
    mem, host = host_memory()
    gmem = create_guest_memfd(vm, SIZE)
    vm.set_user_memory_region2(0, KVM_MEM_GUEST_MEMFD, 0, SIZE, host,
                               guest_memfd=gmem.fileno(), guest_memfd_offset=0)
    with pytest.raises(KvmError) as err:           # past the guest_memfd's end
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, 0x100000, SIZE, host,
                                   guest_memfd=gmem.fileno(), guest_memfd_offset=SIZE)
    assert err.value.errno == errno.EINVAL
    vm.set_user_memory_region2(0, KVM_MEM_GUEST_MEMFD, 0, 0, host,
                               guest_memfd=gmem.fileno())
    gmem.close()
    mem.close()
