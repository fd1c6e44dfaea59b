"""Guest memory: anonymous host mappings registered as KVM memslots (slot allocation, aliases,
remove guards), and accessors that find the region behind a guest-physical address."""

from __future__ import annotations

import bisect
import heapq
import mmap
import threading
from collections.abc import Callable

from ._ffi import address_of, ffi
from .caps import Cap
from .errors import ClosedError, MissingCapability

PAGE_SIZE = 4096
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2
KVM_MEM_GUEST_MEMFD = 4     # private memory comes from a guest_memfd (SET_USER_MEMORY_REGION2)

#: set_slot(kernel_slot, flags, guest_addr, size, host_addr): KVM_SET_USER_MEMORY_REGION.
SetSlot = Callable[[int, int, int, int, int], None]


def check_range(guest_addr: int, size: int) -> None:
    """ValueError unless guest_addr+size is a page-aligned range inside the 52-bit
    guest-physical space."""
    if guest_addr < 0 or guest_addr % PAGE_SIZE:
        raise ValueError(f"guest address {guest_addr:#x} is not page-aligned (4 KiB)")
    if guest_addr + size > 1 << 52:
        raise ValueError(f"region {guest_addr:#x}+{size:#x} ends beyond the 52-bit "
                         "guest-physical space")


def slot_flags(region: MemoryRegion) -> int:
    """The KVM_MEM_* flags of a region's memslot."""
    return ((KVM_MEM_READONLY if region.readonly else 0)
            | (KVM_MEM_LOG_DIRTY_PAGES if region.log_dirty else 0))


class DirtyBitmap(bytes):
    """KVM's dirty bitmap of one region: bit n set = page n was written since the last read."""

    def pages(self) -> list[int]:
        return [i * 8 + b for i, byte in enumerate(self) if byte for b in range(8)
                if byte >> b & 1]


class MemoryRegion:
    """One memslot: `size` bytes of host memory seen by the guest at `guest_addr`."""

    def __init__(self, owner: GuestMemory, slot: int, guest_addr: int, size: int, *,
                 readonly: bool, log_dirty: bool, address_space: int,
                 alias_of: MemoryRegion | None = None, offset: int = 0) -> None:
        self.owner = owner      # the GuestMemory it belongs to
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
        self.offset = offset    # into alias_of's host memory (0 for a region of its own)
        self.closed = False
        self._map: mmap.mmap
        self.host_addr: int
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
        start = self.offset + offset
        return memoryview(self._map)[start: start + length]

    def release(self) -> None:
        """Unmap the host memory (an alias only detaches). For GuestMemory: the memslot must
        be gone first."""
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
                 f"gpa={self.alias_of.guest_addr + self.offset:#x}" if self.alias_of else "")
        return (f"MemoryRegion(slot={self.slot}, as={self.address_space}, "
                f"gpa={self.guest_addr:#x}-{self.end:#x}, {flags}{alias})")


class GuestMemory:
    """All memory regions of a VM, by address space: the memslot allocator, aliases and
    remove guards, and reads and writes by guest-physical address, across adjacent regions.
    `set_slot` is the VM's KVM_SET_USER_MEMORY_REGION; `slot_limit()` and
    `address_spaces()` its KVM_CAP_NR_MEMSLOTS and KVM_CAP_MULTI_ADDRESS_SPACE."""

    def __init__(self, set_slot: SetSlot | None = None,
                 slot_limit: Callable[[], int] = lambda: 32,
                 address_spaces: Callable[[], int] = lambda: 1) -> None:
        self._lock = threading.RLock()
        # address space -> regions sorted by guest_addr, and their guest_addr (for bisect: a VM
        # may have KVM_CAP_NR_MEMSLOTS regions, 32764 on some hosts)
        self._spaces: dict[int, list[MemoryRegion]] = {}
        self._starts: dict[int, list[int]] = {}
        # address space -> slot numbers handed out so far (0..top-1) and the freed ones (a heap)
        self._slot_top: dict[int, int] = {}
        self._slots_freed: dict[int, list[int]] = {}
        self._set_slot = set_slot
        self._slot_limit = slot_limit
        self._address_spaces = address_spaces
        self._remove_guards: list[Callable[[MemoryRegion], str | None]] = []
        self.closed = False

    def regions(self, address_space: int | None = None) -> list[MemoryRegion]:
        """The live regions (of one address space, or all), by address."""
        if address_space is None:
            return [r for space in sorted(self._spaces) for r in self._spaces[space]]
        return list(self._spaces.get(address_space, ()))

    def overlapping(self, guest_addr: int, size: int, address_space: int, *,
                    ignore: MemoryRegion | None = None) -> MemoryRegion | None:
        """A region of `address_space` (other than `ignore`) that overlaps guest_addr+size,
        or None."""
        space = self._spaces.get(address_space, [])
        # Regions of one space never overlap, so sorted by start they are sorted by end too:
        # the last one starting before our end (or the one before it, if that is `ignore`)
        # is the only candidate.
        i = bisect.bisect_left(self._starts.get(address_space, []), guest_addr + size) - 1
        while i >= 0 and space[i] is ignore:
            i -= 1
        if i >= 0 and guest_addr < space[i].end:
            return space[i]
        return None

    def owns(self, region: MemoryRegion) -> bool:
        """Whether `region` is a live region of this memory."""
        return region.owner is self and not region.closed

    # -- memslots ------------------------------------------------------------------------

    def add(self, guest_addr: int, size: int, *, readonly: bool = False,
            log_dirty: bool = False, address_space: int = 0,
            alias_of: MemoryRegion | None = None, offset: int = 0) -> MemoryRegion:
        """A new memslot: fresh host memory, or (`alias_of`) `size` bytes of that region's
        host memory from `offset`. Checks every argument before any ioctl."""
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"memory size {size:#x} is not a positive multiple of 4 KiB")
        check_range(guest_addr, size)
        if address_space < 0:
            raise ValueError("address space must be >= 0")
        if address_space > 0 and address_space >= max(self._address_spaces(), 1):
            spaces = max(self._address_spaces(), 1)
            raise MissingCapability(
                Cap.MULTI_ADDRESS_SPACE, "KVM_SET_USER_MEMORY_REGION", "vm",
                f"address space {address_space} needs {address_space + 1} address spaces, "
                f"this VM has {spaces} (SMRAM needs stock KVM with SMM: try `pyvmm nested`)")
        with self._lock:
            if self.closed:
                raise ClosedError("the VM is closed: its memory is gone")
            other = self.overlapping(guest_addr, size, address_space)
            if other is not None:
                raise ValueError(f"region {guest_addr:#x}+{size:#x} overlaps {other!r}")
            freed = self._slots_freed.setdefault(address_space, [])
            slot = freed[0] if freed else self._slot_top.get(address_space, 0)  # the lowest
            if slot >= self._slot_limit():
                raise ValueError(f"no free memslot: KVM allows {self._slot_limit()} per "
                                 "address space (KVM_CAP_NR_MEMSLOTS)")
            region = MemoryRegion(self, slot, guest_addr, size, readonly=readonly,
                                  log_dirty=log_dirty, address_space=address_space,
                                  alias_of=alias_of, offset=offset)
            try:
                if self._set_slot is not None:
                    self._set_slot(region.kernel_slot, slot_flags(region), guest_addr, size,
                                   region.host_addr)
            except BaseException:
                region.release()
                raise
            if freed:
                heapq.heappop(freed)
            else:
                self._slot_top[address_space] = slot + 1
            self._insert(region)
            if alias_of is not None:
                alias_of.aliases.append(region)
            return region

    def alias(self, region: MemoryRegion, guest_addr: int | None = None, *, offset: int = 0,
              size: int | None = None, address_space: int = 1,
              readonly: bool = False) -> MemoryRegion:
        """`size` bytes of `region`'s host memory, from `offset`, shown at `guest_addr` (by
        default where they are in `region`) in another address space."""
        if not self.owns(region) or region.alias_of is not None:
            raise ValueError(f"{region!r} is not a live, non-alias region of this VM")
        if offset < 0 or offset % PAGE_SIZE:
            raise ValueError(f"alias offset {offset:#x} is not page-aligned")
        size = region.size - offset if size is None else size
        if size <= 0 or offset + size > region.size:
            raise ValueError(f"alias {offset:#x}+{size:#x} is outside {region!r}")
        if guest_addr is None:
            guest_addr = region.guest_addr + offset
        return self.add(guest_addr, size, readonly=readonly, address_space=address_space,
                        alias_of=region, offset=offset)

    def add_remove_guard(self, guard: Callable[[MemoryRegion], str | None]
                         ) -> Callable[[MemoryRegion], str | None]:
        """`guard(region)` is asked before `remove(region)`; a string it returns is the
        reason the removal is refused (a device still using the region's pages)."""
        if not callable(guard):
            raise TypeError("a remove guard must be callable")
        with self._lock:
            self._remove_guards.append(guard)
        return guard

    def remove(self, region: MemoryRegion) -> None:
        """Delete the memslot and release its host memory (after its aliases and guards)."""
        with self._lock:
            if not self.owns(region):
                raise ValueError(f"{region!r} is not a live region of this VM")
            if region.aliases:
                raise ValueError(f"{region!r} is still shown by {len(region.aliases)} alias(es): "
                                 "remove them first")
            for guard in self._remove_guards:
                reason = guard(region)
                if reason:
                    raise ValueError(f"{region!r} cannot be removed: {reason}")
            if self._set_slot is not None:
                self._set_slot(region.kernel_slot, 0, region.guest_addr, 0, 0)
            self._forget(region)
            region.release()

    def move(self, region: MemoryRegion, guest_addr: int) -> None:
        """Show `region` at guest-physical `guest_addr` instead (KVM_SET_USER_MEMORY_REGION
        of the same slot, size, host memory and flags: KVM's KVM_MR_MOVE). Checks every
        argument before the ioctl; on a kernel refusal (KvmError) nothing changes. A region
        that aliases show elsewhere is refused (move or remove its aliases first); an alias
        itself may move. Moving to where it already is does nothing."""
        with self._lock:
            if not self.owns(region):
                raise ValueError(f"{region!r} is not a live region of this VM")
            check_range(guest_addr, region.size)
            if region.aliases:
                raise ValueError(f"{region!r} is shown by {len(region.aliases)} alias(es), "
                                 "which would not move with it: remove them first")
            if guest_addr == region.guest_addr:
                return
            other = self.overlapping(guest_addr, region.size, region.address_space,
                                     ignore=region)
            if other is not None:
                raise ValueError(f"{region!r} cannot move to {guest_addr:#x}: "
                                 f"{guest_addr:#x}+{region.size:#x} overlaps {other!r}")
            if self._set_slot is not None:
                self._set_slot(region.kernel_slot, slot_flags(region), guest_addr,
                               region.size, region.host_addr)
            self._unlink(region)
            region.guest_addr = guest_addr
            self._insert(region)

    def set_flags(self, region: MemoryRegion, *, log_dirty: bool | None = None,
                  readonly: bool | None = None) -> None:
        """Toggle a live region's KVM_MEM_LOG_DIRTY_PAGES (None: keep it). KVM cannot change
        KVM_MEM_READONLY of a live memslot (it answers EINVAL): asking to is a ValueError
        before any ioctl; remove the region and add it again instead."""
        with self._lock:
            if not self.owns(region) or region.alias_of is not None:
                raise ValueError(f"{region!r} is not a live, non-alias region of this VM")
            if readonly is not None and bool(readonly) != region.readonly:
                raise ValueError(f"{region!r}: KVM cannot make a live memslot "
                                 f"{'read-only' if readonly else 'writable'} (EINVAL); remove "
                                 "the region and add it again")
            if log_dirty is None or bool(log_dirty) == region.log_dirty:
                return
            flags = slot_flags(region) ^ KVM_MEM_LOG_DIRTY_PAGES
            if self._set_slot is not None:
                self._set_slot(region.kernel_slot, flags, region.guest_addr, region.size,
                               region.host_addr)
            region.log_dirty = bool(log_dirty)

    def _insert(self, region: MemoryRegion) -> None:
        space = self._spaces.setdefault(region.address_space, [])
        starts = self._starts.setdefault(region.address_space, [])
        i = bisect.bisect(starts, region.guest_addr)
        starts.insert(i, region.guest_addr)
        space.insert(i, region)

    def _unlink(self, region: MemoryRegion) -> bool:
        space = self._spaces.get(region.address_space, [])
        starts = self._starts.get(region.address_space, [])
        i = bisect.bisect_left(starts, region.guest_addr)
        if i < len(space) and space[i] is region:
            del space[i], starts[i]
            return True
        return False

    def _forget(self, region: MemoryRegion) -> None:
        if self._unlink(region):
            heapq.heappush(self._slots_freed.setdefault(region.address_space, []), region.slot)

    def release_all(self) -> None:
        """Once the VM fd is closed (the kernel dropped the memslots): release every region's
        host memory; the memory is closed from now on."""
        with self._lock:
            for region in self.regions():
                self._forget(region)
                region.release()
            self.closed = True

    def find(self, gpa: int, address_space: int = 0) -> MemoryRegion | None:
        """The region holding `gpa`, or None."""
        with self._lock:  # a move in another thread changes both lists
            if self.closed:
                raise ClosedError("the VM is closed: its memory is gone")
            space = self._spaces.get(address_space, [])
            i = bisect.bisect_right(self._starts.get(address_space, []), gpa) - 1
            return space[i] if i >= 0 and gpa < space[i].end else None

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
        view = memoryview(data).cast("B")
        pieces = list(self._pieces(gpa, len(view), address_space))  # validate before writing
        done = 0
        for region, offset, n in pieces:
            region.view(offset, n)[:] = view[done: done + n]
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
