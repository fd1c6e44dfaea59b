"""Every bad input in docs/HARDENING.md, and what it gets. Each case runs against the real
/dev/kvm; the assertion names both the exception type and what its message must say."""

from __future__ import annotations

import errno
import os

import pytest

from pyvmm import (Cap, ClosedError, CpuidEntry, IoEventAddress, KvmError, MissingCapability)
from pyvmm.devices import PioBus


def _eventfd():
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    return fd


@pytest.fixture
def fds():
    opened = []

    def make(kind="eventfd"):
        if kind == "eventfd":
            fd = _eventfd()
            opened.append(fd)
            return fd
        r, w = os.pipe()
        opened.extend((r, w))
        return r

    yield make
    for fd in opened:
        os.close(fd)


# (case id, action(vm, fds), expected exception, errno or None, text the message contains)
MEMORY_CASES = [
    ("unaligned-address", lambda vm, f: vm.add_memory(0x1001, 0x1000), ValueError, None,
     "not page-aligned"),
    ("unaligned-size", lambda vm, f: vm.add_memory(0, 0x1800), ValueError, None,
     "multiple of 4 KiB"),
    ("zero-size", lambda vm, f: vm.add_memory(0, 0), ValueError, None, "positive"),
    ("negative-address", lambda vm, f: vm.add_memory(-0x1000, 0x1000), ValueError, None,
     "not page-aligned"),
    ("beyond-52-bits", lambda vm, f: vm.add_memory(1 << 52, 0x1000), ValueError, None,
     "52-bit"),
    ("huge", lambda vm, f: vm.add_memory(1 << 32, 1 << 46), OSError, errno.ENOMEM,
     "cannot map"),
    ("overlap", lambda vm, f: (vm.add_memory(0, 0x4000), vm.add_memory(0x2000, 0x4000)),
     ValueError, None, "overlaps"),
    ("address-space-1", lambda vm, f: vm.add_memory(0, 0x1000, address_space=1),
     MissingCapability, errno.EOPNOTSUPP, "MULTI_ADDRESS_SPACE"),
    ("read-outside", lambda vm, f: vm.memory.read(0x10000, 4), ValueError, None,
     "not in any memory region"),
    ("write-outside", lambda vm, f: vm.memory.write(0x10000, b"x"), ValueError, None,
     "not in any memory region"),
    ("view-across-regions", lambda vm, f: (vm.add_memory(0, 0x1000),
                                           vm.add_memory(0x1000, 0x1000),
                                           vm.memory.view(0x800, 0x1000)),
     ValueError, None, "inside one memory region"),
    ("dirty-log-without-flag", lambda vm, f: vm.dirty_log(vm.add_memory(0, 0x1000)),
     ValueError, None, "log_dirty"),
]

IOEVENT_CASES = [
    ("duplicate", lambda vm, f: [vm.register_ioevent(f(), IoEventAddress.pio(0x10), length=2)
                                 for _ in range(2)], KvmError, errno.EEXIST,
     "already registered"),
    ("wildcard-and-datamatch", lambda vm, f: (
        vm.register_ioevent(f(), IoEventAddress.mmio(0xD000_0000), length=4),
        vm.register_ioevent(f(), IoEventAddress.mmio(0xD000_0000), length=4, datamatch=1)),
     KvmError, errno.EEXIST, "already registered"),
    ("not-an-eventfd", lambda vm, f: vm.register_ioevent(f("pipe"), IoEventAddress.pio(0x10),
                                                         length=1),
     KvmError, errno.EINVAL, "not an eventfd"),
    ("closed-fd", lambda vm, f: vm.register_ioevent(1 << 20, IoEventAddress.pio(0x10),
                                                    length=1),
     KvmError, errno.EBADF, "not open"),
    ("length-3", lambda vm, f: vm.register_ioevent(f(), IoEventAddress.mmio(0xD000_0000),
                                                   length=3), ValueError, None, "length 3"),
    ("length-16", lambda vm, f: vm.register_ioevent(f(), IoEventAddress.mmio(0xD000_0000),
                                                    length=16), ValueError, None, "length 16"),
    ("pio-8", lambda vm, f: vm.register_ioevent(f(), IoEventAddress.pio(0x10), length=8),
     ValueError, None, "never match"),
    ("wildcard-datamatch", lambda vm, f: vm.register_ioevent(
        f(), IoEventAddress.mmio(0xD000_0000), length=0, datamatch=5), ValueError, None,
     "needs a length"),
    ("datamatch-too-wide", lambda vm, f: vm.register_ioevent(
        f(), IoEventAddress.pio(0x10), length=1, datamatch=0x100), ValueError, None,
     "does not fit"),
    ("pio-past-ffff", lambda vm, f: vm.register_ioevent(f(), IoEventAddress.pio(0xFFFF),
                                                        length=2), ValueError, None,
     "past port 0xffff"),
    ("mmio-wraps", lambda vm, f: vm.register_ioevent(
        f(), IoEventAddress.mmio((1 << 64) - 2), length=4), ValueError, None, "wraps"),
    ("port-out-of-range", lambda vm, f: IoEventAddress.pio(0x10000), ValueError, None,
     "outside 0..0xffff"),
    ("not-an-address", lambda vm, f: vm.register_ioevent(f(), 0x10, length=1), TypeError, None,
     "IoEventAddress"),
    ("deassign-never-assigned", lambda vm, f: vm.unregister_ioevent(
        f(), IoEventAddress.pio(0x10), length=1), KvmError, errno.ENOENT,
     "no ioeventfd"),
]

IRQ_CASES = [
    ("irqfd-without-irqchip", lambda vm, f: vm.register_irqfd(f(), 5), KvmError, errno.EINVAL,
     "irqchip"),
    ("irqfd-not-an-eventfd", lambda vm, f: (vm.create_irqchip(),
                                            vm.register_irqfd(f("pipe"), 5)),
     KvmError, errno.EINVAL, "not an eventfd"),
    ("irq-line-without-irqchip", lambda vm, f: vm.irq_line(5, 1), KvmError, errno.ENXIO,
     "create_irqchip"),
    ("gsi-negative", lambda vm, f: vm.irq_line(-1, 1), ValueError, None, "GSI -1"),
    ("irqfd-gsi-negative", lambda vm, f: vm.register_irqfd(f(), -5), ValueError, None,
     "GSI -5"),
]

VCPU_CASES = [
    ("vcpu-id-4096", lambda vm, f: vm.create_vcpu(4096), ValueError, None, "outside 0..4095"),
    ("vcpu-id-negative", lambda vm, f: vm.create_vcpu(-1), ValueError, None, "outside"),
    ("vcpu-id-duplicate", lambda vm, f: (vm.create_vcpu(3), vm.create_vcpu(3)), ValueError,
     None, "already exists"),
    ("vcpu-id-of-closed-vcpu", lambda vm, f: (vm.create_vcpu(3).close(), vm.create_vcpu(3)),
     ValueError, None, "frees vCPU ids only with the VM"),
    ("sregs-paging-without-protection", lambda vm, f: _set_cr0(vm.create_vcpu(), 0x80000000),
     KvmError, errno.EINVAL, "KVM_SET_SREGS"),
    ("msr-unknown", lambda vm, f: vm.create_vcpu().set_msrs({0xDEADBEEF: 1}), KvmError,
     errno.EINVAL, "0xdeadbeef"),
    ("msr-read-unknown", lambda vm, f: vm.create_vcpu().get_msrs([0xDEADBEEF]), KvmError,
     errno.EINVAL, "0xdeadbeef"),
    ("msr-index-too-wide", lambda vm, f: vm.create_vcpu().get_msrs([1 << 48]), ValueError,
     None, "outside 0..0xffffffff"),
    ("msr-value-too-wide", lambda vm, f: vm.create_vcpu().set_msrs({0x174: 1 << 64}),
     ValueError, None, "64 bits"),
    ("vcpu-enable-cap-5-args", lambda vm, f: vm.create_vcpu().enable_cap(1, 1, 2, 3, 4, 5),
     ValueError, None, "at most 4"),
    ("cpuid-too-many", lambda vm, f: vm.create_vcpu().set_cpuid(
        [CpuidEntry(i) for i in range(300)]), KvmError, errno.E2BIG, "KVM_SET_CPUID2"),
    ("mp-state-unknown", lambda vm, f: vm.create_vcpu().set_mp_state(99), KvmError,
     errno.EINVAL, "KVM_SET_MP_STATE"),
    ("interrupt-vector", lambda vm, f: vm.create_vcpu().interrupt(256), ValueError, None,
     "0..255"),
    ("enable-unknown-cap", lambda vm, f: vm.enable_cap(9999, 1), KvmError, errno.EINVAL,
     "KVM_CAP_9999"),
    ("msr-filter-17-ranges", lambda vm, f: vm.set_msr_filter([(1, 0, b"\0")] * 17), ValueError,
     None, "at most 16"),
]


def _set_cr0(vcpu, cr0):
    sregs = vcpu.get_sregs()
    sregs.cr0 = cr0
    vcpu.set_sregs(sregs)


CASES = MEMORY_CASES + IOEVENT_CASES + IRQ_CASES + VCPU_CASES


@pytest.mark.parametrize("action,exc,err,text", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input(vm, fds, action, exc, err, text):
    if exc is MissingCapability and vm.check_extension(Cap.MULTI_ADDRESS_SPACE) >= 2:
        pytest.skip("this KVM has a second address space (SMRAM tests cover it)")
    with pytest.raises(exc) as info:
        action(vm, fds)
    if err is not None:
        assert info.value.errno == err
    assert text in str(info.value)
    # Nothing was half-done: the VM still works for a good call afterwards.
    region = vm.add_memory(0x100000, 0x1000)
    vm.memory.write(0x100000, b"ok")
    assert vm.memory.read(0x100000, 2) == b"ok"
    vm.remove_memory(region)


@pytest.mark.parametrize("use", [
    lambda vm, vcpu: vm.add_memory(0, 0x1000),
    lambda vm, vcpu: vm.memory.read(0, 1),
    lambda vm, vcpu: vm.create_vcpu(),
    lambda vm, vcpu: vm.register_ioevent(0, IoEventAddress.pio(1), length=1),
    lambda vm, vcpu: vm.check_extension(Cap.IOEVENTFD),
    lambda vm, vcpu: vcpu.run(),
    lambda vm, vcpu: vcpu.get_regs(),
    lambda vm, vcpu: vcpu.set_msrs({0x174: 0}),
    lambda vm, vcpu: vcpu.stats(),
], ids=["add_memory", "memory.read", "create_vcpu", "register_ioevent", "check_extension",
        "vcpu.run", "get_regs", "set_msrs", "stats"])
def test_closed_handles_raise_closed_error(kvm, use):
    vm = kvm.create_vm()
    vm.add_memory(0, 0x1000)
    vcpu = vm.create_vcpu()
    vm.close()
    with pytest.raises(ClosedError):
        use(vm, vcpu)
    vcpu.kick()   # harmless on a closed vCPU
    vm.close()    # idempotent


def test_device_access_outside_its_region_is_unclaimed():
    bus = PioBus()

    class Four:
        def read(self, offset, size):
            return bytes([offset]) * size

        def write(self, offset, data):
            raise AssertionError("must not be called")

    bus.register(0x100, 4, Four())
    assert bus.read(0x103, 1) == b"\x03"
    assert bus.read(0x103, 2) == b"\xff\xff"   # straddles the end: not the device's
    bus.write(0x104, b"\x00")                 # past the end: dropped, counted
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (1, 1)
