# SPDX-License-Identifier: GPL-2.0-or-later
"""KvmUnavailable's advice for a /dev/kvm this user may not open, for each way a device can be
set up: a group that may read and write it, or root-only with no such group (these machines,
GitHub's runners). The advice reads the real file's mode and group."""

from __future__ import annotations

import errno
import grp
import os

import pytest

from pyvmm import Kvm, KvmUnavailable
from pyvmm.errors import KVM_UDEV_RULE, permission_advice


def _group_other_than_root() -> grp.struct_group:
    for name in ("kvm", "disk", "users", "nogroup"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    pytest.skip("no group other than root on this machine")


def test_root_only_device_gets_the_udev_rule(tmp_path):
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    dev.chmod(0o600)
    advice = permission_advice(str(dev))
    assert f"{dev} (-rw-------" in advice
    assert KVM_UDEV_RULE in advice and "udevadm trigger" in advice
    assert "run as root" in advice and "chmod 0666" in advice
    assert "docs/HOSTS.md" in advice
    try:
        grp.getgrnam("kvm")
    except KeyError:
        assert "no `kvm` group" in advice


def test_group_device_says_join_that_group(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown to another group needs root")
    group = _group_other_than_root()
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    os.chown(dev, 0, group.gr_gid)
    dev.chmod(0o660)
    advice = permission_advice(str(dev))
    assert f"-rw-rw---- root {group.gr_name}" in advice
    assert f"usermod -aG {group.gr_name} $USER" in advice
    assert "udev" not in advice


def test_message_is_not_doubled(tmp_path):
    with pytest.raises(KvmUnavailable) as info:
        Kvm(str(tmp_path / "missing"))
    err = info.value
    assert err.errno == errno.ENOENT and err.filename == str(tmp_path / "missing")
    text = str(err)
    assert text == err.strerror
    assert not text.endswith(f": '{tmp_path / 'missing'}'")
