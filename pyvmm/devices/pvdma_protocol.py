# SPDX-License-Identifier: GPL-2.0-or-later
"""The protocol of :class:`~pyvmm.devices.pvdma.PvDma`, a paravirtual DMA interface (the
guest maps guest-physical ranges for DMA, the host pins the pages behind them): the hypercall
arguments, the result codes, the PIO register block and the choice of transport.

Protocol (the KVM_HC_MAP_GPA_RANGE hypercall's, both transports)::

    nr    = KVM_HC_MAP_GPA_RANGE (12)
    gpa   = first guest-physical address (4 KiB aligned)
    npages= number of 4 KiB pages
    attrs = bits 0-3 page size hint (0 = 4K, 1 = 2M, 2 = 1G); bit 4 KVM_MAP_GPA_RANGE_ENCRYPTED:
            0 = shared   -> MAP the range for DMA (pin it)
            1 = private  -> UNMAP it (unpin exactly what its map pinned)
            other bits must be 0

Result in the guest's RAX (KVM-style negative error codes):

    ======  ========  ===============================================================
     0               success
    -22     EINVAL    unaligned gpa, npages 0, a range that wraps the 64-bit space,
                      reserved attribute bits or an unknown page size
    -14     EFAULT    some page is not guest RAM: no memslot, a gap between memslots,
                      a read-only slot, an SMRAM slot (address space 1) or an MMIO device
    -2      ENOENT    unmap of a range that is not mapped (never mapped, or unmapped twice);
                      an unmap must name exactly the gpa and npages of a map
    -12     ENOMEM    the host could not pin the pages (mlock failed, e.g. RLIMIT_MEMLOCK)
    -28     ENOSPC    the VM already has ``max_mappings`` live mappings (default
                      :data:`~pyvmm.devices.limits.DEFAULT_MAX_DMA_MAPPINGS`); counted in
                      ``PvDma.refused``
    -5      EIO       the device failed on the host side (a bug, logged; the VMM goes on)
    -1000   ENOSYS    a hypercall number nobody serves (as KVM answers it), which is also
                      what a guest gets once the device is closed
    ======  ========  ===============================================================

Transports:

- ``"hypercall"``: the guest executes VMCALL/VMMCALL with RAX=12, RBX=gpa, RCX=npages,
  RDX=attrs at CPL0; KVM checks alignment, npages and gfn wrap-around itself (answering
  -22 without an exit), then exits to userspace (KVM_CAP_EXIT_HYPERCALL), where the
  device's :class:`~pyvmm.devices.HypercallDispatcher` runs the request.
- ``"pio"``: the same request through a register block on the PIO bus (userspace exits:
  the guest reads the status back synchronously). For hosts where hypercalls cannot reach
  userspace, such as kvm_pvm (a CPL0 VMCALL never returns there).

PIO register block at ``port`` (default :data:`PVDMA_PORT`), 32-bit little-endian registers::

    +0x00 GPA_LO     +0x04 GPA_HI     +0x08 NPAGES_LO   +0x0C NPAGES_HI
    +0x10 ATTRS
    +0x14 COMMAND    write: a hypercall number to run with (gpa, npages, attrs), e.g. 12
          STATUS     read: the low 32 bits of the last result (sign-extend it: -14 = 0xfffffff2)
    +0x18 TRANSPORT  read: 0 = use the PIO registers, 1 = use the hypercall
    +0x1C MAGIC      read: 0x414d4450 ("PDMA"), to probe for the device

The block is registered on the PIO bus the device is given, whatever the transport, so a
guest can read TRANSPORT to learn how to talk to the device.
"""

from __future__ import annotations

import errno as _errno
import os

from ..caps import Cap
from .hypercall import KVM_HC_MAP_GPA_RANGE

__all__ = [
    "KVM_MAP_GPA_RANGE_ENCRYPTED",
    "PVDMA_LENGTH",
    "PVDMA_MAGIC",
    "PVDMA_PORT",
    "TRANSPORTS",
    "default_transport",
]

PVDMA_PORT = 0x5D0
PVDMA_LENGTH = 0x20
PVDMA_MAGIC = 0x414D4450  # "PDMA"
REG_GPA_LO, REG_GPA_HI, REG_NPAGES_LO, REG_NPAGES_HI = 0x00, 0x04, 0x08, 0x0C
REG_ATTRS, REG_COMMAND, REG_TRANSPORT, REG_MAGIC = 0x10, 0x14, 0x18, 0x1C
REG_STATUS = REG_COMMAND
KVM_ENOSPC = _errno.ENOSPC                            # 28

KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0xF
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
_PAGE_SIZES = {0: "4K", 1: "2M", 2: "1G"}
_ATTR_MASK = KVM_MAP_GPA_RANGE_PAGE_SZ_MASK | KVM_MAP_GPA_RANGE_ENCRYPTED

TRANSPORTS = ("hypercall", "pio")
TRANSPORT_CODES = {"pio": 0, "hypercall": 1}
#: Environment override of the automatic transport choice.
TRANSPORT_ENV = "PYVMM_PVDMA_TRANSPORT"


def default_transport(vm, kvm_module: str | None) -> tuple[str, str]:
    """(transport, why) for a VM on a host whose KVM vendor module is `kvm_module` (e.g.
    ``pyvmm.testing.hostinfo.kvm_module()``): "pio" on kvm_pvm, which reports
    KVM_CAP_EXIT_HYPERCALL but never delivers the exit; "hypercall" where KVM offers the
    MAP_GPA_RANGE exit; "pio" otherwise. $PYVMM_PVDMA_TRANSPORT (pio or hypercall) overrides
    the choice."""
    forced = os.environ.get(TRANSPORT_ENV, "").strip().lower()
    if forced:
        if forced not in TRANSPORTS:
            raise ValueError(f"${TRANSPORT_ENV}={forced!r}: expected one of {TRANSPORTS}")
        return forced, f"${TRANSPORT_ENV}={forced}"
    if kvm_module == "kvm_pvm":
        return "pio", ("kvm_pvm reports KVM_CAP_EXIT_HYPERCALL but never delivers hypercall "
                       "exits (a CPL0 VMCALL hangs KVM_RUN)")
    mask = vm.check_extension(Cap.EXIT_HYPERCALL)
    if mask >> KVM_HC_MAP_GPA_RANGE & 1:
        return "hypercall", f"{kvm_module or 'KVM'} sends KVM_HC_MAP_GPA_RANGE to userspace"
    return "pio", f"{kvm_module or 'KVM'} lacks the KVM_HC_MAP_GPA_RANGE exit"
