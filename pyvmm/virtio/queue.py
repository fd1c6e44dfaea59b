# SPDX-License-Identifier: GPL-2.0-or-later
"""Split virtqueues (virtio 1.x, section 2.7): the descriptor table, the driver ("avail") ring
and the device ("used") ring in guest memory, read and written by the device.

Everything the driver wrote is untrusted. Every address and length is checked against guest
RAM before it is used, chains are bounded (a loop cannot spin), and a chain that breaks the
rules raises `VirtqueueError`, which the transport answers with DEVICE_NEEDS_RESET.

Layouts (little-endian): a descriptor is {addr u64, len u32, flags u16, next u16} (16 bytes);
the driver ring is {flags u16, idx u16, ring[num] u16, used_event u16}; the device ring is
{flags u16, idx u16, ring[num] {id u32, len u32}, avail_event u16}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import GuestError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768
#: Entries of one indirect table (the spec's limit is the 32-bit length; ours bounds work).
MAX_INDIRECT = 4096
#: Bytes one chain may describe: a driver cannot make the host buffer gigabytes.
MAX_CHAIN_BYTES = 64 << 20

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class VirtqueueError(GuestError):
    """The driver broke the virtqueue rules (a bad ring, descriptor or chain)."""


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's event-index test: did the index move from `old` to `new` past `event`?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class GuestRam:
    """Checked access to guest memory: every range must lie in RAM (it may cross adjacent
    regions); anything else is a `VirtqueueError`, never a host exception."""

    def __init__(self, memory) -> None:
        self.memory = memory

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise VirtqueueError(f"guest range {gpa:#x}+{length:#x} overflows")
        end = gpa + length
        while gpa < end:
            try:
                region = self.memory.find(gpa)
            except ValueError as err:  # the VM is closed
                raise VirtqueueError(str(err)) from err
            if region is None:
                raise VirtqueueError(f"guest address {gpa:#x} is not RAM")
            gpa = region.end

    def read(self, gpa: int, length: int) -> bytes:
        try:
            return self.memory.read(gpa, length)
        except ValueError as err:
            raise VirtqueueError(f"read of {gpa:#x}+{length:#x}: {err}") from err

    def write(self, gpa: int, data: bytes) -> None:
        try:
            self.memory.write(gpa, data)
        except ValueError as err:
            raise VirtqueueError(f"write of {gpa:#x}+{len(data):#x}: {err}") from err


@dataclass(frozen=True)
class Buffer:
    """One descriptor's buffer: guest address, length, and whether the device writes it."""

    addr: int
    length: int
    writable: bool


class Chain:
    """A descriptor chain taken from the driver ring: readable buffers, then writable ones."""

    def __init__(self, queue: Virtqueue, head: int, buffers: list[Buffer]) -> None:
        self.queue = queue
        self.head = head
        self.buffers = buffers
        self.readable = [b for b in buffers if not b.writable]
        self.writable = [b for b in buffers if b.writable]
        self.written = 0

    @property
    def read_len(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def write_len(self) -> int:
        return sum(b.length for b in self.writable)

    def read(self, limit: int | None = None) -> bytes:
        """The driver's bytes (the readable buffers, concatenated), at most `limit`."""
        out = bytearray()
        for b in self.readable:
            n = b.length if limit is None else min(b.length, limit - len(out))
            if n <= 0:
                break
            out += self.queue.ram.read(b.addr, n)
        return bytes(out)

    def write(self, data: bytes) -> int:
        """Append `data` to what the device wrote so far; returns the bytes that fit."""
        done = 0
        skip = self.written
        for b in self.writable:
            if skip >= b.length:
                skip -= b.length
                continue
            n = min(b.length - skip, len(data) - done)
            if n <= 0:
                break
            self.queue.ram.write(b.addr + skip, data[done:done + n])
            done += n
            skip = 0
        self.written += done
        return done


class Virtqueue:
    """One split virtqueue as the transport configures it (size and the three areas) and as
    the device consumes it (`pop`, `push`, `needs_interrupt`)."""

    def __init__(self, index: int, ram: GuestRam, num_max: int = 256) -> None:
        if not 1 <= num_max <= MAX_QUEUE_SIZE or num_max & (num_max - 1):
            raise ValueError(f"queue size {num_max} must be a power of 2 up to {MAX_QUEUE_SIZE}")
        self.index = index
        self.ram = ram
        self.num_max = num_max
        self.event_idx = False     # VIRTIO_F_EVENT_IDX negotiated
        self.indirect_ok = False   # VIRTIO_F_INDIRECT_DESC negotiated
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset: not ready, nothing configured."""
        self.num = self.num_max
        self.ready = False
        self.desc_addr = self.driver_addr = self.device_addr = 0
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0   # used index at the last interrupt (event-idx bookkeeping)
        self.popped = 0
        self.pushed = 0

    def validate(self) -> None:
        """Check the configuration when the driver sets QueueReady (sizes, alignment, RAM)."""
        num = self.num
        if not 1 <= num <= self.num_max or num & (num - 1):
            raise VirtqueueError(f"queue {self.index}: size {num} is not a power of 2 in "
                                 f"1..{self.num_max}")
        for name, addr, align, size in (("descriptor table", self.desc_addr, 16, 16 * num),
                                        ("driver ring", self.driver_addr, 2, 6 + 2 * num),
                                        ("device ring", self.device_addr, 4, 6 + 8 * num)):
            if addr % align:
                raise VirtqueueError(f"queue {self.index}: {name} at {addr:#x} is not "
                                     f"{align}-byte aligned")
            self.ram.check(addr, size)

    # -- the driver ring ----------------------------------------------------------------

    def _u16(self, gpa: int) -> int:
        return _U16.unpack(self.ram.read(gpa, 2))[0]

    def avail_idx(self) -> int:
        return self._u16(self.driver_addr + 2)

    def pending(self) -> int:
        """Chains the driver made available that the device has not taken yet."""
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.num:
            raise VirtqueueError(f"queue {self.index}: driver index moved {n} entries ahead "
                                 f"of a {self.num}-entry ring")
        return n

    def pop(self) -> Chain | None:
        """The next available chain, validated, or None. With event-idx, an empty ring also
        publishes avail_event (notify me at the next buffer) and looks once more, so a
        buffer added meanwhile is not left without a notification."""
        if not self.ready:
            return None
        if not self.pending():
            if not self.event_idx:
                return None
            self.ram.write(self.device_addr + 4 + 8 * self.num,
                           _U16.pack(self.last_avail & 0xFFFF))
            if not self.pending():
                return None
        slot = self.driver_addr + 4 + 2 * (self.last_avail % self.num)
        head = self._u16(slot)
        chain = Chain(self, head, list(self._walk(head)))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.popped += 1
        return chain

    def _desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.ram.read(table + DESC_SIZE * i, DESC_SIZE))

    def _walk(self, head: int) -> Iterator[Buffer]:
        if head >= self.num:
            raise VirtqueueError(f"queue {self.index}: head {head} outside a {self.num}-entry "
                                 "table")
        table, size, i = self.desc_addr, self.num, head
        indirect = False
        seen = 0
        total = 0
        writing = False
        while True:
            seen += 1
            if seen > size:
                raise VirtqueueError(f"queue {self.index}: chain from {head} loops or is "
                                     f"longer than its {size}-entry table")
            addr, length, flags, nxt = self._desc(table, i)
            if flags & DESC_F_INDIRECT:
                if indirect:
                    raise VirtqueueError(f"queue {self.index}: indirect table inside an "
                                         "indirect table")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: descriptor {i} sets both "
                                         "INDIRECT and NEXT")
                if not self.indirect_ok:
                    raise VirtqueueError(f"queue {self.index}: INDIRECT_DESC not negotiated")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"queue {self.index}: indirect table length {length}")
                self.ram.check(addr, length)
                table, size, i, indirect, seen = addr, length // DESC_SIZE, 0, True, 0
                continue
            if length:
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise VirtqueueError(f"queue {self.index}: chain from {head} describes "
                                         f"more than {MAX_CHAIN_BYTES} bytes")
                self.ram.check(addr, length)
            is_write = bool(flags & DESC_F_WRITE)
            if writing and not is_write:
                raise VirtqueueError(f"queue {self.index}: a device-readable descriptor "
                                     "follows a device-writable one")
            writing = is_write
            yield Buffer(addr, length, is_write)
            if not flags & DESC_F_NEXT:
                return
            if nxt >= size:
                raise VirtqueueError(f"queue {self.index}: next {nxt} outside a {size}-entry "
                                     "table")
            i = nxt

    # -- the device ring ----------------------------------------------------------------

    def push(self, chain: Chain, written: int | None = None) -> None:
        """Return `chain` to the driver with `written` bytes (default: what chain.write
        wrote). The element is written before the index, so the driver never sees an index
        covering an element not yet there."""
        written = chain.written if written is None else written
        slot = self.device_addr + 4 + 8 * (self.used_idx % self.num)
        self.ram.write(slot, _USED_ELEM.pack(chain.head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.ram.write(self.device_addr + 2, _U16.pack(self.used_idx))
        self.pushed += 1

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one
        (used_event with event-idx, else the NO_INTERRUPT flag). Updates the bookkeeping."""
        old, new = self.signalled_used, self.used_idx
        if old == new:
            return False
        self.signalled_used = new
        if self.event_idx:
            used_event = self._u16(self.driver_addr + 4 + 2 * self.num)
            return need_event(used_event, new, old)
        return not self._u16(self.driver_addr) & AVAIL_F_NO_INTERRUPT
