# SPDX-License-Identifier: GPL-2.0-or-later
"""The coalesced MMIO/PIO ring: with a zone registered (KVM_REGISTER_COALESCED_MMIO), KVM
does not exit to userspace for a guest write into it; it appends the write (address, length,
up to 8 data bytes, whether it was port I/O) to one ring per VM and resumes the guest. The
ring is one page of the vCPU mmap, at the page offset KVM_CAP_COALESCED_MMIO returns; every
vCPU's mapping shows the same page.

Layout (struct kvm_coalesced_mmio_ring): `first` (u32, the next entry userspace reads; only
userspace writes it), `last` (u32, the next entry KVM fills; only KVM writes it), then
RING_ENTRIES entries of struct kvm_coalesced_mmio (phys_addr u64, len u32, pio u32, data[8]).
KVM keeps one entry free, so at most RING_ENTRIES - 1 writes wait; when the ring is full, the
write that does not fit exits to userspace as an ordinary MMIO (or port I/O) exit.

`CoalescedRing` owns a mapping of that page of its own (so the page outlives no reader and no
reader outlives the page: a closed ring raises ClosedError), checks the indices it reads from
the page before using them, and consumes at most RING_ENTRIES - 1 entries per call.

Memory ordering (x86 only, like the rest of pyvmm): KVM writes an entry, then publishes it by
storing `last` (after a write barrier). The reader loads `last` once, then copies the
entries from `first` up to it, then (after delivering them, in `drain()`) stores the new
`first`. x86 keeps loads in order with
loads and stores after earlier loads, and each step is a separate C call the compiler cannot
move, so the copy sees whole entries and KVM reuses a slot only after it has been copied.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._ffi import ffi
from .errors import ClosedError

if TYPE_CHECKING:
    from .vcpu import Vcpu

__all__ = ["ENTRY_SIZE", "MAX_PENDING", "RING_ENTRIES", "CoalescedRing", "CoalescedWrite",
           "RingCorrupt"]

PAGE = 4096
HEADER = 8                                  # first, last
ENTRY_SIZE = 24                             # sizeof(struct kvm_coalesced_mmio)
#: Entries in the ring (KVM_COALESCED_MMIO_MAX for a 4 KiB page).
RING_ENTRIES = (PAGE - HEADER) // ENTRY_SIZE
#: Writes that can wait in the ring (KVM keeps one entry free to tell full from empty).
MAX_PENDING = RING_ENTRIES - 1
_ENTRY = struct.Struct("<QII8s")
_HEAD = struct.Struct("<II")          # first, last


class RingCorrupt(RuntimeError):
    """The ring page holds an index or an entry KVM cannot have written (something else
    wrote the page): nothing past it is trusted."""


@dataclass(frozen=True)
class CoalescedWrite:
    """One guest write KVM kept in the ring: `address` (guest-physical, or the port for
    port I/O), `data` (the `len` bytes written) and whether it was port I/O."""

    address: int
    data: bytes
    pio: bool = False


class CoalescedRing:
    """The VM's coalesced-write ring, mapped from one of its vCPUs (`page_offset`: what
    KVM_CAP_COALESCED_MMIO returns). Thread-safe: `drain()` holds a lock while it takes and
    delivers entries, so writes reach their devices in the guest's order even when several
    vCPU threads drain."""

    def __init__(self, vcpu: Vcpu, page_offset: int) -> None:
        if isinstance(page_offset, bool) or not isinstance(page_offset, int) \
                or page_offset <= 0:
            raise ValueError(f"the coalesced ring's page offset must be an int > 0 "
                             f"(KVM_CAP_COALESCED_MMIO), not {page_offset!r}")
        # A mapping of our own (Python's mmap keeps a dup of the vCPU fd): the ring stays
        # readable until close(), whatever happens to the vCPU.
        self._map: mmap.mmap | None = mmap.mmap(
            vcpu.fileno(), PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
            offset=page_offset * PAGE)
        self._ptr = ffi.from_buffer(self._map, require_writable=True)
        self._ring = ffi.cast("struct kvm_coalesced_mmio_ring *", self._ptr)
        self._page = memoryview(self._map)
        self._lock = threading.Lock()
        #: Entries consumed since the ring was mapped.
        self.consumed = 0
        #: The most entries one drain() found waiting (MAX_PENDING: the ring was full).
        self.high_water = 0

    @property
    def closed(self) -> bool:
        return self._map is None

    @property
    def indices(self) -> tuple[int, int]:
        """(first, last) as the page holds them now, checked (RingCorrupt otherwise)."""
        return self._indices()

    def _indices(self) -> tuple[int, int]:
        ring = self._ring
        if ring is None:
            raise ClosedError("the coalesced ring is closed")
        last = ring.last          # one load: KVM's publication of the entries before it
        first = ring.first
        if first >= RING_ENTRIES or last >= RING_ENTRIES:
            raise RingCorrupt(f"coalesced ring indices first={first} last={last} are outside "
                              f"0..{RING_ENTRIES - 1}")
        return first, last

    @property
    def pending(self) -> int:
        """Writes waiting in the ring now."""
        first, last = self._indices()
        return (last - first) % RING_ENTRIES

    def take(self) -> list[CoalescedWrite]:
        """Consume the waiting writes (at most MAX_PENDING), oldest first."""
        with self._lock:
            writes, last = self._copy()
            if writes:
                self._ring.first = last   # after the copy: KVM may refill these slots now
            return writes

    def _copy(self) -> tuple[list[CoalescedWrite], int]:
        # The waiting writes and the `last` they end at; `first` is left to the caller.
        first, last = self._indices()
        if first == last:
            return [], last
        count = (last - first) % RING_ENTRIES
        page = self._page
        start = HEADER + first * ENTRY_SIZE
        if first < last:
            raw = bytes(page[start: HEADER + last * ENTRY_SIZE])
        else:  # wrapped: the tail of the array, then its head
            raw = bytes(page[start: HEADER + RING_ENTRIES * ENTRY_SIZE]) \
                + bytes(page[HEADER: HEADER + last * ENTRY_SIZE])
        out = []
        for i, (addr, length, pio, data) in enumerate(_ENTRY.iter_unpack(raw)):
            if not 0 < length <= 8 or pio > 1:
                self._ring.first = last   # dropped: nothing in this batch is trusted
                raise RingCorrupt(f"coalesced ring entry {(first + i) % RING_ENTRIES}: "
                                  f"len {length}, pio {pio} (KVM writes len 1..8, pio 0/1)")
            out.append(CoalescedWrite(addr, data[:length], bool(pio)))
        self.consumed += count
        if count > self.high_water:
            self.high_water = count
        return out, last

    def drain(self, deliver: Callable[[CoalescedWrite], object]) -> int:
        """Consume the waiting writes and call `deliver(write)` for each, in order, under
        the ring's lock; returns how many. Every taken write is delivered even if one
        delivery raises; the first exception is raised at the end. A closed ring has nothing
        to drain (0): a vCPU thread leaving KVM_RUN while its VM closes must not fail.

        `first` advances only once the batch is delivered, so a thread that finds the ring
        empty (first == last, read without the lock: the cheap path of every exit) knows no
        other thread is still delivering writes that came before its exit."""
        try:
            first, last = _HEAD.unpack_from(self._page)
        except (ValueError, TypeError):   # the view was released: the ring is closed
            return 0
        if first == last:
            return 0
        with self._lock:
            if self._map is None:
                return 0
            writes, last = self._copy()
            error: BaseException | None = None
            try:
                for write in writes:
                    try:
                        deliver(write)
                    except BaseException as err:
                        if error is None:
                            error = err
            finally:
                if writes:
                    self._ring.first = last
            if error is not None:
                raise error
            return len(writes)

    def close(self) -> None:
        """Unmap the ring page (idempotent; waits for a drain() in progress)."""
        with self._lock:
            if self._map is None:
                return
            self._ring = None
            ffi.release(self._ptr)
            self._page.release()
            self._map.close()
            self._map = None

    def __enter__(self) -> CoalescedRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._map is None else f"{self.pending} pending"
        return f"CoalescedRing({state}, consumed={self.consumed})"
