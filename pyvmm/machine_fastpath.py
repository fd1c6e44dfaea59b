"""`Machine`'s kernel fast-path devices: ioeventfd doorbells (served by one epoll worker)
and irqfd interrupts (IOAPIC pins or MSI routes). Machine inherits `FastPathMethods`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .devices import Doorbell, DoorbellWorker, Interrupt
from .devices.interrupt import MSI_ADDRESS, GsiRouting
from .errors import ClosedError
from .ioevent import IoEventAddress

if TYPE_CHECKING:
    from .vm import Vm


class FastPathMethods:
    """`Machine.doorbell()`, `interrupt()`, `msi_interrupt()` and the doorbell `worker`."""

    if TYPE_CHECKING:
        doorbells: list[Doorbell]
        interrupts: list[Interrupt]
        _worker: DoorbellWorker | None
        _routing: GsiRouting | None

        @property
        def vm(self) -> Vm: ...

    @property
    def worker(self) -> DoorbellWorker:
        if self.vm.closed:
            raise ClosedError("the machine is closed")
        if self._worker is None:
            self._worker = DoorbellWorker()
        return self._worker

    def doorbell(self, address: IoEventAddress, *, length: int = 0,
                 datamatch: int | None = None,
                 callback: Callable[[Doorbell, int], None] | None = None) -> Doorbell:
        """An ioeventfd doorbell. One with a callback is served by this machine's epoll
        worker; one without only counts (the eventfd accumulates rings in the kernel and
        `count`/`wait()` read them), which keeps a thread from waking on every ring."""
        bell = Doorbell(self.vm, address, length=length, datamatch=datamatch,
                        callback=callback, worker=self.worker if callback else None)
        self.doorbells.append(bell)
        return bell

    def msi_interrupt(self, vector: int, *, address: int = MSI_ADDRESS) -> Interrupt:
        """An irqfd on a new GSI routed to an MSI (`vector`, to local APIC 0 by default): it
        reaches the LAPIC directly, no IOAPIC programming. Needs Machine(irqchip=True)."""
        irq = self._gsi_routing().msi_interrupt(vector, address=address)
        self.interrupts.append(irq)
        return irq

    def interrupt(self, gsi: int) -> Interrupt:
        """An irqfd on `gsi` (needs Machine(irqchip=True)): an IOAPIC pin (0-23) or a GSI
        msi_interrupt() routed; any other is a ValueError, as it could never reach the guest."""
        irq = self._gsi_routing().interrupt(gsi)
        self.interrupts.append(irq)
        return irq

    def _gsi_routing(self) -> GsiRouting:
        if self._routing is None:
            raise ValueError("irqfd interrupts need the in-kernel irqchip: Machine(irqchip=True)")
        return self._routing
