# SPDX-License-Identifier: GPL-2.0-or-later
"""The bounds of what a guest (or a broken device) can make the device model keep.

Every buffer a guest can fill has a bound here; what goes over it is counted, never kept.
Each bound is defined once; the machine layer imports these too.
"""

from __future__ import annotations

# (The errors a bus, dispatcher, doorbell or worker keeps are bounded by
# pyvmm.errors.MAX_KEPT_ERRORS, defined there so every layer can use the one bound.)

#: Live PV-DMA mappings a VM holds at most (``PvDma(max_mappings=...)``). A map request
#: beyond it gets -ENOSPC and is counted in ``PvDma.refused``. One mapping costs
#: about 0.5 KiB of host memory, so the default bounds the table at about 2 MiB.
DEFAULT_MAX_DMA_MAPPINGS = 4096

#: Bytes of serial output a ``SerialConsole`` keeps (the most recent ones); older bytes are
#: dropped and counted in ``SerialConsole.dropped``. A sink sees every byte.
DEFAULT_SERIAL_KEEP = 1 << 20

#: GSIs KVM can route (KVM_MAX_IRQ_ROUTES): KVM_SET_GSI_ROUTING refuses any GSI at or above
#: it, so an irqfd there could never reach the guest.
KVM_MAX_IRQ_ROUTES = 4096
