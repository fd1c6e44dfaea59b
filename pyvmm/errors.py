"""The exceptions pyvmm raises."""

from __future__ import annotations

import os


class KvmError(OSError):
    """A KVM ioctl failed. Keeps the errno, the ioctl's name and the role of the fd
    ("system", "vm" or "vcpu") it was issued on."""

    def __init__(self, errno: int, ioctl: str, role: str, detail: str | None = None) -> None:
        message = f"{ioctl} on the {role} fd failed: {os.strerror(errno)}"
        if detail:
            message += f" ({detail})"
        super().__init__(errno, message)
        self.ioctl = ioctl
        self.role = role
        self.detail = detail

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.strerror}"

    def __reduce__(self):
        return (type(self), (self.errno, self.ioctl, self.role, self.detail))


class MissingCapability(KvmError):
    """The host's KVM lacks a capability the call needs; raised before the ioctl would fail
    with a less helpful errno."""

    def __init__(self, cap, ioctl: str, role: str, why: str) -> None:
        import errno as _errno

        self.cap = cap
        super().__init__(_errno.EOPNOTSUPP, ioctl, role,
                         f"this KVM lacks KVM_CAP_{cap.name}: {why}")

    def __reduce__(self):
        return (_rebuild_missing_capability, (int(self.cap), self.ioctl, self.role,
                                              self.detail))


class KvmUnavailable(OSError):
    """/dev/kvm cannot be used; the message says why and what to do about it."""


class GuestError(Exception):
    """A guest broke its contract with a device (bad hypercall arguments, an access outside
    a region). Devices answer it to the guest; it never takes the host process down."""


class ClosedError(ValueError):
    """A handle was used after close()."""


def _rebuild_missing_capability(cap: int, ioctl: str, role: str, detail: str | None):
    from .caps import Cap

    err = MissingCapability.__new__(MissingCapability)
    KvmError.__init__(err, __import__("errno").EOPNOTSUPP, ioctl, role, detail)
    err.cap = Cap(cap) if cap in Cap._value2member_map_ else cap
    return err
