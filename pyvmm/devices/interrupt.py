"""irqfd interrupts: a device raises a guest interrupt by writing an eventfd that KVM routes
to a GSI of the in-kernel irqchip (an IOAPIC pin, or an MSI route)."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vm import Vm


KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2
IOAPIC_PINS = 24
MSI_ADDRESS = 0xFEE00000  # an MSI to local APIC 0, physical destination


def default_routes() -> list[tuple]:
    """The GSI routing KVM_CREATE_IRQCHIP installs on x86: GSIs 0-15 to the 8259s and the
    IOAPIC, 16-23 to the IOAPIC only. KVM_SET_GSI_ROUTING replaces the whole table, so a
    table with MSI routes must carry these too."""
    routes: list[tuple] = []
    for gsi in range(IOAPIC_PINS):
        routes.append(("irqchip", gsi, KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < 16:
            chip = KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE
            routes.append(("irqchip", gsi, chip, gsi % 8))
    return routes


def msi_data(vector: int) -> int:
    """MSI data for a fixed, edge-triggered interrupt on `vector`."""
    if not 16 <= vector <= 255:
        raise ValueError(f"MSI vector {vector} is outside 16..255")
    return vector


class Interrupt:
    """`trigger()` raises GSI `gsi` (edge: the kernel pulses the line) without an ioctl."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self._lock = threading.Lock()
        self.count = 0
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm.register_irqfd(self._fd, gsi)
        except BaseException:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def trigger(self) -> None:
        # Under the lock with close(), so the write can never reach a reused fd number.
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"interrupt on GSI {self.gsi} is closed")
            self.count += 1  # counted first, so count never lags what the guest has seen
            os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            if not self.vm.closed:
                self.vm.unregister_irqfd(self._fd, self.gsi)
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"Interrupt(gsi={self.gsi}, count={self.count})"
