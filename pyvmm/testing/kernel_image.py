# SPDX-License-Identifier: GPL-2.0-or-later
"""The kernel images the nested runner boots: the ELF vmlinux pulled out of a bzImage, and
whether it carries the PVH entry note that lets QEMU boot it directly."""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib

def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside an x86 bzImage.

    The boot protocol header (at 0x1f1) gives the number of 512-byte setup sectors; the
    protected-mode part follows them, and its header fields payload_offset (0x248) and
    payload_length (0x24c) locate the compressed kernel within that part.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS boot header)")
    version, = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise ValueError(f"boot protocol {version:#x} has no payload fields")
    setup_sects = bzimage[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[pm_start + offset: pm_start + offset + length]
    elf = _decompress(payload)
    if elf[:4] != b"\x7fELF":
        raise ValueError("decompressed payload is not an ELF file")
    return elf


def _decompress(payload: bytes) -> bytes:
    if payload[:6] == b"\xfd7zXZ\x00":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        return d.decompress(payload)
    if payload[:2] == b"\x1f\x8b":
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload[:3] == b"BZh":
        return bz2.BZ2Decompressor().decompress(payload)
    if payload[:3] == b"\x5d\x00\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if payload[:4] == b"\x28\xb5\x2f\xfd" and shutil.which("zstd"):
        # the kernel appends the uncompressed size; zstd stops at the end of its frame
        res = subprocess.run(["zstd", "-dc"], input=payload[:-4], capture_output=True, check=True)
        return res.stdout
    raise ValueError(f"unsupported kernel compression (magic {payload[:4].hex()})")


def has_pvh_note(elf: bytes) -> bool:
    """True if the ELF has a Xen note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY): QEMU can boot it
    through PVH."""
    try:
        return _find_pvh_note(elf)
    except struct.error:  # truncated
        return False


def _find_pvh_note(elf: bytes) -> bool:
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        off, = struct.unpack_from("<Q", elf, base + 8)
        size, = struct.unpack_from("<Q", elf, base + 32)
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12: pos + 12 + namesz].rstrip(b"\x00")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False
