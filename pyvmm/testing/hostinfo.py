# SPDX-License-Identifier: GPL-2.0-or-later
"""What KVM this host has, read from /sys and /proc without opening anything.

Used by the pytest plugin (the end-of-session line) and by the nested runner. Everything here
is cheap, never raises, and imports nothing from pyvmm's core.
"""

from __future__ import annotations

import errno
import fcntl
import os

KVM_FLAVOURS = ("kvm_amd", "kvm_intel", "kvm_pvm")

# _IO(KVMIO=0xAE, 0x03): KVM_CHECK_EXTENSION, argument is the capability number.
KVM_CHECK_EXTENSION = 0xAE03
# _IO(KVMIO=0xAE, 0x01): KVM_CREATE_VM, argument is the machine type (0), returns a VM fd.
KVM_CREATE_VM = 0xAE01


def kvm_module(sys_module: str = "/sys/module", proc_modules: str = "/proc/modules") -> str | None:
    """The loaded KVM vendor module (kvm_amd, kvm_intel, kvm_pvm), or None."""
    for name in KVM_FLAVOURS:
        if os.path.isdir(os.path.join(sys_module, name)):
            return name
    try:
        with open(proc_modules) as f:
            loaded = {line.split(" ", 1)[0] for line in f}
    except OSError:
        return None
    for name in KVM_FLAVOURS:
        if name in loaded:
            return name
    return None


def is_nested(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this machine is itself a guest (the CPU's "hypervisor" flag)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "hypervisor" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def describe_host() -> str:
    """One phrase such as "kvm_pvm (this host is itself a guest)"."""
    module = kvm_module()
    if module is None:
        module = "no KVM module" if not os.path.exists("/dev/kvm") else "unknown KVM"
    where = "this host is itself a guest" if is_nested() else "bare metal"
    if os.environ.get("PYVMM_NESTED") == "1":
        where = "inside the pyvmm nested runner, under QEMU TCG"
    return f"{module} ({where})"


def probe_caps(caps: dict[str, int], path: str = "/dev/kvm", *, vm: bool = False
               ) -> dict[str, int]:
    """KVM_CHECK_EXTENSION for each named capability, with plain fcntl.

    ``vm=True`` asks a fresh VM fd instead of the system fd (some capabilities, such as
    MULTI_ADDRESS_SPACE, answer differently there). Raises the OSError of open() or
    KVM_CREATE_VM. Independent of pyvmm's core on purpose: deciding whether a test can run
    must not depend on the code under test.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    vm_fd = -1
    try:
        if vm:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        out = {}
        for name, number in caps.items():
            try:
                out[name] = fcntl.ioctl(vm_fd if vm else fd, KVM_CHECK_EXTENSION, number)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                out[name] = 0
        return out
    finally:
        if vm_fd >= 0:
            os.close(vm_fd)
        os.close(fd)
