"""PIO and MMIO buses: route userspace I/O exits to Python devices by address range.

A device is any object with `read(offset, size) -> bytes` and `write(offset, data)`; offsets
are relative to the base it was registered at. Unclaimed accesses follow one documented
policy: reads return all ones (as an empty ISA/PCI bus does), writes are dropped, and both
are counted.
"""

from __future__ import annotations

import threading
from bisect import bisect_right as _bisect_right
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import MAX_KEPT_ERRORS, GuestError


class Device(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


#: Mappings at most this long are found by one dict lookup of the address (every address of
#: theirs is a key); longer ones (PCI BARs, RAM-like devices) by one bisect step.
INDEXED_LENGTH = 0x1000


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: Device
    end: int = field(init=False, repr=False, compare=False)  # base + length, kept: hot path

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", self.base + self.length)


class Bus:
    """An address space of devices. Registration is locked; dispatch reads an immutable
    snapshot, so vCPU threads dispatch without taking a lock."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._lock = threading.Lock()
        # (bases, mappings), replaced whole under the lock and read once per dispatch, so a
        # vCPU thread never pairs the bases of one version with the mappings of another.
        # _index (address -> Mapping, for the short mappings) is published with it: a
        # dispatch reads the one attribute it needs, each version whole.
        self._snapshot: tuple[tuple[int, ...], tuple[Mapping, ...]] = ((), ())
        self._index: dict[int, Mapping] = {}
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        self.guest_errors: list[GuestError] = []   # the first MAX_KEPT_ERRORS
        self.guest_error_count = 0

    def register(self, base: int, length: int, device: Device) -> Mapping:
        if length <= 0:
            raise ValueError(f"{self.name}: device length must be positive, got {length}")
        if base < 0 or base + length > self.size:
            raise ValueError(f"{self.name}: range {base:#x}+{length:#x} is outside the bus "
                             f"(0..{self.size - 1:#x})")
        if not (callable(getattr(device, "read", None)) and
                callable(getattr(device, "write", None))):
            raise TypeError("a device needs read(offset, size) and write(offset, data)")
        mapping = Mapping(base, length, device)
        with self._lock:
            current = self._snapshot[1]
            for other in current:
                if other.base < mapping.end and base < other.end:
                    raise ValueError(f"{self.name}: range {base:#x}+{length:#x} overlaps "
                                     f"{type(other.device).__name__} at "
                                     f"{other.base:#x}+{other.length:#x}")
            self._publish(current + (mapping,))
        return mapping

    def _publish(self, mappings) -> None:
        mappings = tuple(sorted(mappings, key=lambda m: m.base))
        self._index = {address: m for m in mappings if m.length <= INDEXED_LENGTH
                       for address in range(m.base, m.end)}
        self._snapshot = (tuple(m.base for m in mappings), mappings)

    def unregister(self, device_or_mapping) -> None:
        with self._lock:
            current = self._snapshot[1]
            keep = tuple(m for m in current
                         if m is not device_or_mapping and m.device is not device_or_mapping)
            if len(keep) == len(current):
                raise ValueError(f"{self.name}: {device_or_mapping!r} is not registered")
            self._publish(keep)

    def find(self, address: int, size: int = 1) -> Mapping | None:
        """The mapping holding all of `address`..`address + size - 1`, or None: one dict
        lookup for short mappings, one bisect step for the others."""
        mapping = self._index.get(address)
        if mapping is None:
            bases, mappings = self._snapshot
            i = _bisect_right(bases, address) - 1
            if i < 0:
                return None
            mapping = mappings[i]
        if mapping.base <= address and address + size <= mapping.end:
            return mapping
        return None

    def devices(self) -> list[Mapping]:
        return list(self._snapshot[1])

    def _guest_error(self, err: GuestError) -> None:
        self.guest_error_count += 1
        if len(self.guest_errors) < MAX_KEPT_ERRORS:
            self.guest_errors.append(err)

    # -- dispatch ------------------------------------------------------------------------

    def read(self, address: int, size: int) -> bytes:
        mapping = self.find(address, size)
        if mapping is None:
            self.unclaimed_reads += 1
            return b"\xff" * size
        try:
            data = mapping.device.read(address - mapping.base, size)
        except GuestError as err:
            self._guest_error(err)
            return b"\xff" * size
        if len(data) != size:
            raise ValueError(f"{type(mapping.device).__name__}.read returned {len(data)} bytes "
                             f"for a {size}-byte access")
        return data

    def write(self, address: int, data: bytes) -> None:
        # find()'s dict step inlined: this runs on every userspace write exit.
        mapping = self._index.get(address)
        if mapping is None or address + len(data) > mapping.end:
            mapping = self.find(address, len(data))
            if mapping is None:
                self.unclaimed_writes += 1
                return
        try:
            mapping.device.write(address - mapping.base, data)
        except GuestError as err:
            self._guest_error(err)

    def handle_io(self, exit) -> None:
        """Serve an IoExit, one element at a time for string I/O."""
        data = exit.data
        size = exit.size
        port = exit.port
        if size and len(data) == size:  # a single access, the common case: no element loop
            # read()/write()'s indexed step inlined (one frame fewer per exit); an unclaimed
            # port or a bisect goes to them
            mapping = self._index.get(port)
            if mapping is None or port + size > mapping.end:
                if exit.is_write:
                    self.write(port, data.tobytes())
                else:
                    data[:] = self.read(port, size)
            elif exit.is_write:
                try:
                    mapping.device.write(port - mapping.base, data.tobytes())
                except GuestError as err:
                    self._guest_error(err)
            else:   # an IN: the other hot PIO exit (the guest waits for its answer)
                try:
                    value = mapping.device.read(port - mapping.base, size)
                except GuestError as err:
                    self._guest_error(err)
                    value = b"\xff" * size
                if len(value) != size:
                    raise ValueError(f"{type(mapping.device).__name__}.read returned "
                                     f"{len(value)} bytes for a {size}-byte access")
                data[:] = value
            return
        if size == 0:
            return
        end = len(data) - len(data) % size  # whole elements only, whatever kvm_run claimed
        if exit.is_write:
            for i in range(0, end, size):
                self.write(port, bytes(data[i: i + size]))
        else:
            for i in range(0, end, size):
                data[i: i + size] = self.read(port, size)

    def handle_mmio(self, exit) -> None:
        if exit.is_write:
            address, data = exit.address, exit.data
            mapping = self._index.get(address)   # as in handle_io
            if mapping is not None and address + len(data) <= mapping.end:
                try:
                    mapping.device.write(address - mapping.base, data.tobytes())
                except GuestError as err:
                    self._guest_error(err)
                return
            self.write(address, data.tobytes())
        else:
            exit.data[:] = self.read(exit.address, len(exit.data))


class PioBus(Bus):
    def __init__(self) -> None:
        super().__init__("pio", 0x10000)


class MmioBus(Bus):
    def __init__(self) -> None:
        super().__init__("mmio", 1 << 64)


class Counter:
    """A device that counts writes (and answers reads with the count): the userspace end of
    the doorbell harness."""

    def __init__(self) -> None:
        self.count = 0
        self.last = b""
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes) -> None:
        lock = self._lock
        if not lock.acquire(False):  # uncontended first: a blocking acquire reads the clock
            lock.acquire()
        self.count += 1
        self.last = data
        lock.release()

    def read(self, offset: int, size: int) -> bytes:
        return (self.count & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class Memory:
    """A plain RAM-like device backed by a bytearray (useful in tests and as a scratch BAR)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset: offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset: offset + len(data)] = data
