# SPDX-License-Identifier: GPL-2.0-or-later
"""`load_linux`: a Linux kernel of either format, chosen by its first bytes: an ELF `vmlinux`
through its PVH entry (`pvh`), anything else as a bzImage with the 64-bit entry (`bzimage`)."""

from __future__ import annotations

import os
from typing import Any

from . import bzimage, pvh


def ram_size(memory) -> int:
    """The bytes of RAM from address 0 up to the first hole (the loaders' RAM)."""
    end = 0
    for region in sorted(memory.regions(0), key=lambda r: r.guest_addr):
        if region.guest_addr != end:
            break
        end = region.end
    if not end:
        raise ValueError("the machine has no RAM at address 0: give it memory before "
                         "loading a kernel")
    return end


def _read(item: str | os.PathLike | bytes) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    with open(item, "rb") as f:
        return f.read()


def load_linux(machine: Any, kernel: str | os.PathLike | bytes, *,
               initrd: str | os.PathLike | bytes | None = None, cmdline: str = "",
               rsdp: int = 0) -> pvh.Vmlinux | bzimage.SetupHeader:
    """Load `kernel` (a path or its bytes) into `machine` (anything with `vm`, `vcpus` and
    `memory`) and set vCPU 0 at its entry; the other vCPUs get the CPUID and are left for
    the kernel to start. `rsdp` is the ACPI RSDP's address if the platform wrote tables."""
    image = _read(kernel)
    ramdisk = _read(initrd) if initrd is not None else None
    loader = pvh if image[:4] == b"\x7fELF" else bzimage
    return loader.load(machine.vm, machine.vcpus, image, ram_size=ram_size(machine.memory),
                       cmdline=cmdline, initrd=ramdisk, rsdp=rsdp)
