"""pyvmm: a Python binding over the Linux /dev/kvm ioctls.

A VM by hand (see the README and the guides for more)::

    from pyvmm import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vcpu = vm.create_vcpu()
        exit = vcpu.run()
"""

from . import exits
from .caps import Cap
from .errors import ClosedError, GuestError, KvmError, KvmUnavailable, MissingCapability
from .ioevent import IoEventAddress
from .kvm import CpuidEntry, Kvm
from .memory import GuestMemory, MemoryRegion
from .structs import Fpu, Regs, Sregs, VcpuEvents
from .vcpu import Vcpu
from .vm import Vm

__version__ = "0.1.0"

__all__ = [
    "Cap", "ClosedError", "CpuidEntry", "Fpu", "GuestError", "GuestMemory", "IoEventAddress",
    "Kvm", "KvmError", "KvmUnavailable", "Machine", "MemoryRegion", "MissingCapability", "Regs",
    "Sregs", "Vcpu", "VcpuEvents", "Vm", "exits",
]


def __getattr__(name: str):
    # Machine lives in the device-model layer, above the handles; import it on first use.
    if name == "Machine":
        from .machine import Machine

        return Machine
    raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
