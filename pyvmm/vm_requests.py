# SPDX-License-Identifier: GPL-2.0-or-later
"""The argument checks and request structs of a VM's in-kernel registrations (ioeventfd,
irqfd): everything `Vm` checks before an ioctl, and the errors it explains after one."""

from __future__ import annotations

import errno

from ._ffi import ffi
from .errors import KvmError
from .ioevent import IoEventAddress

__all__ = ["check_gsi", "fd_of", "ioevent_error", "ioevent_request", "irqfd_request",
           "msr_filter_request"]

IOEVENTFD_DATAMATCH, IOEVENTFD_PIO, IOEVENTFD_DEASSIGN = 1, 2, 4
IRQFD_DEASSIGN, IRQFD_RESAMPLE = 1, 2


def fd_of(eventfd) -> int:
    """An fd number, or an object's fileno()."""
    return eventfd if isinstance(eventfd, int) else eventfd.fileno()


def check_gsi(gsi: int) -> None:
    """ValueError for a GSI KVM's 32 bits cannot hold."""
    if not 0 <= gsi < 1 << 32:
        raise ValueError(f"GSI {gsi} is outside 0..2**32-1")


def irqfd_request(eventfd, gsi: int, *, resample_fd=None, deassign: bool = False):
    """A `struct kvm_irqfd *` for KVM_IRQFD."""
    check_gsi(gsi)
    req = ffi.new("struct kvm_irqfd *", {"fd": fd_of(eventfd), "gsi": gsi,
                                          "flags": IRQFD_DEASSIGN if deassign else 0})
    if resample_fd is not None:
        req.flags = IRQFD_RESAMPLE
        req.resamplefd = fd_of(resample_fd)
    return req


def _what(address: IoEventAddress, length: int, datamatch: int | None) -> str:
    return f"{address} length {length}" + (f" datamatch {datamatch:#x}"
                                           if datamatch is not None else "")


def ioevent_request(fd: int, address: IoEventAddress, length: int, datamatch: int | None,
                    deassign: bool):
    """A `struct kvm_ioeventfd *`, after every check KVM would fail less clearly."""
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
    flags = (IOEVENTFD_PIO if address.is_pio else 0) | (IOEVENTFD_DEASSIGN if deassign else 0)
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


def ioevent_error(err: KvmError, fd: int, address: IoEventAddress, length: int,
                  datamatch: int | None, deassign: bool) -> KvmError:
    """`err` of a KVM_IOEVENTFD, with what its errno means for this registration."""
    what = _what(address, length, datamatch)
    if deassign:
        detail = (f"no ioeventfd with fd {fd} is registered at {what}"
                  if err.errno == errno.ENOENT else what)
    else:
        detail = {
            errno.EEXIST: f"an ioeventfd is already registered at {what}",
            errno.EINVAL: f"KVM rejected {what} on fd {fd}: not an eventfd, or a length or "
                          "flag it does not support",
            errno.EBADF: f"fd {fd} is not open",
            errno.ENOSPC: "no room for another ioeventfd on this bus",
        }.get(err.errno or 0, what)
    if err.detail and "process" in err.detail:
        detail = err.detail  # foreign_process() said why already
    return type(err)(err.errno or 0, err.ioctl, err.role, detail)


def msr_filter_request(ranges, default_allow: bool) -> tuple[object, list]:
    """A `struct kvm_msr_filter *` and the bitmap buffers it points at (keep them alive
    until the ioctl returns)."""
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
    return req, keep
