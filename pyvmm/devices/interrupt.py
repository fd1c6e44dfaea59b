"""irqfd interrupts: a device raises a guest interrupt by writing an eventfd that KVM routes
to a GSI of the in-kernel irqchip (an IOAPIC pin, or an MSI route)."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vm import Vm


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
        with self._lock:  # counted first, so count never lags what the guest has seen
            self.count += 1
        os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        if self._fd < 0:
            return
        if not self.vm.closed:
            self.vm.unregister_irqfd(self._fd, self.gsi)
        os.close(self._fd)
        self._fd = -1

    def __repr__(self) -> str:
        return f"Interrupt(gsi={self.gsi}, count={self.count})"
