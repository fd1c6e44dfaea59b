"""The device model: buses that route userspace exits to Python devices, and devices that use
the kernel's fast paths (ioeventfd doorbells, irqfd interrupts)."""

from .bus import Bus, Counter, Device, Memory, MmioBus, PioBus
from .doorbell import Doorbell, DoorbellWorker
from .interrupt import Interrupt
from .serial import COM1, SerialConsole

__all__ = [
           "COM1",
           "Bus",
           "Counter",
           "Device",
           "Doorbell",
           "DoorbellWorker",
           "Interrupt",
           "Memory",
           "MmioBus",
           "PioBus",
           "SerialConsole",
]
