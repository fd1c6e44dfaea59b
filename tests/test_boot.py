# SPDX-License-Identifier: GPL-2.0-or-later
"""`pyvmm boot` on the host side: the initramfs, the ACPI table announcing the virtio devices,
options, and the refusal on kvm_pvm. The boots themselves are in test_boot_linux.py."""

from __future__ import annotations

import stat
import struct
import subprocess

import pytest

from pyvmm import Machine, boot, cli
from pyvmm.devices import acpi
from pyvmm.testing import hostinfo
from pyvmm.testing.initramfs import read_cpio
from pyvmm.virtio import acpi as virtio_acpi


def test_init_script_is_valid_shell():
    res = subprocess.run(["sh", "-n"], input=boot.init_script(), text=True,
                         capture_output=True, check=False)
    assert res.returncode == 0, res.stderr
    assert boot.BOOT_MARKER in boot.init_script()


def test_initramfs_content(tmp_path):
    mods = []
    for name in ("virtio", "virtio_mmio"):
        p = tmp_path / f"{name}.ko"
        p.write_bytes(b"\x7fELF" + name.encode())
        mods.append(p)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    path = boot.build_initramfs(mods, str(busybox), tmp_path / "cache")
    entries = read_cpio(path.read_bytes())
    mode, init = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and init.decode() == boot.init_script()
    assert stat.S_ISDIR(entries["lib"][0]) and stat.S_ISDIR(entries["lib/modules"][0])
    assert list(entries).index("lib") < list(entries).index("lib/modules")
    assert entries["etc/boot-modules"][1] == b"virtio\nvirtio_mmio\n"
    assert entries["lib/modules/virtio_mmio.ko"][1] == b"\x7fELFvirtio_mmio"
    assert boot.build_initramfs(mods, str(busybox), tmp_path / "cache") == path  # cached


def test_parse_memory():
    assert boot.parse_memory("256M") == 256 << 20
    assert boot.parse_memory("1G") == 1 << 30
    assert boot.parse_memory("512") == 512 << 20
    assert boot.parse_memory("1048576") == 1 << 20
    with pytest.raises(ValueError):
        boot.parse_memory("lots")


def test_refusal_on_kvm_pvm(capsys):
    if hostinfo.kvm_module() == "kvm_pvm":
        assert cli.main(["boot"]) == boot.EXIT_NOT_HERE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pyvmm nested -- pyvmm boot" in err
    else:  # stock KVM: nothing to refuse (the boots run in test_boot_linux)
        assert hostinfo.kvm_module() in ("kvm_amd", "kvm_intel", None)


def test_ssdt_layout():
    table = virtio_acpi.ssdt([(0xD0000000, 0x200, 5), (0xD0000200, 0x200, 6)])
    assert table[:4] == b"SSDT" and struct.unpack_from("<I", table, 4)[0] == len(table)
    assert sum(table) % 256 == 0
    assert table.count(b"LNRO0005") == 2 and b"VR01" in table
    # Memory32Fixed: base and length; Extended Interrupt: consumer, edge, one GSI
    assert struct.pack("<BHBII", 0x86, 9, 1, 0xD0000200, 0x200) in table
    assert struct.pack("<BHBBI", 0x89, 6, 3, 1, 6) in table
    assert virtio_acpi.pkg_length(10) == b"\x0b"
    assert virtio_acpi.pkg_length(100) == bytes([0x40 | (102 & 0xF), 102 >> 4])


def test_ssdt_added_to_the_platform_tables(kvm):
    with Machine(kvm=kvm, memory_size=2 << 20, serial=False) as m:
        tables = acpi.install(m.memory, 2)
        ssdt = virtio_acpi.ssdt([(0xD0000000, 0x200, 5)])
        at = virtio_acpi.add_table(m.memory, tables, ssdt)
        rsdp = m.memory.read(tables.rsdp_address, 36)
        assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
        rsdt_at, _len, xsdt_at = struct.unpack_from("<IIQ", rsdp, 16)
        for addr, width in ((rsdt_at, 4), (xsdt_at, 8)):
            length, = struct.unpack("<I", m.memory.read(addr + 4, 4))
            table = m.memory.read(addr, length)
            assert sum(table) % 256 == 0
            entries = [int.from_bytes(table[i:i + width], "little")
                       for i in range(36, length, width)]
            assert entries[-1] == at and len(entries) == 3  # FADT, MADT, SSDT
            assert m.memory.read(entries[0], 4) == b"FACP"
        assert m.memory.read(at, len(ssdt)) == ssdt
