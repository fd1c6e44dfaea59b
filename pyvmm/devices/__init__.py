"""The device model: buses that route userspace exits to Python devices, devices that use
the kernel's fast paths (ioeventfd doorbells, irqfd interrupts), a hypercall dispatcher and
the paravirtual DMA device."""

from .bus import Bus, Counter, Device, Memory, MmioBus, PioBus
from .doorbell import Doorbell, DoorbellWorker
from .hypercall import HypercallCall, HypercallDispatcher, HypercallError
from .interrupt import Interrupt
from .pvdma import PVDMA_PORT, DmaMapping, PvDma
from .serial import COM1, SerialConsole

__all__ = [
           "COM1",
           "Bus",
           "Counter",
           "Device",
           "DmaMapping",
           "Doorbell",
           "DoorbellWorker",
           "HypercallCall",
           "HypercallDispatcher",
           "HypercallError",
           "Interrupt",
           "Memory",
           "MmioBus",
           "PVDMA_PORT",
           "PioBus",
           "PvDma",
           "SerialConsole",
]

# -- the PC platform's devices (pyvmm.platform assembles them) --
from .debug_exit import DEBUG_EXIT_PORT, DebugExit  # noqa: E402
from .fw_cfg import FW_CFG_PORT, FwCfg  # noqa: E402

__all__ += ["DEBUG_EXIT_PORT", "DebugExit", "FW_CFG_PORT", "FwCfg"]
from .pc_testdev import PcTestdev  # noqa: E402
from .pci import PciBus, PciFunction, PciHostBridge  # noqa: E402
from .pci_testdev import PciTestdev  # noqa: E402

__all__ += ["PcTestdev", "PciBus", "PciFunction", "PciHostBridge", "PciTestdev"]
from .acpi_pm import AcpiPm  # noqa: E402
from .i8042 import I8042, SystemControlA  # noqa: E402
from .rtc import Rtc  # noqa: E402

__all__ += ["AcpiPm", "I8042", "Rtc", "SystemControlA"]
from . import firmware  # noqa: E402,F401  (the BIOS state: IVT, BDA, 8259/PIT init stub)
