"""`Vm`: a VM fd, with its memory, vCPUs and in-kernel registrations (ioeventfd, irqfd and
MSR-filter requests are built in `pyvmm.vm_requests`)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import ioctls as io
from ._ffi import ffi
from .args import as_index
from .caps import Cap
from .errors import ClosedError, KvmError, foreign_process
from .ioevent import IoEventAddress
from .memory import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SIZE,
    DirtyBitmap,
    GuestMemory,
    MemoryRegion,
)
from .state.methods import VmStateMethods
from .vcpu import Vcpu
from .vm_caps import VmCapsMixin
from .vm_coalesced import CoalescedMethods
from .vm_memory import VmMemoryMethods
from .vm_requests import (
    check_gsi,
    fd_of,
    ioevent_error,
    ioevent_request,
    irqfd_request,
    msr_filter_request,
)

if TYPE_CHECKING:
    from .kvm import VmConfig
    from .stats import StatsReader

__all__ = ["KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "DirtyBitmap", "Vm"]

log = logging.getLogger("pyvmm")


class Vm(VmCapsMixin, CoalescedMethods, VmMemoryMethods, VmStateMethods):
    role = "vm"

    def __init__(self, fd: int, config: VmConfig) -> None:
        # No path back to the Kvm handle: what the VM needs from it is in `config`.
        self.config = config
        self._fd = fd
        self._pid = os.getpid()  # KVM fds work only in the process that created the VM
        self._lock = threading.RLock()
        self.memory = GuestMemory(self.set_user_memory_region, self._slot_limit,
                                  lambda: self.check_extension(Cap.MULTI_ADDRESS_SPACE))
        self.vcpus: dict[int, Vcpu] = {}
        self._vcpu_ids: set[int] = set()  # KVM frees a vCPU id only with the VM
        self._caps: dict[int, int] = {}
        self._max_slots: int | None = None
        self._max_vcpus: int | None = None
        self._close_hooks: list[Callable[[Vm], object]] = []
        self._stats: StatsReader | None = None
        self.close_hook_errors: list[BaseException] = []

    # -- basics --------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedError("Vm is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def ioctl(self, request: int, arg: object = 0, detail: str | None = None) -> int:
        """One ioctl on the VM fd (KvmError on failure; in a forked child, one that says KVM
        fds belong to the process that created the VM)."""
        try:
            return io.ioctl(self.fileno(), request, arg, self.role, detail)
        except KvmError as err:
            raise foreign_process(err, self._pid) from None

    @property
    def cpu_vendor(self) -> str:
        """The CPU vendor KVM offers guests ("AuthenticAMD", "GenuineIntel")."""
        return self.config.cpu_vendor()

    @property
    def is_amd(self) -> bool:
        return self.cpu_vendor in ("AuthenticAMD", "HygonGenuine")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (what this VM supports), cached."""
        cap = int(cap)
        if cap not in self._caps:
            self._caps[cap] = self.ioctl(io.KVM_CHECK_EXTENSION, cap)
        return self._caps[cap]

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        req = ffi.new("struct kvm_enable_cap *", {"cap": int(cap), "flags": flags,
                                                   "args": list(args)})
        name = Cap(cap).name if int(cap) in Cap._value2member_map_ else str(int(cap))
        self.ioctl(io.KVM_ENABLE_CAP, req, detail=f"KVM_CAP_{name} args {list(args)}")

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
        """`guard(region)` is asked before `remove_memory(region)` (see
        `GuestMemory.add_remove_guard`)."""
        return self.memory.add_remove_guard(guard)

    # -- memory --------------------------------------------------------------------------

    def _slot_limit(self) -> int:
        if self._max_slots is None:
            self._max_slots = self.check_extension(Cap.NR_MEMSLOTS) or 32
        return self._max_slots

    def _vcpu_limit(self) -> int:
        # Asked once per VM (for the error message of a full VM), not once per vCPU.
        if self._max_vcpus is None:
            self._max_vcpus = self.check_extension(Cap.MAX_VCPUS)
        return self._max_vcpus

    def add_memory(self, guest_addr: int, size: int, *, readonly: bool = False,
                   log_dirty: bool = False, address_space: int = 0) -> MemoryRegion:
        """Map `size` bytes of fresh anonymous host memory at guest-physical `guest_addr`."""
        with self._lock:
            self.fileno()
            return self.memory.add(guest_addr, size, readonly=readonly, log_dirty=log_dirty,
                                   address_space=address_space)

    def alias_memory(self, region: MemoryRegion, guest_addr: int | None = None, *,
                     offset: int = 0, size: int | None = None, address_space: int = 1,
                     readonly: bool = False) -> MemoryRegion:
        """Show `size` bytes of `region`'s host memory, from `offset`, at `guest_addr` (by
        default where they are in `region`) in another address space: the same RAM seen
        from SMM, as QEMU maps it, so an SMI handler can reach the memory the rest of the
        guest uses. Writes through either are the same bytes. Remove aliases before their
        region; closing the VM releases both."""
        with self._lock:
            self.fileno()
            return self.memory.alias(region, guest_addr, offset=offset, size=size,
                                     address_space=address_space, readonly=readonly)

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int,
                               host: int) -> None:
        """KVM_SET_USER_MEMORY_REGION as is (slot with the address space in bits 16-31): no
        bookkeeping; `add_memory` is what an application wants."""
        req = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size,
            "userspace_addr": host})
        self.ioctl(io.KVM_SET_USER_MEMORY_REGION, req,
                   detail=f"slot {slot:#x} flags {flags:#x} gpa {gpa:#x} size {size:#x}")

    def remove_memory(self, region: MemoryRegion) -> None:
        """Delete the memslot and release its host memory (`move_memory` and
        `set_memory_flags` change a live one)."""
        with self._lock:
            self.memory.remove(region)

    def dirty_log(self, region: MemoryRegion) -> DirtyBitmap:
        """KVM_GET_DIRTY_LOG: pages written by the guest since the last call (a superset)."""
        if not self.memory.owns(region):
            raise ValueError(f"{region!r} is not a live region of this VM")
        if not region.log_dirty:
            raise ValueError(f"{region!r} was not added with log_dirty=True")
        npages = region.size // PAGE_SIZE
        bitmap = ffi.new("uint64_t[]", (npages + 63) // 64)
        req = ffi.new("struct kvm_dirty_log *", {"slot": region.kernel_slot})
        req.dirty_bitmap = bitmap
        self.ioctl(io.KVM_GET_DIRTY_LOG, req)
        return DirtyBitmap(bytes(ffi.buffer(bitmap))[: (npages + 7) // 8])

    # -- vCPUs ---------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        """KVM_CREATE_VCPU with `vcpu_id` (any integer operator.index accepts; not bool), or
        the lowest id never used in this VM."""
        if vcpu_id is not None:
            vcpu_id = as_index("vCPU id", vcpu_id)
        limit = self.config.max_vcpu_id
        with self._lock:
            if vcpu_id is None:
                vcpu_id = next(i for i in range(len(self._vcpu_ids) + 1)
                               if i not in self._vcpu_ids)
            if not 0 <= vcpu_id < limit:
                raise ValueError(f"vCPU id {vcpu_id} is outside 0..{limit - 1} "
                                 "(KVM_CAP_MAX_VCPU_ID)")
            if vcpu_id in self.vcpus:
                raise ValueError(f"vCPU {vcpu_id} already exists in this VM")
            if vcpu_id in self._vcpu_ids:
                raise ValueError(f"vCPU id {vcpu_id} was used by a closed vCPU; KVM frees "
                                 "vCPU ids only with the VM")
            made, most = len(self._vcpu_ids), self._vcpu_limit()
            fd = self.ioctl(io.KVM_CREATE_VCPU, vcpu_id, detail=f"vCPU id {vcpu_id}" + (
                f"; this VM has made {made} vCPUs, KVM_CAP_MAX_VCPUS allows {most}"
                if most and made >= most else ""))
            self._vcpu_ids.add(vcpu_id)
            try:
                vcpu = Vcpu(fd, vcpu_id, self.config.vcpu_mmap_size,
                            supported_cpuid_buffer=self.config.supported_cpuid_buffer,
                            cpu_vendor=self.config.cpu_vendor,
                            has_smm=self.check_extension(Cap.X86_SMM) > 0,
                            host=self.config.vcpu_host,
                            on_close=self._forget_vcpu)
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
        self.ioctl(io.KVM_CREATE_IRQCHIP)

    def create_pit(self) -> None:
        self.ioctl(io.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *"))

    def set_tss_addr(self, addr: int) -> None:
        self.ioctl(io.KVM_SET_TSS_ADDR, addr)

    def irq_line(self, gsi: int, level: int | bool) -> int:
        """Set an interrupt line (KVM_IRQ_LINE_STATUS); returns the delivery status
        (> 0 delivered, 0 masked/coalesced, < 0 ignored)."""
        check_gsi(gsi)
        req = ffi.new("struct kvm_irq_level *")
        req.irq = gsi
        req.level = 1 if level else 0
        self.ioctl(io.KVM_IRQ_LINE_STATUS, req, detail=f"gsi {gsi} (ENXIO: no in-kernel "
                    "irqchip; call create_irqchip() first)")
        return req.status

    def signal_msi(self, address: int, data: int) -> int:
        req = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF,
                                            "address_hi": address >> 32, "data": data})
        return self.ioctl(io.KVM_SIGNAL_MSI, req)

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
        self.ioctl(io.KVM_SET_GSI_ROUTING, table)

    def register_irqfd(self, eventfd, gsi: int, *, resample_fd=None) -> None:
        """KVM_IRQFD: a write to `eventfd` raises `gsi` in the in-kernel irqchip."""
        req = irqfd_request(eventfd, gsi, resample_fd=resample_fd)
        self.ioctl(io.KVM_IRQFD, req, detail=f"eventfd {req.fd} gsi {gsi}: EINVAL means no "
                   "in-kernel irqchip (create_irqchip() first), an fd that is not an eventfd, "
                   "or a GSI the routing table lacks")

    def unregister_irqfd(self, eventfd, gsi: int) -> None:
        """Undo register_irqfd."""
        req = irqfd_request(eventfd, gsi, deassign=True)
        self.ioctl(io.KVM_IRQFD, req, detail=f"eventfd {req.fd} gsi {gsi}")

    # -- ioeventfd -----------------------------------------------------------------------

    def register_ioevent(self, eventfd, address: IoEventAddress, *, length: int = 0,
                         datamatch: int | None = None) -> None:
        """KVM_IOEVENTFD: a guest write to `address` signals `eventfd` inside the kernel,
        without an exit to userspace. length 0 matches any access size."""
        fd = fd_of(eventfd)
        req = ioevent_request(fd, address, length, datamatch, False)
        try:
            self.ioctl(io.KVM_IOEVENTFD, req)
        except KvmError as err:
            raise ioevent_error(err, fd, address, length, datamatch, False) from None

    def unregister_ioevent(self, eventfd, address: IoEventAddress, *, length: int = 0,
                           datamatch: int | None = None) -> None:
        """Undo register_ioevent (the same arguments)."""
        fd = fd_of(eventfd)
        req = ioevent_request(fd, address, length, datamatch, True)
        try:
            self.ioctl(io.KVM_IOEVENTFD, req)
        except KvmError as err:
            raise ioevent_error(err, fd, address, length, datamatch, True) from None

    # -- MSR filtering -------------------------------------------------------------------

    def set_msr_filter(self, ranges: Iterable[tuple[int, int, bytes]], *,
                       default_allow: bool = True) -> None:
        """KVM_X86_SET_MSR_FILTER. Each range is (flags, base, bitmap): flags 1 = read,
        2 = write; bit n of bitmap set allows MSR base+n, clear denies it (and with
        KVM_CAP_X86_USER_SPACE_MSR enabled, a denied access exits to userspace)."""
        req, keep = msr_filter_request(ranges, default_allow)
        self.ioctl(io.KVM_X86_SET_MSR_FILTER, req)
        del keep  # the bitmaps the request points at, alive until the ioctl is done

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        from .stats import StatsReader

        if self._stats is None:
            self._stats = StatsReader(self.ioctl(io.KVM_GET_STATS_FD))
        return self._stats.read()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close every vCPU, the VM fd, then release guest memory. Idempotent."""
        with self._lock:
            if self._fd < 0:
                return
            for vcpu in list(self.vcpus.values()):
                vcpu.close()
            if self._stats is not None:
                self._stats.close()
                self._stats = None
            hooks, self._close_hooks = self._close_hooks, []
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
            self.memory.release_all()

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
                    vcpu.release_fds()
                if self._stats is not None:
                    self._stats.close()
                os.close(self._fd)
                self._fd = -1
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Vm(fd={self._fd}, vcpus={sorted(self.vcpus)}, "
                f"regions={len(self.memory.regions())})")

    # -- x86 state --
    # get/set_clock, get/set_irqchip, get/set_pit, set_identity_map_addr,
    # enable_manual_dirty_log, clear_dirty_log, set_log_dirty, enable_dirty_ring,
    # reset_dirty_rings, save_state, load_state:
    # inherited from pyvmm.state.methods.VmStateMethods (the ioctl work is in pyvmm.state).
