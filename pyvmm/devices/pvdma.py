# SPDX-License-Identifier: GPL-2.0-or-later
"""`PvDma`: a paravirtual DMA interface. The guest maps and unmaps guest-physical ranges for
DMA; the host pins the host pages behind them for the life of each mapping, and a Python
device reads and writes guest memory only through a live mapping. The protocol (hypercall
arguments, result codes, the PIO register block, the transports) is described in
:mod:`pyvmm.devices.pvdma_protocol`, whose names stay importable from here.

The device gets its collaborators and nothing else: the VM, the PIO bus for its register block,
the hypercall dispatcher and the transport, all chosen by the caller (for the hypercall
transport the caller also routes ``HypercallExit`` to the dispatcher, e.g. with
:func:`~pyvmm.devices.hypercall.serve_hypercalls`). :func:`default_transport` picks the
transport that works on a host, given the name of its KVM module.

State is per VM and under a lock: the mappings, and the pin count of every host page (mlock
is not reference counted by the kernel, so overlapping mappings share pages by count). When
the VM closes (a close hook, run before guest memory is released) or the device closes,
every mapping is released.
"""

from __future__ import annotations

import errno as _errno
import operator
import os
import threading

from ..errors import GuestError
from ..memory import PAGE_SIZE
from .dma_mapping import DmaMapping, DmaPiece
from .hypercall import (KVM_EFAULT, KVM_EINVAL, KVM_EIO, KVM_ENOENT, KVM_ENOMEM,
                        KVM_HC_MAP_GPA_RANGE, HypercallCall, HypercallDispatcher,
                        HypercallError)
from .limits import DEFAULT_MAX_DMA_MAPPINGS
from .pins import locked_pages, pin_table
from .pvdma_protocol import (_ATTR_MASK, _PAGE_SIZES, KVM_ENOSPC,
                             KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
                             PVDMA_LENGTH, PVDMA_MAGIC, PVDMA_PORT, REG_ATTRS, REG_COMMAND,
                             REG_GPA_HI, REG_GPA_LO, REG_MAGIC, REG_NPAGES_HI,
                             REG_NPAGES_LO, REG_STATUS, REG_TRANSPORT, TRANSPORT_CODES,
                             TRANSPORT_ENV, TRANSPORTS, default_transport)

__all__ = [
    "KVM_MAP_GPA_RANGE_ENCRYPTED",
    "PVDMA_LENGTH",
    "PVDMA_MAGIC",
    "PVDMA_PORT",
    "TRANSPORTS",
    "TRANSPORT_ENV",
    "DmaMapping",
    "PvDma",
    "default_transport",
    "locked_pages",
]

# ----------------------------------------------------------------------------------- device

class PvDma:
    """The paravirtual DMA device of one VM (see the module documentation for the protocol
    and the error codes)::

        with Machine() as m:
            transport, _why = default_transport(m.vm, hostinfo.kvm_module())
            dispatcher = HypercallDispatcher()
            if transport == "hypercall":
                serve_hypercalls(m.exit_handlers, dispatcher)
            dma = PvDma(m.vm, m.pio, dispatcher, transport, mmio=m.mmio)
            m.load("pvdma", regs=dma.guest_regs())
            ...
            dma.dma_write(gpa, b"data")     # a device writes into a mapped guest buffer

    `pio` is the bus for the register block (None: serve :meth:`read`/:meth:`write`
    yourself); `dispatcher` serves MAP_GPA_RANGE (None: a dispatcher of the device's own);
    `transport` is "hypercall" or "pio". `mmio`, when given, is the MMIO bus whose devices a
    mapping may not cover. `max_mappings` bounds the VM's live mappings (a map beyond it gets
    -ENOSPC and is counted in `refused`).
    """

    def __init__(self, vm, pio, dispatcher: HypercallDispatcher | None, transport: str, *,
                 port: int = PVDMA_PORT, mmio=None,
                 max_mappings: int = DEFAULT_MAX_DMA_MAPPINGS,
                 transport_reason: str = "chosen by the caller") -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is not one of {TRANSPORTS}")
        if isinstance(max_mappings, bool) or operator.index(max_mappings) < 1:
            raise ValueError(f"max_mappings must be a positive integer, got {max_mappings!r}")
        self.vm = vm
        self.pio = pio
        self.mmio = mmio
        self.transport = transport
        self.transport_reason = transport_reason
        self.port = port
        self.max_mappings = operator.index(max_mappings)
        self._lock = threading.RLock()
        self._pins = pin_table(vm)
        self._mappings: list[DmaMapping] = []
        self._regs = bytearray(PVDMA_LENGTH)
        self._set_reg(REG_TRANSPORT, TRANSPORT_CODES[transport])
        self._set_reg(REG_MAGIC, PVDMA_MAGIC)
        self.requests = 0
        self.refused = 0   # map requests refused for max_mappings
        self.closed = False
        self.last_error: BaseException | None = None
        self.dispatcher = dispatcher if dispatcher is not None else HypercallDispatcher()
        self.dispatcher.register(KVM_HC_MAP_GPA_RANGE, self._hypercall)
        registered = False
        try:
            if pio is not None:
                pio.register(port, PVDMA_LENGTH, self)
                registered = True
            if transport == "hypercall":
                vm.enable_hypercall_exits(KVM_HC_MAP_GPA_RANGE)
            vm.add_close_hook(self._on_vm_close)
            vm.add_remove_guard(self._region_in_use)
        except BaseException:
            self.dispatcher.unregister(KVM_HC_MAP_GPA_RANGE)
            if registered:
                pio.unregister(self)
            raise

    # -- what the guest is told ----------------------------------------------------------

    def guest_regs(self) -> dict[str, int]:
        """Registers for the pvdma payload (guests/pvdma.S): R14 = the register block's
        port (the guest reads the transport from it), R12 = the hypercall instruction for
        this host's CPU vendor (0 VMCALL, 1 VMMCALL)."""
        from .hypercall import native_instruction

        return {"r14": self.port,
                "r12": int(native_instruction(self.vm) == "vmmcall")}

    # -- the protocol --------------------------------------------------------------------

    def request(self, gpa: int, npages: int, attrs: int = 0) -> int:
        """One MAP_GPA_RANGE request as the guest makes it; returns the guest's result code."""
        return self.dispatcher.call(KVM_HC_MAP_GPA_RANGE, (gpa, npages, attrs),
                                    transport="python")

    def _hypercall(self, call: HypercallCall) -> int:
        gpa, npages, attrs = (tuple(call.args) + (0, 0, 0))[:3]
        with self._lock:
            self.requests += 1
        try:
            if attrs & ~_ATTR_MASK:
                raise HypercallError(KVM_EINVAL, f"reserved attribute bits {attrs:#x}")
            if attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK not in _PAGE_SIZES:
                raise HypercallError(KVM_EINVAL, f"unknown page size {attrs & 0xF}")
            if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED:
                self.unmap(gpa, npages)
            else:
                self.map(gpa, npages)
        except BaseException as err:
            self.last_error = err
            raise
        return 0

    # -- map / unmap ---------------------------------------------------------------------

    def _pieces(self, gpa: int, npages: int) -> tuple[DmaPiece, ...]:
        if gpa < 0 or npages < 0 or gpa % PAGE_SIZE:
            raise HypercallError(KVM_EINVAL, f"gpa {gpa:#x} is not 4 KiB aligned")
        if npages == 0:
            raise HypercallError(KVM_EINVAL, "npages is 0")
        end = gpa + npages * PAGE_SIZE
        if end > 1 << 64:
            raise HypercallError(KVM_EINVAL, f"range {gpa:#x}+{npages} pages wraps")
        memory = self.vm.memory
        for region in memory.regions():
            if region.address_space != 0 and region.guest_addr < end and gpa < region.end:
                raise HypercallError(KVM_EFAULT, f"range {gpa:#x}-{end:#x} overlaps SMRAM "
                                     f"{region!r}")
        if self.mmio is not None:
            for m in self.mmio.devices():
                if m.base < end and gpa < m.end:
                    raise HypercallError(KVM_EFAULT, f"range {gpa:#x}-{end:#x} overlaps MMIO "
                                         f"{type(m.device).__name__} at {m.base:#x}")
        pieces = []
        at = gpa
        while at < end:
            region = memory.find(at, 0)
            if region is None or region.closed:
                raise HypercallError(KVM_EFAULT, f"gpa {at:#x} is not guest RAM")
            if region.readonly:
                raise HypercallError(KVM_EFAULT, f"gpa {at:#x} is in a read-only slot")
            n = min(end, region.end) - at
            pieces.append(DmaPiece(region, at - region.guest_addr, n, at))
            at += n
        return tuple(pieces)

    def map(self, gpa: int, npages: int) -> DmaMapping:
        """Pin ``npages`` guest pages from ``gpa`` and record the mapping. Raises
        HypercallError (EINVAL, EFAULT, ENOMEM, EIO) with the code the guest would get."""
        with self._lock:
            if self.closed or self.vm.closed:
                raise HypercallError(KVM_EIO, "the PV-DMA device is closed")
            pieces = self._pieces(gpa, npages)
            mapping = DmaMapping(gpa, npages, pieces)
            err = self._pins.pin(mapping.host_pages, self.max_mappings)
            if err == _errno.ENOSPC:
                self.refused += 1
                raise HypercallError(KVM_ENOSPC, f"the VM already has {self.max_mappings} "
                                     "live DMA mappings (PvDma max_mappings)")
            if err:
                raise HypercallError(KVM_ENOMEM, f"cannot pin {npages} pages at {gpa:#x}: "
                                     f"{os.strerror(err)}")
            self._mappings.append(mapping)
            return mapping

    def unmap(self, gpa: int, npages: int) -> None:
        """Release the mapping made by ``map(gpa, npages)`` (the most recent one, when the
        same range is mapped more than once). HypercallError(ENOENT) when there is none."""
        with self._lock:
            if self.closed:
                raise HypercallError(KVM_EIO, "the PV-DMA device is closed")
            for i in range(len(self._mappings) - 1, -1, -1):
                mapping = self._mappings[i]
                if mapping.gpa == gpa and mapping.npages == npages:
                    del self._mappings[i]
                    self._release(mapping)
                    return
            raise HypercallError(KVM_ENOENT, f"no DMA mapping of {npages} pages at {gpa:#x}")

    def _release(self, mapping: DmaMapping) -> None:
        mapping.release()
        self._pins.unpin(mapping.host_pages)

    @property
    def mappings(self) -> list[DmaMapping]:
        with self._lock:
            return list(self._mappings)

    @property
    def pinned_pages(self) -> int:
        """Host pages this VM's PV-DMA devices hold pinned (each counted once)."""
        return self._pins.pinned

    def lookup(self, gpa: int, length: int = 1) -> DmaMapping:
        """The live mapping holding ``gpa``..``gpa+length``; GuestError if there is none."""
        with self._lock:
            for mapping in reversed(self._mappings):
                if mapping.contains(gpa, length):
                    return mapping
        raise GuestError(f"DMA to {gpa:#x}+{length:#x}: no mapping covers it")

    def dma_write(self, gpa: int, data: bytes) -> None:
        """Device -> guest DMA: write into guest memory through a live mapping only."""
        with self._lock:
            mapping = self.lookup(gpa, len(data))
            mapping.write(gpa - mapping.gpa, data)

    def dma_read(self, gpa: int, length: int) -> bytes:
        """Guest -> device DMA: read guest memory through a live mapping only."""
        with self._lock:
            mapping = self.lookup(gpa, length)
            return mapping.read(gpa - mapping.gpa, length)

    # -- PIO register block (bus device protocol) ---------------------------------------

    def _reg(self, offset: int) -> int:
        return int.from_bytes(self._regs[offset: offset + 4], "little")

    def _set_reg(self, offset: int, value: int) -> None:
        self._regs[offset: offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return bytes(self._regs[offset: offset + size])

    def write(self, offset: int, data: bytes) -> None:
        if offset <= REG_COMMAND < offset + len(data):
            if offset != REG_COMMAND or len(data) != 4:
                raise GuestError("PV-DMA COMMAND takes a 32-bit write")
            nr = int.from_bytes(data, "little")
            with self._lock:
                gpa = self._reg(REG_GPA_LO) | self._reg(REG_GPA_HI) << 32
                npages = self._reg(REG_NPAGES_LO) | self._reg(REG_NPAGES_HI) << 32
                attrs = self._reg(REG_ATTRS)
                result = self.dispatcher.call(nr, (gpa, npages, attrs), transport="pio")
                self._set_reg(REG_STATUS, result)
            return
        if offset + len(data) > REG_TRANSPORT:
            raise GuestError(f"PV-DMA register {offset:#x} is read-only")
        with self._lock:
            self._regs[offset: offset + len(data)] = data

    # -- lifetime ------------------------------------------------------------------------

    def release_all(self) -> int:
        """Unmap every mapping; returns how many there were."""
        with self._lock:
            mappings, self._mappings = self._mappings, []
            for mapping in mappings:
                self._release(mapping)
            return len(mappings)

    def _region_in_use(self, region) -> str | None:
        with self._lock:
            live = [m for m in self._mappings if any(p.region is region for p in m.pieces)]
        if live:
            return (f"{len(live)} PV-DMA mapping(s) pin its pages (first at "
                    f"{live[0].gpa:#x}); the guest must unmap them first")
        return None

    def _on_vm_close(self, vm) -> None:
        self.close()

    def close(self) -> None:
        """Release every mapping, stop serving the guest (its requests then get -ENOSYS;
        Python callers of map/unmap get EIO) and leave the PIO bus. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.release_all()
            try:
                self.dispatcher.unregister(KVM_HC_MAP_GPA_RANGE)
            except ValueError:
                pass
        if self.pio is not None:
            try:
                self.pio.unregister(self)
            except ValueError:
                pass

    def __repr__(self) -> str:
        return (f"PvDma(transport={self.transport!r}, port={self.port:#x}, "
                f"mappings={len(self._mappings)}, pinned_pages={self.pinned_pages})")
