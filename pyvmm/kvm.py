"""`Kvm`: the system fd, /dev/kvm."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import ioctls as io
from ._ffi import ffi
from .caps import Cap
from .cpuid import CpuidEntry, cpuid_from_c, cpuid_to_c, cpuid_vendor, grow_buffer, grow_cpuid
from .errors import ClosedError, KvmError, KvmUnavailable, permission_advice
from .state.host import VcpuHost, ask

if TYPE_CHECKING:
    from .vm import Vm

API_VERSION = 12


def _unavailable(path: str, err: OSError) -> KvmUnavailable:
    if err.errno == errno.ENOENT:
        why = (f"{path} does not exist: KVM is not loaded or not exposed here. Load the module "
               "(`modprobe kvm_intel` or `modprobe kvm_amd`), enable virtualisation in the "
               "firmware, or, inside a VM, enable nested virtualisation on its host.")
    elif err.errno in (errno.EACCES, errno.EPERM):
        why = permission_advice(path)
    elif err.errno == errno.ENXIO or err.errno == errno.ENODEV:
        why = f"{path} has no driver behind it: load kvm_intel or kvm_amd."
    else:
        why = f"opening {path} failed: {os.strerror(err.errno or 0)}."
    exc = KvmUnavailable(err.errno, why)
    exc.filename = path
    return exc


@dataclass(frozen=True)
class VmConfig:
    """What a VM and its vCPUs take from the system handle when the VM is created."""

    vcpu_mmap_size: int
    max_vcpu_id: int
    supported_cpuid_buffer: Callable[[], Any]   # the struct KVM_SET_CPUID2 takes, built once
    cpu_vendor: Callable[[], str]               # "AuthenticAMD", "GenuineIntel", ...
    vcpu_host: VcpuHost = VcpuHost()            # the caps and MSR list a vCPU is given


class Kvm:
    """The KVM system fd. Opens /dev/kvm (or `path`); a context manager."""

    role = "system"

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise _unavailable(path, err) from None
        try:
            self.api_version = io.ioctl(self._fd, io.KVM_GET_API_VERSION, role=self.role)
        except KvmError as err:
            os.close(self._fd)
            self._fd = -1
            raise KvmUnavailable(err.errno, f"{path} is not a KVM device: KVM_GET_API_VERSION "
                                 f"failed with {os.strerror(err.errno or 0)}") from None
        if self.api_version != API_VERSION:
            os.close(self._fd)
            self._fd = -1
            raise KvmUnavailable(errno.EPROTO, f"{path} speaks KVM API {self.api_version}; "
                                 f"pyvmm needs {API_VERSION}")
        self._mmap_size: int | None = None
        self._vendor: str | None = None
        self._supported_cpuid: list[CpuidEntry] | None = None
        self._supported_cpuid_c = None
        self._vcpu_host: VcpuHost | None = None

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedError("Kvm handle is closed")
        return self._fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd: 0 when absent, else the cap's value."""
        return io.ioctl(self.fileno(), io.KVM_CHECK_EXTENSION, int(cap), role=self.role)

    def has(self, cap: int) -> bool:
        return self.check_extension(cap) > 0

    @property
    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = io.ioctl(self.fileno(), io.KVM_GET_VCPU_MMAP_SIZE, role=self.role)
        return self._mmap_size

    @property
    def max_vcpus(self) -> int:
        """How many vCPUs a VM may have (KVM_CAP_MAX_VCPUS, else the recommended NR_VCPUS)."""
        return self.check_extension(Cap.MAX_VCPUS) or self.check_extension(Cap.NR_VCPUS) or 1

    @property
    def max_vcpu_id(self) -> int:
        """The highest vCPU id plus one that KVM_CREATE_VCPU accepts (KVM_CAP_MAX_VCPU_ID,
        else max_vcpus, as api.rst says)."""
        return self.check_extension(Cap.MAX_VCPU_ID) or self.max_vcpus

    def _cpuid(self, request: int) -> list[CpuidEntry]:
        return cpuid_from_c(grow_cpuid(lambda buf: self.ioctl(request, buf)))

    def ioctl(self, request: int, arg: object = 0, detail: str | None = None) -> int:
        """One ioctl on the system fd (KvmError on failure)."""
        return io.ioctl(self.fileno(), request, arg, self.role, detail)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: what a guest may be given with `vcpu.set_cpuid()`.
        Asked once per handle (it does not change, and costs ~0.4 ms); each call returns
        fresh entries the caller may edit."""
        if self._supported_cpuid is None:
            self._supported_cpuid = self._cpuid(io.KVM_GET_SUPPORTED_CPUID)
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in self._supported_cpuid]

    def supported_cpuid_buffer(self):
        """The supported CPUID as the `struct kvm_cpuid2 *` KVM_SET_CPUID2 takes, built once:
        what `vcpu.set_supported_cpuid()` passes, with no per-entry work per vCPU."""
        if self._supported_cpuid_c is None:
            self._supported_cpuid_c = cpuid_to_c(self.supported_cpuid())
        return self._supported_cpuid_c

    @property
    def cpu_vendor(self) -> str:
        """The CPU vendor KVM offers guests ("AuthenticAMD", "GenuineIntel"), cached."""
        if self._vendor is None:
            self._vendor = cpuid_vendor(self.supported_cpuid())
        return self._vendor

    @property
    def is_amd(self) -> bool:
        return self.cpu_vendor in ("AuthenticAMD", "HygonGenuine")

    def emulated_cpuid(self) -> list[CpuidEntry]:
        return self._cpuid(io.KVM_GET_EMULATED_CPUID)

    def _msr_list(self, request: int) -> list[int]:
        buf = grow_buffer(lambda n: ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n}),
                          lambda b: self.ioctl(request, b), 256, 65536)
        return [buf.indices[i] for i in range(buf.nmsrs)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""
        return self._msr_list(io.KVM_GET_MSR_INDEX_LIST)

    def feature_msr_indices(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: the feature MSRs (capabilities userspace may set
        per vCPU, e.g. IA32_ARCH_CAPABILITIES); empty where the host has no such list."""
        try:
            return self._msr_list(io.KVM_GET_MSR_FEATURE_INDEX_LIST)
        except KvmError as err:
            if err.errno in (errno.EINVAL, errno.ENOTTY):
                return []
            raise

    def vcpu_host(self) -> VcpuHost:
        """What every vCPU is given about this host (the capabilities its state code checks,
        the MSRs its state holds), asked once per handle."""
        if self._vcpu_host is None:
            self._vcpu_host = ask(self.check_extension,
                                  lambda: (self.msr_index_list(), self.feature_msr_indices()))
        return self._vcpu_host

    def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM. The Vm gets what its vCPUs need from this handle now (the kvm_run
        size, the vCPU id limit, CPUID providers); it never calls back here."""
        from .vm import Vm

        mmap_size, max_id, host = self.vcpu_mmap_size, self.max_vcpu_id, self.vcpu_host()
        fd = self.ioctl(io.KVM_CREATE_VM, vm_type)
        try:
            return Vm(fd, VmConfig(mmap_size, max_id, self.supported_cpuid_buffer,
                                   lambda: self.cpu_vendor, host))
        except BaseException:
            os.close(fd)
            raise

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Kvm({self.path!r}, api_version={self.api_version}, fd={self._fd})"


__all__ = ["Cap", "CpuidEntry", "Kvm"]
