# SPDX-License-Identifier: GPL-2.0-or-later
"""irqfd interrupts: a device raises a guest interrupt by writing an eventfd that KVM routes
to a GSI of the in-kernel irqchip (an IOAPIC pin, or an MSI route)."""

from __future__ import annotations

import operator
import os
import threading
import weakref
from collections.abc import Container
from typing import TYPE_CHECKING

from .limits import KVM_MAX_IRQ_ROUTES

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


def default_gsis() -> range:
    """The GSIs the default routing of KVM_CREATE_IRQCHIP reaches (the IOAPIC's pins)."""
    return range(IOAPIC_PINS)


def check_gsi(gsi, routed: Container[int] | None = None) -> int:
    """`gsi` as an int, or a ValueError that says why it can never reach the guest: not an
    integer (anything operator.index takes is one; a bool is not), negative, at or above
    KVM_MAX_IRQ_ROUTES (KVM can route no such GSI), or not in `routed` (the GSIs the
    caller's routing table holds, when it says)."""
    if isinstance(gsi, bool):
        raise ValueError(f"GSI {gsi!r} is a bool, not an interrupt number")
    try:
        gsi = operator.index(gsi)
    except TypeError:
        raise ValueError(f"GSI {gsi!r} is not an integer") from None
    if not 0 <= gsi < KVM_MAX_IRQ_ROUTES:
        raise ValueError(f"GSI {gsi} is outside 0..{KVM_MAX_IRQ_ROUTES - 1}: KVM routes no "
                         "GSI beyond that, so an irqfd there could never reach the guest")
    if routed is not None and gsi not in routed:
        raise ValueError(f"GSI {gsi} has no route in the irqchip's routing table (routed: "
                         f"{_describe(routed)}): an irqfd there could never reach the guest")
    return gsi


def _describe(routed: Container[int]) -> str:
    if isinstance(routed, range) and routed.step == 1:
        return f"{routed.start}..{routed.stop - 1}"
    try:
        return ", ".join(str(g) for g in sorted(routed))  # type: ignore[call-overload]
    except TypeError:
        return repr(routed)


def _release_irqfd(fd: int, vm_ref: weakref.ref, gsi: int) -> None:
    """Finalizer of a collected interrupt's eventfd: deassign it while its VM is open, then
    close it. Holds the VM only weakly."""
    vm = vm_ref()
    try:
        if vm is not None and not vm.closed:
            vm.unregister_irqfd(fd, gsi)
    except Exception:  # noqa: BLE001 - nobody to tell in a finalizer; the fd still closes
        pass
    finally:
        os.close(fd)


class Interrupt:
    """`trigger()` raises GSI `gsi` (edge: the kernel pulses the line) without an ioctl.
    `routed`, when given, holds the GSIs the VM's routing reaches (e.g. default_gsis() plus
    its MSI routes); a GSI outside it is refused. A dropped Interrupt releases its eventfd
    when collected."""

    def __init__(self, vm: Vm, gsi: int, *, routed: Container[int] | None = None) -> None:
        gsi = check_gsi(gsi, routed)
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
        self._finalizer = weakref.finalize(self, _release_irqfd, self._fd, weakref.ref(vm),
                                           gsi)
        self._finalizer.atexit = False  # at exit the process's fds close with it

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
        """Deassign the irqfd and close its eventfd. Idempotent."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                if not self.vm.closed:
                    self.vm.unregister_irqfd(self._fd, self.gsi)
            finally:
                self._finalizer.detach()
                os.close(self._fd)
                self._fd = -1

    def __repr__(self) -> str:
        return f"Interrupt(gsi={self.gsi}, count={self.count})"


class GsiRouting:
    """The GSI routing table of a VM with the in-kernel irqchip, kept where interrupts are
    made: the default IOAPIC/PIC routes plus MSI routes added one at a time (GSIs 24 and up).
    It knows which GSIs reach the guest, so an interrupt on any other is refused (`in`
    tests a GSI). KVM_SET_GSI_ROUTING replaces the whole table: every call sends all of it."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self._lock = threading.Lock()
        self._msi: dict[int, tuple[int, int]] = {}   # gsi -> (address, data)

    def __contains__(self, gsi: object) -> bool:
        return gsi in default_gsis() or gsi in self._msi

    def __iter__(self):
        return iter([*default_gsis(), *sorted(self._msi)])

    def add_msi(self, vector: int, *, address: int = MSI_ADDRESS) -> int:
        """Route a new GSI to an MSI (`vector`, to local APIC 0 by default); returns it."""
        data = msi_data(vector)
        with self._lock:
            gsi = IOAPIC_PINS + len(self._msi)
            if gsi >= KVM_MAX_IRQ_ROUTES:
                raise ValueError(f"no GSI left for another MSI route ({KVM_MAX_IRQ_ROUTES} "
                                 "is KVM's limit)")
            routes = {**self._msi, gsi: (address, data)}
            self.vm.set_gsi_routing(default_routes() + [("msi", g, a, d) for g, (a, d)
                                                        in sorted(routes.items())])
            self._msi = routes
            return gsi

    def interrupt(self, gsi: int) -> Interrupt:
        """An irqfd on `gsi`, which must be routed (ValueError otherwise)."""
        return Interrupt(self.vm, gsi, routed=self)

    def msi_interrupt(self, vector: int, *, address: int = MSI_ADDRESS) -> Interrupt:
        """An irqfd on a new GSI routed to an MSI: the interrupt reaches the LAPIC directly,
        with no IOAPIC programming in the guest."""
        return Interrupt(self.vm, self.add_msi(vector, address=address), routed=self)
