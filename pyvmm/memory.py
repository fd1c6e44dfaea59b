"""Guest memory: anonymous host mappings registered as KVM memslots, and accessors that find
the region behind a guest-physical address."""

from __future__ import annotations

import bisect
import mmap
import threading
from typing import TYPE_CHECKING

from ._ffi import address_of, ffi
from .errors import ClosedError

if TYPE_CHECKING:
    from .vm import Vm

PAGE_SIZE = 4096


class MemoryRegion:
    """One memslot: `size` bytes of host memory seen by the guest at `guest_addr`."""

    def __init__(self, vm: Vm, slot: int, guest_addr: int, size: int, *, readonly: bool,
                 log_dirty: bool, address_space: int,
                 alias_of: MemoryRegion | None = None, offset: int = 0) -> None:
        self.vm = vm
        self.slot = slot
        self.guest_addr = guest_addr
        self.size = size
        self.readonly = readonly
        self.log_dirty = log_dirty
        self.address_space = address_space
        # An alias shows part of another region's host memory (say RAM in the SMM address
        # space too, as QEMU does): it shares that mapping and never unmaps it.
        self.alias_of = alias_of
        self.aliases: list[MemoryRegion] = []
        self._offset = offset
        self.closed = False
        if alias_of is not None:
            self._map = alias_of._map
            self.host_addr = alias_of.host_addr + offset
            return
        # MAP_NORESERVE: a large guest costs only the pages it touches.
        try:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
                                  | getattr(mmap, "MAP_NORESERVE", 0),
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            raise OSError(err.errno, f"cannot map {size:#x} bytes of host memory for the guest "
                          f"region at {guest_addr:#x}: {err.strerror}") from None
        pointer = ffi.from_buffer(self._map)
        self.host_addr = address_of(pointer)
        ffi.release(pointer)

    @property
    def end(self) -> int:
        """First guest-physical address after the region."""
        return self.guest_addr + self.size

    @property
    def kernel_slot(self) -> int:
        """The slot number KVM sees: the address space in bits 16-31."""
        return (self.address_space << 16) | self.slot

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.guest_addr <= gpa and gpa + length <= self.end

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable, zero-copy view of the host memory behind the region."""
        if self.closed:
            raise ValueError("memory region is closed")
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset:#x}+{length:#x} is outside the region of "
                             f"{self.size:#x} bytes")
        start = self._offset + offset
        return memoryview(self._map)[start: start + length]

    def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.alias_of is not None:
            self.alias_of.aliases.remove(self)
            return
        try:
            self._map.close()
        except BufferError:
            # Someone still holds a view; the mapping goes when the last view does.
            pass

    def __repr__(self) -> str:
        flags = "".join(("r" if self.readonly else "w", "d" if self.log_dirty else "-"))
        alias = (f", alias of as={self.alias_of.address_space} "
                 f"gpa={self.alias_of.guest_addr + self._offset:#x}" if self.alias_of else "")
        return (f"MemoryRegion(slot={self.slot}, as={self.address_space}, "
                f"gpa={self.guest_addr:#x}-{self.end:#x}, {flags}{alias})")


class GuestMemory:
    """All memory regions of a VM, by address space; reads and writes by guest-physical
    address, across adjacent regions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # address space -> regions sorted by guest_addr
        self._spaces: dict[int, list[MemoryRegion]] = {}
        self.closed = False

    def regions(self, address_space: int | None = None) -> list[MemoryRegion]:
        if address_space is None:
            return [r for space in sorted(self._spaces) for r in self._spaces[space]]
        return list(self._spaces.get(address_space, ()))

    def overlapping(self, guest_addr: int, size: int, address_space: int) -> MemoryRegion | None:
        for region in self._spaces.get(address_space, ()):
            if region.guest_addr < guest_addr + size and guest_addr < region.end:
                return region
        return None

    def _add(self, region: MemoryRegion) -> None:
        with self._lock:
            space = self._spaces.setdefault(region.address_space, [])
            keys = [r.guest_addr for r in space]
            space.insert(bisect.bisect(keys, region.guest_addr), region)

    def _remove(self, region: MemoryRegion) -> None:
        with self._lock:
            space = self._spaces.get(region.address_space, [])
            if region in space:
                space.remove(region)

    def find(self, gpa: int, address_space: int = 0) -> MemoryRegion | None:
        """The region holding `gpa`, or None."""
        if self.closed:
            raise ClosedError("the VM is closed: its memory is gone")
        for region in self._spaces.get(address_space, ()):
            if region.guest_addr <= gpa < region.end:
                return region
        return None

    def _pieces(self, gpa: int, length: int, address_space: int):
        if length < 0 or gpa < 0:
            raise ValueError(f"bad guest range {gpa:#x}+{length:#x}")
        while length > 0:
            region = self.find(gpa, address_space)
            if region is None:
                raise ValueError(f"guest-physical address {gpa:#x} is not in any memory region "
                                 f"of address space {address_space}")
            offset = gpa - region.guest_addr
            chunk = min(length, region.size - offset)
            yield region, offset, chunk
            gpa += chunk
            length -= chunk

    def read(self, gpa: int, length: int, *, address_space: int = 0) -> bytes:
        return b"".join(bytes(r.view(off, n)) for r, off, n in self._pieces(gpa, length,
                                                                             address_space))

    def write(self, gpa: int, data: bytes, *, address_space: int = 0) -> None:
        data = memoryview(data).cast("B")
        pieces = list(self._pieces(gpa, len(data), address_space))  # validate before writing
        done = 0
        for region, offset, n in pieces:
            region.view(offset, n)[:] = data[done: done + n]
            done += n

    def view(self, gpa: int, length: int, *, address_space: int = 0) -> memoryview:
        """A zero-copy writable view; the range must lie inside one region."""
        region = self.find(gpa, address_space)
        if region is None or not region.contains(gpa, length):
            raise ValueError(f"guest range {gpa:#x}+{length:#x} does not lie inside one memory "
                             f"region of address space {address_space}")
        return region.view(gpa - region.guest_addr, length)

    def read_u64(self, gpa: int, *, address_space: int = 0) -> int:
        return int.from_bytes(self.read(gpa, 8, address_space=address_space), "little")

    def write_u64(self, gpa: int, value: int, *, address_space: int = 0) -> None:
        self.write(gpa, value.to_bytes(8, "little"), address_space=address_space)
