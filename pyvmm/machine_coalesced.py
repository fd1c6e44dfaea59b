# SPDX-License-Identifier: GPL-2.0-or-later
"""`Machine.coalesce()`: coalesced MMIO/PIO zones whose writes reach the owning device on
the machine's bus in the guest's order, without an exit per write.

KVM appends each guest write into a zone to the VM's ring (`pyvmm.coalesced`) and resumes
the guest. The machine drains the ring to its buses (`mmio.write` / `pio.write`, so the
device registered on that range gets `write(offset, data)`) after every KVM_RUN return of
every vCPU, before the exit is served, and once more when the run ends. So a guest that writes
to a zone and then reads a status port (an exit) sees its writes applied first; when the ring
is full, the write that did not fit exits as usual and is served after the ones before it.
With several vCPUs, the ring's lock makes one thread deliver at a time, and a vCPU serves its
exit only after the writes waiting when it exited have been delivered.

The run loop gets a wrapped run callable only while zones are registered: a machine without
zones runs exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .args import as_index
from .coalesced import CoalescedRing, CoalescedWrite
from .ucall import PORTS as UCALL_PORTS

if TYPE_CHECKING:
    import threading

    from .devices import MmioBus, PioBus
    from .exits import Exit
    from .vm import Vm

__all__ = ["CoalescedMachineMethods", "CoalescedZoneHandle"]


@dataclass(eq=False)
class CoalescedZoneHandle:
    """A zone `Machine.coalesce()` registered; `remove()` unregisters it (idempotent)."""

    address: int
    size: int
    pio: bool
    _remove: Callable[[CoalescedZoneHandle], None] = field(repr=False)
    removed: bool = False

    def remove(self) -> None:
        """Unregister the zone: its writes exit again (those in the ring are still drained)."""
        if not self.removed:
            self._remove(self)


class CoalescedMachineMethods:
    """`Machine.coalesce()`, `coalesced_zones` and the ring draining behind them."""

    if TYPE_CHECKING:
        pio: PioBus
        mmio: MmioBus
        _lock: threading.Lock
        _running: bool

        @property
        def vm(self) -> Vm: ...

    _zones: list[CoalescedZoneHandle]
    _ring: CoalescedRing | None = None

    @property
    def coalesced_zones(self) -> list[CoalescedZoneHandle]:
        """The zones registered with coalesce() and not removed."""
        return list(self.__dict__.get("_zones", ()))

    def coalesce(self, address: int, size: int, *, pio: bool = False) -> CoalescedZoneHandle:
        """Coalesce guest writes to `address`..`address + size - 1` (guest-physical MMIO, or
        ports with `pio=True`): KVM queues them in its ring instead of exiting, and the
        device on `mmio`/`pio` owning that range gets them, in order, before any other exit
        is served and when the run ends. Reads still exit. Needs a vCPU and
        KVM_CAP_COALESCED_MMIO (KVM_CAP_COALESCED_PIO for ports); not during a run."""
        address, size = as_index("zone address", address), as_index("zone size", size)
        if pio and any(address <= p < address + size for p in UCALL_PORTS):
            raise ValueError(f"port zone {address:#x}+{size:#x} covers a ucall port "
                             f"({sorted(hex(p) for p in UCALL_PORTS)}): the run loop "
                             "must see those writes as exits")
        with self._lock:
            if self._running:
                raise RuntimeError("coalesce() while the machine runs: writes queued before "
                                   "the run loop drains them would wait; call it between runs")
            ring = self.vm.coalesced_ring()
            self.vm.register_coalesced_mmio(address, size, pio=pio)
            self._ring = ring
            zone = CoalescedZoneHandle(address, size, pio, self._remove_zone)
            self.__dict__.setdefault("_zones", []).append(zone)
            return zone

    def _remove_zone(self, zone: CoalescedZoneHandle) -> None:
        with self._lock:
            if zone.removed:
                return
            if not self.vm.closed:
                self.vm.unregister_coalesced_mmio(zone.address, zone.size, pio=zone.pio)
            zone.removed = True
            self._zones.remove(zone)

    # -- draining ------------------------------------------------------------------------

    def _deliver(self, write: CoalescedWrite) -> None:
        (self.pio if write.pio else self.mmio).write(write.address, write.data)

    def drain_coalesced(self) -> int:
        """Deliver the writes waiting in the ring to the buses now; returns how many (0 when
        no zone was ever registered or the VM is closed)."""
        ring = self._ring
        if ring is None or ring.closed:
            return 0
        return ring.drain(self._deliver)

    def _coalesced_run(self) -> Callable[[Callable[[], Exit]], Callable[[], Exit]] | None:
        """What the run loop wraps vcpu.run with: None (no cost) without zones."""
        ring = self._ring
        if not self.__dict__.get("_zones") or ring is None:
            return None
        drain, deliver = ring.drain, self._deliver

        def wrap(run: Callable[[], Any]) -> Callable[[], Any]:
            def run_and_drain() -> Any:
                ex = run()
                drain(deliver)   # every write before this exit reaches its device first
                return ex
            return run_and_drain
        return wrap
