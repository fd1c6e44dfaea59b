"""KVM ioctl request numbers, computed with ioctl-opt from the cffi struct sizes, and the one
`ioctl()` helper every handle goes through."""

from __future__ import annotations

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from ._ffi import ffi, libc
from .errors import KvmError

KVMIO = 0xAE


def _io(nr: int) -> int:
    return IOC(IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


# System fd
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
KVM_GET_EMULATED_CPUID = _iowr(0x09, "struct kvm_cpuid2")
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, "struct kvm_msr_list")

# VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_IRQ_LINE_STATUS = _iowr(0x67, "struct kvm_irq_level")
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, "struct kvm_coalesced_mmio_zone")
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, "struct kvm_coalesced_mmio_zone")
KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, "struct kvm_clear_dirty_log")
KVM_X86_SET_MSR_FILTER = _iow(0xC6, "struct kvm_msr_filter")
KVM_GET_STATS_FD = _io(0xCE)

# VM and vCPU fds
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")

# vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_INTERRUPT = _iow(0x86, "uint32_t")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_SET_SIGNAL_MASK = _iow(0x8B, "struct kvm_signal_mask")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_NMI = _io(0x9A)
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_SMI = _io(0xB7)

# -- x86 state (pyvmm.state): save/restore of vCPUs and VMs -----------------------------
# VM fd
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")   # sic: _IOR in the kernel's uapi
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
# vCPU fd
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_NESTED_STATE = _iowr(0xBE, "struct kvm_nested_state")
KVM_SET_NESTED_STATE = _iow(0xBF, "struct kvm_nested_state")
KVM_GET_XSAVE2 = _ior(0xCF, "struct kvm_xsave")
KVM_RESET_DIRTY_RINGS = _io(0xC7)   # VM fd

# -- memory (pyvmm.memory_methods, pyvmm.guest_memfd) -----------------------------------
# VM fd
KVM_SET_USER_MEMORY_REGION2 = _iow(0x49, "struct kvm_userspace_memory_region2")
KVM_CREATE_GUEST_MEMFD = _iowr(0xD4, "struct kvm_create_guest_memfd")

#: request number -> name, for error messages.
NAMES: dict[int, str] = {}
for _name, _value in list(globals().items()):
    if _name.startswith("KVM_") and isinstance(_value, int):
        NAMES.setdefault(_value, _name)

_ZERO = ffi.cast("unsigned long", 0)


def ioctl(fd: int, request: int, arg=_ZERO, role: str = "vm", detail: str | None = None) -> int:
    """Issue one ioctl. `arg` is a cdata pointer or an int; a failure raises KvmError."""
    if type(arg) is int:
        arg = ffi.cast("unsigned long", arg)
    result = libc.ioctl(fd, request, arg)
    if result < 0:
        raise KvmError(ffi.errno, NAMES.get(request, hex(request)), role, detail)
    return result
