"""`Vm`: a VM fd, with its memory, vCPUs and in-kernel registrations."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import ioctls as io
from ._ffi import ffi
from .caps import Cap
from .errors import ClosedError, KvmError, MissingCapability
from .ioevent import IoEventAddress
from .memory import PAGE_SIZE, GuestMemory, MemoryRegion

if TYPE_CHECKING:
    from .kvm import Kvm
    from .vcpu import Vcpu

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2
IOEVENTFD_DATAMATCH, IOEVENTFD_PIO, IOEVENTFD_DEASSIGN = 1, 2, 4
IRQFD_DEASSIGN, IRQFD_RESAMPLE = 1, 2
MAX_VCPU_ID = 4096

log = logging.getLogger("pyvmm")


def _fd_of(eventfd) -> int:
    return eventfd if isinstance(eventfd, int) else eventfd.fileno()


class DirtyBitmap(bytes):
    """KVM's dirty bitmap of one region: bit n set = page n was written since the last read."""

    def pages(self) -> list[int]:
        return [i * 8 + b for i, byte in enumerate(self) if byte for b in range(8)
                if byte >> b & 1]


class Vm:
    role = "vm"

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self._fd = fd
        self._lock = threading.RLock()
        self.memory = GuestMemory()
        self.vcpus: dict[int, Vcpu] = {}
        self._vcpu_ids: set[int] = set()  # KVM frees a vCPU id only with the VM
        self._ioevents: set[tuple] = set()
        self._irqfds: set[tuple[int, int]] = set()
        self._slots_used: dict[int, set[int]] = {}
        self._caps: dict[int, int] = {}
        self._max_slots: int | None = None
        self._hypercall_exits = 0      # KVM_CAP_EXIT_HYPERCALL mask enabled so far
        self._disabled_quirks = 0      # KVM_CAP_DISABLE_QUIRKS2 mask disabled so far
        self._close_hooks: list[Callable[[Vm], object]] = []
        self._remove_guards: list[Callable[[MemoryRegion], str | None]] = []
        self.close_hook_errors: list[BaseException] = []

    # -- basics --------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedError("Vm is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _ioctl(self, request: int, arg=0, detail: str | None = None) -> int:
        return io.ioctl(self.fileno(), request, arg, self.role, detail)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (what this VM supports), cached."""
        cap = int(cap)
        if cap not in self._caps:
            self._caps[cap] = self._ioctl(io.KVM_CHECK_EXTENSION, cap)
        return self._caps[cap]

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        req = ffi.new("struct kvm_enable_cap *", {"cap": int(cap), "flags": flags,
                                                   "args": list(args)})
        name = Cap(cap).name if int(cap) in Cap._value2member_map_ else str(int(cap))
        self._ioctl(io.KVM_ENABLE_CAP, req, detail=f"KVM_CAP_{name} args {list(args)}")

    def enable_hypercall_exits(self, *numbers: int) -> int:
        """Send the hypercalls `numbers` (KVM_HC_*) to userspace as HypercallExit
        (KVM_CAP_EXIT_HYPERCALL). Adds to the numbers enabled before; returns the whole mask.

        Raises MissingCapability when this host's mask (KVM_CHECK_EXTENSION) lacks one of
        them. Stock KVM offers only KVM_HC_MAP_GPA_RANGE (12); every other hypercall stays in
        the kernel (an unknown number returns -KVM_ENOSYS to the guest). Note that kvm_pvm
        reports the capability but never delivers the exit (a CPL0 hypercall hangs KVM_RUN).
        """
        mask = 0
        for nr in numbers:
            if not 0 <= int(nr) < 64:
                raise ValueError(f"hypercall number {nr} cannot be in the 64-bit exit mask")
            mask |= 1 << int(nr)
        supported = self.check_extension(Cap.EXIT_HYPERCALL)
        if mask & ~supported:
            offered = [n for n in range(64) if supported >> n & 1]
            wanted = [n for n in range(64) if mask >> n & 1 and not supported >> n & 1]
            raise MissingCapability(
                Cap.EXIT_HYPERCALL, "KVM_ENABLE_CAP", self.role,
                f"hypercall number(s) {wanted} cannot exit to userspace; this KVM offers "
                f"{offered or 'none'}")
        with self._lock:
            new = self._hypercall_exits | mask
            self.enable_cap(Cap.EXIT_HYPERCALL, new)
            self._hypercall_exits = new
        return new

    def disable_quirks(self, mask: int) -> int:
        """Turn off KVM quirks (KVM_CAP_DISABLE_QUIRKS2; KVM_X86_QUIRK_* bits of
        kernel_headers/constants.h, e.g. 32 = FIX_HYPERCALL_INSN: without it, the other
        vendor's hypercall instruction raises #UD instead of being patched). Adds to the
        quirks disabled before; returns the whole mask. Raises MissingCapability for a bit
        this KVM cannot disable."""
        if mask < 0:
            raise ValueError("quirk mask must be >= 0")
        supported = self.check_extension(Cap.DISABLE_QUIRKS2)
        if mask & ~supported:
            raise MissingCapability(
                Cap.DISABLE_QUIRKS2, "KVM_ENABLE_CAP", self.role,
                f"quirk bits {mask & ~supported:#x} cannot be disabled; this KVM allows "
                f"{supported:#x}")
        with self._lock:
            new = self._disabled_quirks | mask
            self.enable_cap(Cap.DISABLE_QUIRKS2, new)
            self._disabled_quirks = new
        return new

    def add_close_hook(self, hook: Callable[[Vm], object]) -> Callable[[Vm], object]:
        """Call `hook(vm)` once when the VM closes: after its vCPUs have stopped and before
        guest memory is released (devices unpin or flush guest pages there). Hooks run in
        reverse order of registration; an exception in one is logged and kept in
        `close_hook_errors`, and never stops the others or the release of memory."""
        if not callable(hook):
            raise TypeError("a close hook must be callable")
        with self._lock:
            self.fileno()
            self._close_hooks.append(hook)
        return hook

    def add_remove_guard(self, guard: Callable[[MemoryRegion], str | None]
                         ) -> Callable[[MemoryRegion], str | None]:
        """`guard(region)` is asked before `remove_memory(region)`; a string it returns is
        the reason the removal is refused (a device still using the region's pages)."""
        if not callable(guard):
            raise TypeError("a remove guard must be callable")
        with self._lock:
            self._remove_guards.append(guard)
        return guard

    # -- memory --------------------------------------------------------------------------

    def _slot_limit(self) -> int:
        if self._max_slots is None:
            self._max_slots = self.check_extension(Cap.NR_MEMSLOTS) or 32
        return self._max_slots

    def add_memory(self, guest_addr: int, size: int, *, readonly: bool = False,
                   log_dirty: bool = False, address_space: int = 0) -> MemoryRegion:
        """Map `size` bytes of fresh anonymous host memory at guest-physical `guest_addr`."""
        return self._add_region(guest_addr, size, readonly=readonly, log_dirty=log_dirty,
                                address_space=address_space)

    def alias_memory(self, region: MemoryRegion, guest_addr: int | None = None, *,
                     offset: int = 0, size: int | None = None, address_space: int = 1,
                     readonly: bool = False) -> MemoryRegion:
        """Show `size` bytes of `region`'s host memory, from `offset`, at `guest_addr` (by
        default where they are in `region`) in another address space: the same RAM seen
        from SMM, as QEMU maps it, so an SMI handler can reach the memory the rest of the
        guest uses. Writes through either are the same bytes. Remove aliases before their
        region; closing the VM releases both."""
        if region.vm is not self or region.closed or region.alias_of is not None:
            raise ValueError(f"{region!r} is not a live, non-alias region of this VM")
        if offset < 0 or offset % PAGE_SIZE:
            raise ValueError(f"alias offset {offset:#x} is not page-aligned")
        size = region.size - offset if size is None else size
        if size <= 0 or offset + size > region.size:
            raise ValueError(f"alias {offset:#x}+{size:#x} is outside {region!r}")
        if guest_addr is None:
            guest_addr = region.guest_addr + offset
        return self._add_region(guest_addr, size, readonly=readonly, log_dirty=False,
                                address_space=address_space, alias_of=region, offset=offset)

    def _add_region(self, guest_addr: int, size: int, *, readonly: bool, log_dirty: bool,
                    address_space: int, alias_of: MemoryRegion | None = None,
                    offset: int = 0) -> MemoryRegion:
        if guest_addr < 0 or guest_addr % PAGE_SIZE:
            raise ValueError(f"guest address {guest_addr:#x} is not page-aligned (4 KiB)")
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"memory size {size:#x} is not a positive multiple of 4 KiB")
        if guest_addr + size > 1 << 52:
            raise ValueError(f"region {guest_addr:#x}+{size:#x} ends beyond the 52-bit "
                             "guest-physical space")
        if address_space < 0:
            raise ValueError("address space must be >= 0")
        if address_space > 0:
            spaces = self.check_extension(Cap.MULTI_ADDRESS_SPACE)
            if address_space >= max(spaces, 1):
                raise MissingCapability(
                    Cap.MULTI_ADDRESS_SPACE, "KVM_SET_USER_MEMORY_REGION", self.role,
                    f"address space {address_space} needs {address_space + 1} address spaces, "
                    f"this VM has {max(spaces, 1)} (SMRAM needs stock KVM with SMM: "
                    "try `pyvmm nested`)")
        flags = (KVM_MEM_READONLY if readonly else 0) | (KVM_MEM_LOG_DIRTY_PAGES if log_dirty
                                                         else 0)
        with self._lock:
            self.fileno()
            other = self.memory.overlapping(guest_addr, size, address_space)
            if other is not None:
                raise ValueError(f"region {guest_addr:#x}+{size:#x} overlaps {other!r}")
            used = self._slots_used.setdefault(address_space, set())
            slot = next(i for i in range(len(used) + 1) if i not in used)
            if slot >= self._slot_limit():
                raise ValueError(f"no free memslot: KVM allows {self._slot_limit()}")
            region = MemoryRegion(self, slot, guest_addr, size, readonly=readonly,
                                  log_dirty=log_dirty, address_space=address_space,
                                  alias_of=alias_of, offset=offset)
            try:
                self._set_region(region.kernel_slot, flags, guest_addr, size, region.host_addr)
            except BaseException:
                region._release()
                raise
            used.add(slot)
            self.memory._add(region)
            if alias_of is not None:
                alias_of.aliases.append(region)
            return region

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, host: int) -> None:
        req = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size,
            "userspace_addr": host})
        self._ioctl(io.KVM_SET_USER_MEMORY_REGION, req,
                    detail=f"slot {slot:#x} gpa {gpa:#x} size {size:#x}")

    def remove_memory(self, region: MemoryRegion) -> None:
        """Delete the memslot and release its host memory."""
        with self._lock:
            if region.vm is not self or region.closed:
                raise ValueError(f"{region!r} is not a live region of this VM")
            if region.aliases:
                raise ValueError(f"{region!r} is still shown by {len(region.aliases)} alias(es): "
                                 "remove them first")
            for guard in self._remove_guards:
                reason = guard(region)
                if reason:
                    raise ValueError(f"{region!r} cannot be removed: {reason}")
            self._set_region(region.kernel_slot, 0, region.guest_addr, 0, 0)
            self.memory._remove(region)
            self._slots_used[region.address_space].discard(region.slot)
            region._release()

    def dirty_log(self, region: MemoryRegion) -> DirtyBitmap:
        """KVM_GET_DIRTY_LOG: pages written by the guest since the last call (a superset)."""
        if region.vm is not self or region.closed:
            raise ValueError(f"{region!r} is not a live region of this VM")
        if not region.log_dirty:
            raise ValueError(f"{region!r} was not added with log_dirty=True")
        npages = region.size // PAGE_SIZE
        bitmap = ffi.new("uint64_t[]", (npages + 63) // 64)
        req = ffi.new("struct kvm_dirty_log *", {"slot": region.kernel_slot})
        req.dirty_bitmap = bitmap
        self._ioctl(io.KVM_GET_DIRTY_LOG, req)
        return DirtyBitmap(bytes(ffi.buffer(bitmap))[: (npages + 7) // 8])

    # -- vCPUs ---------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        from .vcpu import Vcpu

        with self._lock:
            if vcpu_id is None:
                vcpu_id = next(i for i in range(len(self._vcpu_ids) + 1)
                               if i not in self._vcpu_ids)
            if not 0 <= vcpu_id < MAX_VCPU_ID:
                raise ValueError(f"vCPU id {vcpu_id} is outside 0..{MAX_VCPU_ID - 1}")
            if vcpu_id in self.vcpus:
                raise ValueError(f"vCPU {vcpu_id} already exists in this VM")
            if vcpu_id in self._vcpu_ids:
                raise ValueError(f"vCPU id {vcpu_id} was used by a closed vCPU; KVM frees "
                                 "vCPU ids only with the VM")
            fd = self._ioctl(io.KVM_CREATE_VCPU, vcpu_id, detail=f"vCPU id {vcpu_id}")
            self._vcpu_ids.add(vcpu_id)
            try:
                vcpu = Vcpu(self, fd, vcpu_id, self.kvm.vcpu_mmap_size)
            except BaseException:
                os.close(fd)
                raise
            self.vcpus[vcpu_id] = vcpu
            return vcpu

    def _forget_vcpu(self, vcpu: Vcpu) -> None:
        with self._lock:
            if self.vcpus.get(vcpu.id) is vcpu:
                del self.vcpus[vcpu.id]

    # -- interrupts ----------------------------------------------------------------------

    def create_irqchip(self) -> None:
        """The in-kernel PIC, IOAPIC and LAPICs (before creating vCPUs)."""
        self._ioctl(io.KVM_CREATE_IRQCHIP)

    def create_pit(self) -> None:
        self._ioctl(io.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *"))

    def set_tss_addr(self, addr: int) -> None:
        self._ioctl(io.KVM_SET_TSS_ADDR, addr)

    @staticmethod
    def _check_gsi(gsi: int) -> None:
        if not 0 <= gsi < 1 << 32:
            raise ValueError(f"GSI {gsi} is outside 0..2**32-1")

    def irq_line(self, gsi: int, level: int | bool) -> int:
        """Set an interrupt line (KVM_IRQ_LINE_STATUS); returns the delivery status
        (> 0 delivered, 0 masked/coalesced, < 0 ignored)."""
        self._check_gsi(gsi)
        req = ffi.new("struct kvm_irq_level *")
        req.irq = gsi
        req.level = 1 if level else 0
        self._ioctl(io.KVM_IRQ_LINE_STATUS, req, detail=f"gsi {gsi} (ENXIO: no in-kernel "
                    "irqchip; call create_irqchip() first)")
        return req.status

    def signal_msi(self, address: int, data: int) -> int:
        req = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF,
                                            "address_hi": address >> 32, "data": data})
        return self._ioctl(io.KVM_SIGNAL_MSI, req)

    def set_gsi_routing(self, routes: Iterable[tuple]) -> None:
        """KVM_SET_GSI_ROUTING. Each route is ("irqchip", gsi, chip, pin) or
        ("msi", gsi, address, data). Replaces the whole table, as the kernel does."""
        routes = list(routes)
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for i, route in enumerate(routes):
            entry = table.entries[i]
            kind, gsi = route[0], route[1]
            entry.gsi = gsi
            if kind == "irqchip":
                entry.type = 1
                entry.u.irqchip.irqchip, entry.u.irqchip.pin = route[2], route[3]
            elif kind == "msi":
                entry.type = 2
                entry.u.msi.address_lo = route[2] & 0xFFFFFFFF
                entry.u.msi.address_hi = route[2] >> 32
                entry.u.msi.data = route[3]
            else:
                raise ValueError(f"unknown route kind {kind!r}")
        self._ioctl(io.KVM_SET_GSI_ROUTING, table)

    def register_irqfd(self, eventfd, gsi: int, *, resample_fd=None) -> None:
        """KVM_IRQFD: a write to `eventfd` raises `gsi` in the in-kernel irqchip."""
        self._check_gsi(gsi)
        fd = _fd_of(eventfd)
        req = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi})
        if resample_fd is not None:
            req.flags = IRQFD_RESAMPLE
            req.resamplefd = _fd_of(resample_fd)
        self._ioctl(io.KVM_IRQFD, req, detail=f"eventfd {fd} gsi {gsi}: EINVAL means no "
                    "in-kernel irqchip (create_irqchip() first), an fd that is not an eventfd, "
                    "or a GSI the routing table lacks")
        self._irqfds.add((fd, gsi))

    def unregister_irqfd(self, eventfd, gsi: int) -> None:
        fd = _fd_of(eventfd)
        req = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": IRQFD_DEASSIGN})
        self._ioctl(io.KVM_IRQFD, req, detail=f"eventfd {fd} gsi {gsi}")
        self._irqfds.discard((fd, gsi))

    # -- ioeventfd -----------------------------------------------------------------------

    @staticmethod
    def _ioevent_request(fd: int, address: IoEventAddress, length: int, datamatch: int | None,
                         deassign: bool):
        if not isinstance(address, IoEventAddress):
            raise TypeError("address must be IoEventAddress.pio(port) or .mmio(addr)")
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length {length} is not 0 (any), 1, 2, 4 or 8")
        if address.is_pio and length == 8:
            raise ValueError("a PIO ioeventfd of 8 bytes can never match: port I/O is at most "
                             "4 bytes wide")
        if address.is_pio and address.addr + max(length, 1) > 0x10000:
            raise ValueError(f"PIO range {address.addr:#x}+{length} runs past port 0xffff")
        if not address.is_pio and address.addr + max(length, 1) > 1 << 64:
            raise ValueError(f"MMIO range {address.addr:#x}+{length} wraps")
        flags = (IOEVENTFD_PIO if address.is_pio else 0) | (IOEVENTFD_DEASSIGN if deassign
                                                            else 0)
        if datamatch is not None:
            if length == 0:
                raise ValueError("datamatch needs a length: a wildcard-length ioeventfd "
                                 "cannot compare data")
            if not 0 <= datamatch < 1 << (8 * length):
                raise ValueError(f"datamatch {datamatch:#x} does not fit in {length} bytes")
            flags |= IOEVENTFD_DATAMATCH
        return ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": address.addr, "len": length, "fd": fd,
            "flags": flags})

    def register_ioevent(self, eventfd, address: IoEventAddress, *, length: int = 0,
                         datamatch: int | None = None) -> None:
        """KVM_IOEVENTFD: a guest write to `address` signals `eventfd` inside the kernel,
        without an exit to userspace. length 0 matches any access size."""
        fd = _fd_of(eventfd)
        req = self._ioevent_request(fd, address, length, datamatch, False)
        what = f"{address} length {length}" + (f" datamatch {datamatch:#x}"
                                               if datamatch is not None else "")
        try:
            self._ioctl(io.KVM_IOEVENTFD, req)
        except KvmError as err:
            detail = {
                errno.EEXIST: f"an ioeventfd is already registered at {what}",
                errno.EINVAL: f"KVM rejected {what} on fd {fd}: not an eventfd, or a length or "
                              "flag it does not support",
                errno.EBADF: f"fd {fd} is not open",
                errno.ENOSPC: "no room for another ioeventfd on this bus",
            }.get(err.errno, what)
            raise KvmError(err.errno, err.ioctl, self.role, detail) from None
        self._ioevents.add((fd, address, length, datamatch))

    def unregister_ioevent(self, eventfd, address: IoEventAddress, *, length: int = 0,
                           datamatch: int | None = None) -> None:
        fd = _fd_of(eventfd)
        req = self._ioevent_request(fd, address, length, datamatch, True)
        what = f"{address} length {length}" + (f" datamatch {datamatch:#x}"
                                               if datamatch is not None else "")
        try:
            self._ioctl(io.KVM_IOEVENTFD, req)
        except KvmError as err:
            detail = (f"no ioeventfd with fd {fd} is registered at {what}"
                      if err.errno == errno.ENOENT else what)
            raise KvmError(err.errno, err.ioctl, self.role, detail) from None
        self._ioevents.discard((fd, address, length, datamatch))

    # -- MSR filtering -------------------------------------------------------------------

    def set_msr_filter(self, ranges: Iterable[tuple[int, int, bytes]], *,
                       default_allow: bool = True) -> None:
        """KVM_X86_SET_MSR_FILTER. Each range is (flags, base, bitmap): flags 1 = read,
        2 = write; bit n of bitmap set allows MSR base+n, clear denies it (and with
        KVM_CAP_X86_USER_SPACE_MSR enabled, a denied access exits to userspace)."""
        ranges = list(ranges)
        if len(ranges) > 16:
            raise ValueError("at most 16 MSR filter ranges")
        req = ffi.new("struct kvm_msr_filter *")
        req.flags = 0 if default_allow else 1
        keep = []
        for i, (flags, base, bitmap) in enumerate(ranges):
            buf = ffi.new("uint8_t[]", bytes(bitmap))
            keep.append(buf)
            r = req.ranges[i]
            r.flags, r.base, r.nmsrs, r.bitmap = flags, base, len(bitmap) * 8, buf
        self._ioctl(io.KVM_X86_SET_MSR_FILTER, req)

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        from .stats import StatsReader

        if getattr(self, "_stats", None) is None:
            self._stats = StatsReader(self._ioctl(io.KVM_GET_STATS_FD))
        return self._stats.read()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close every vCPU, the VM fd, then release guest memory. Idempotent."""
        with self._lock:
            if self._fd < 0:
                return
            for vcpu in list(self.vcpus.values()):
                vcpu.close()
            if getattr(self, "_stats", None) is not None:
                self._stats.close()
                self._stats = None
            hooks, self._close_hooks = getattr(self, "_close_hooks", []), []
            for hook in reversed(hooks):
                try:
                    hook(self)
                except Exception as err:  # a broken device must not keep memory alive
                    self.close_hook_errors.append(err)
                    log.exception("close hook %r of %r failed", hook, self)
            os.close(self._fd)
            self._fd = -1
            # The kernel drops ioeventfds, irqfds and memslots with the VM; the host memory is
            # ours to release once nothing can reach it.
            self._ioevents.clear()
            self._irqfds.clear()
            for region in self.memory.regions():
                self.memory._remove(region)
                region._release()
            self._slots_used.clear()
            self.memory.closed = True

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A VM dropped without close(). In cyclic garbage, finalizers run in no set order, so
        # a vCPU's kvm_run mapping may already be gone: only fds are closed here (the mappings
        # and guest memory free themselves), and close hooks do not run.
        try:
            if self._fd >= 0:
                for vcpu in list(self.vcpus.values()):
                    vcpu._release_fd()
                if getattr(self, "_stats", None) is not None:
                    self._stats.close()
                os.close(self._fd)
                self._fd = -1
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Vm(fd={self._fd}, vcpus={sorted(self.vcpus)}, "
                f"regions={len(self.memory.regions())})")

    # -- x86 state --
    # Thin faces of pyvmm.state (the ioctl and struct work lives there).

    def get_clock(self):
        """KVM_GET_CLOCK: a `pyvmm.state.ClockData` (kvmclock ns)."""
        from .state import vm_state
        return vm_state.get_clock(self)

    def set_clock(self, clock, *, realtime: bool = False) -> None:
        """KVM_SET_CLOCK to a ClockData or a number of ns."""
        from .state import vm_state
        vm_state.set_clock(self, clock, realtime=realtime)

    def get_irqchip(self, chip: int):
        """KVM_GET_IRQCHIP: chip 0 PIC master, 1 PIC slave (PicState), 2 IOAPIC (IoapicState)."""
        from .state import vm_state
        return vm_state.get_irqchip(self, chip)

    def set_irqchip(self, chip: int, state) -> None:
        """KVM_SET_IRQCHIP of one controller."""
        from .state import vm_state
        vm_state.set_irqchip(self, chip, state)

    def get_pit(self):
        """KVM_GET_PIT2: a `pyvmm.state.PitState`."""
        from .state import vm_state
        return vm_state.get_pit(self)

    def set_pit(self, state) -> None:
        """KVM_SET_PIT2."""
        from .state import vm_state
        vm_state.set_pit(self, state)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (before creating vCPUs)."""
        from .state import vm_state
        vm_state.set_identity_map_addr(self, addr)

    def enable_manual_dirty_log(self, *, initially_set: bool = False) -> int:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: dirty pages are re-protected by clear_dirty_log."""
        from .state import vm_state
        return vm_state.enable_manual_dirty_log(self, initially_set=initially_set)

    def clear_dirty_log(self, region, first_page: int = 0, num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG of pages of `region` (all by default)."""
        from .state import vm_state
        vm_state.clear_dirty_log(self, region, first_page, num_pages)

    def set_log_dirty(self, region, enabled: bool = True) -> None:
        """Turn dirty-page logging of a live `region` on or off (KVM_SET_USER_MEMORY_REGION
        of the same slot with the flag toggled): turned on, KVM logs writes from now on."""
        with self._lock:
            if region.vm is not self or region.closed or region.alias_of is not None:
                raise ValueError(f"{region!r} is not a live, non-alias region of this VM")
            flags = (KVM_MEM_READONLY if region.readonly else 0) | (
                KVM_MEM_LOG_DIRTY_PAGES if enabled else 0)
            self._set_region(region.kernel_slot, flags, region.guest_addr, region.size,
                             region.host_addr)
            region.log_dirty = bool(enabled)

    def save_state(self):
        """The VM-wide state (clock, PICs, IOAPIC, PIT): a picklable `pyvmm.state.VmState`."""
        from .state import vm_state
        return vm_state.save_vm_state(self)

    def load_state(self, state) -> None:
        """Load a VmState into this VM (which has the same in-kernel devices)."""
        from .state import vm_state
        vm_state.load_vm_state(self, state)
