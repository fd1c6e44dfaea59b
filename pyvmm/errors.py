"""The exceptions pyvmm raises."""

from __future__ import annotations

import grp
import os
import pwd
import stat


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


class ForeignProcessError(KvmError):
    """A VM or vCPU fd used in a process other than the one that created the VM (a forked
    child): KVM answers EIO, because its fds belong to the creating process."""


def foreign_process(err: KvmError, creator_pid: int) -> KvmError:
    """`err` as a ForeignProcessError when this process did not create the VM, else `err`."""
    pid = os.getpid()
    if pid == creator_pid or isinstance(err, ForeignProcessError):
        return err
    return ForeignProcessError(
        err.errno or 0, err.ioctl, err.role,
        f"KVM fds belong to the process that created the VM (pid {creator_pid}); this is pid "
        f"{pid}, a forked child: create a new Kvm/Machine in the child instead")


#: How many errors a device, bus or worker keeps for the application to read (the first
#: ones; later ones are counted only).
MAX_KEPT_ERRORS = 16


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
    """/dev/kvm cannot be used; the message says why and what to do about it.

    ``errno`` is the failure's, ``filename`` the device's path; ``str()`` is the message
    alone (it already names the path)."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


#: The udev rule that opens /dev/kvm to every user (what GitHub's hosted runners need).
KVM_UDEV_RULE = 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"'


def permission_advice(path: str) -> str:
    """What to do when `path` exists but this user may not open it, for the device as it is:
    join its group where the group may read and write it (``crw-rw---- root kvm``), else
    (``crw------- root root``, often with no `kvm` group at all) run as root or open the
    device with a udev rule."""
    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
        members = grp.getgrgid(st.st_gid).gr_mem
        owner = pwd.getpwuid(st.st_uid).pw_name
    except (OSError, KeyError):
        st, group, members, owner = None, "", [], ""
    shown = f" ({stat.filemode(st.st_mode)} {owner} {group})" if st is not None else ""
    if st is not None and group != "root" and st.st_mode & 0o060 == 0o060:
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
        if user and user in members:
            return (f"{path}{shown} exists but this session may not open it: you are in the "
                    f"`{group}` group since after this session started; log in again (or run "
                    f"`newgrp {group}`).")
        return (f"{path}{shown} exists but this user may not open it: join the `{group}` group "
                f"(`sudo usermod -aG {group} $USER`, then log in again), or run as root.")
    try:
        grp.getgrnam("kvm")
        no_group = "its group may not open it"
    except KeyError:
        no_group = "there is no `kvm` group to join"
    return (f"{path}{shown} exists but this user may not open it, and {no_group}: run as "
            f"root, or open the device with a udev rule: echo '{KVM_UDEV_RULE}' | sudo tee "
            "/etc/udev/rules.d/99-kvm4all.rules && sudo udevadm control --reload-rules && "
            f"sudo udevadm trigger --name-match=kvm (without udev, `sudo chmod 0666 {path}` "
            "lasts until the next boot). See docs/HOSTS.md, \"Permissions\".")


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
