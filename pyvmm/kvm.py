"""`Kvm`: the system fd, /dev/kvm."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import ioctls as io
from ._ffi import ffi
from .caps import Cap
from .errors import ClosedError, KvmError, KvmUnavailable, permission_advice

if TYPE_CHECKING:
    from .vm import Vm

API_VERSION = 12


@dataclass(slots=True)
class CpuidEntry:
    """One CPUID leaf as KVM describes it (struct kvm_cpuid_entry2)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


def cpuid_to_c(entries) -> object:
    """A `struct kvm_cpuid2 *` holding `entries` (CpuidEntry objects or cdata entries)."""
    entries = list(entries)
    buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, e in enumerate(entries):
        c = buf.entries[i]
        c.function, c.index, c.flags = e.function, e.index, e.flags
        c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
    return buf


def cpuid_from_c(buf) -> list[CpuidEntry]:
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (buf.entries[i] for i in range(buf.nent))]


def cpuid_vendor(entries) -> str:
    """The vendor string of CPUID leaf 0 in `entries` ("AuthenticAMD", ...), or ""."""
    for entry in entries:
        if entry.function == 0:
            return b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx)
                            ).decode("ascii", "replace")
    return ""


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
                                 f"failed with {os.strerror(err.errno)}") from None
        if self.api_version != API_VERSION:
            os.close(self._fd)
            self._fd = -1
            raise KvmUnavailable(errno.EPROTO, f"{path} speaks KVM API {self.api_version}; "
                                 f"pyvmm needs {API_VERSION}")
        self._mmap_size: int | None = None
        self._vendor: str | None = None
        self._supported_cpuid: list[CpuidEntry] | None = None
        self._supported_cpuid_c = None

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

    def _cpuid(self, request: int) -> list[CpuidEntry]:
        nent = 128
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            try:
                io.ioctl(self.fileno(), request, buf, role=self.role)
            except KvmError as err:
                if err.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return cpuid_from_c(buf)

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

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""
        n = 256
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                io.ioctl(self.fileno(), io.KVM_GET_MSR_INDEX_LIST, buf, role=self.role)
            except KvmError as err:
                if err.errno == errno.E2BIG and n < 65536:
                    n *= 4
                    continue
                raise
            return [buf.indices[i] for i in range(buf.nmsrs)]

    def create_vm(self, vm_type: int = 0) -> Vm:
        from .vm import Vm

        fd = io.ioctl(self.fileno(), io.KVM_CREATE_VM, vm_type, role=self.role)
        return Vm(self, fd)

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
