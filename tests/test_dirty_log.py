# SPDX-License-Identifier: GPL-2.0-or-later
"""Dirty-page logging (KVM_GET_DIRTY_LOG) through `vm.dirty_log(region)`.

What the log promises: every page the guest wrote is in it, pages the guest never touched are
not, and reading it clears it. It may also hold a page the guest only *read*: on kvm_pvm at
CPL3 (docs/HOSTS.md), and on stock KVM when the host had written the page before the guest's first
read (KVM maps such a page writable at once and counts it dirty). The tests allow exactly
those pages and no others."""

from __future__ import annotations

import pytest
from helpers import expect, guest

from pyvmm import exits

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms

BASE = 0x20000          # the logged region: 8 pages, reached through ES = 0x2000
PAGES = 8


def test_guest_writes_are_logged_exactly_and_cleared(vm):
    vm.add_memory(0, 0x10000)                       # code, stack: not logged
    region = vm.add_memory(BASE, PAGES * 0x1000, log_dirty=True)
    vm.memory.write(BASE + 0x5000, b"host")         # host writes are not tracked
    vm.memory.write(BASE + 0x2000, b"ABCD")
    vcpu = guest(vm, """
        mov $0x2000, %ax
        mov %ax, %es
        movb $0x11, %es:0x1000       # page 1
        movw $0x3333, %es:0x3ffe     # page 3 (last word)
        movl %es:0x2000, %ebx        # page 2: read only
        out %al, $0x10
        movb $0x77, %es:0x7000       # page 7
        movb $0x33, %es:0x3000       # page 3 again
        hlt
    """)
    assert region.log_dirty
    assert vm.dirty_log(region).pages() == []       # nothing before the guest ran

    expect(vcpu, exits.IoExit)
    bitmap = vm.dirty_log(region)
    assert len(bitmap) == 1                          # 8 pages: one byte
    assert {1, 3} <= set(bitmap.pages()) <= {1, 2, 3}   # 2: host-written, then read
    assert vcpu.get_regs().rbx & 0xFFFFFFFF == int.from_bytes(b"ABCD", "little")
    assert vm.dirty_log(region).pages() == []       # reading the log cleared it

    expect(vcpu, exits.HltExit)
    assert vm.dirty_log(region).pages() == [3, 7]
    assert vm.memory.read(BASE + 0x1000, 1) == b"\x11"
    assert vm.memory.read(BASE + 0x3000, 1) == b"\x33"
    assert vm.memory.read(BASE + 0x3FFE, 2) == b"\x33\x33"
    assert vm.memory.read(BASE + 0x7000, 1) == b"\x77"
    assert vm.memory.read(BASE + 0x5000, 4) == b"host"
    assert vm.dirty_log(region).pages() == []


def test_large_region_bitmap_indexes(vm):
    """Page numbers in the second and third u64 words of KVM's bitmap come out right. The
    guest's own code lives in the logged region too."""
    region = vm.add_memory(0, 0x100000, log_dirty=True)              # 256 pages at 0
    vcpu = guest(vm, """
        movb $1, 0xc000              # page 12
        mov $0x4a00, %ax
        mov %ax, %es
        movw $2, %es:0x123           # 0x4a123: page 74
        mov $0x9f00, %ax
        mov %ax, %es
        movl $3, %es:0xffc           # 0x9fffc: page 159
        hlt
    """)
    vm.dirty_log(region)             # forget the host's loading of the code
    expect(vcpu, exits.HltExit)
    bitmap = vm.dirty_log(region)
    assert len(bitmap) == 256 // 8
    # Page 1 holds the code the host wrote, which the guest fetched (see the module note).
    assert {12, 74, 159} <= set(bitmap.pages()) <= {1, 12, 74, 159}
    assert vm.memory.read(0x9FFFC, 4) == (3).to_bytes(4, "little")


def test_dirty_log_needs_log_dirty(vm):
    region = vm.add_memory(0, 0x1000)
    with pytest.raises(ValueError, match="log_dirty"):
        vm.dirty_log(region)
