# SPDX-License-Identifier: GPL-2.0-or-later
"""The debugged machine as gdb sees it: guest-virtual memory and breakpoints.

Memory: gdb's addresses are linear (virtual) addresses of the vCPU it has selected. Each page
is translated with KVM_TRANSLATE under that vCPU's paging; an address the guest has not mapped
is taken as guest-physical (so memory outside the page tables, and real mode, stay readable).
Software breakpoints planted in memory are hidden from reads, as gdb expects.

Breakpoints: Z0 plants an int3 where the host intercepts it (`probe.DebugSupport`), and takes
a debug register otherwise; Z1 (hardware breakpoint) and Z2/Z3/Z4 (write, read, access
watchpoints) take debug registers, four in all. Where debug-register breakpoints do not fire
either, Z0/Z1 become "stepped" breakpoints: the server continues by single steps and stops
at them (`stepped`). Every vCPU gets the same configuration, only the vCPU being
single-stepped has single-step on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..exits import DebugExit
from ..caps import Cap
from ..guestdebug import (BP_VECTOR, DB_VECTOR, DR6_BS, GUESTDBG_BLOCKIRQ, HW_BREAKPOINT_SLOTS,
                          HwBreakpoint, set_guest_debug)
from .probe import DebugSupport

__all__ = ["Breakpoints", "GuestMemory", "NoSlot", "StopReason"]

PAGE = 0x1000
SET_GUEST_DEBUG2 = Cap.SET_GUEST_DEBUG2
INT3 = b"\xcc"

#: gdb's Z types: what each asks for and how a stop on it is reported.
_WATCH = {2: ("write", "watch"), 3: ("access", "rwatch"), 4: ("access", "awatch")}


class NoSlot(Exception):
    """All four debug registers are taken."""


@dataclass(frozen=True)
class StopReason:
    """Why a vCPU stopped for the debugger: `kind` is "swbreak", "hwbreak", "watch", "rwatch",
    "awatch" or "step"; `address` is the watched address for watchpoints."""

    kind: str
    address: int = 0

    def stop_reply_part(self) -> str:
        if self.kind in ("watch", "rwatch", "awatch"):
            return f"{self.kind}:{self.address:x};"
        if self.kind in ("swbreak", "hwbreak"):
            return f"{self.kind}:;"
        return ""


class GuestMemory:
    """Reads and writes of guest-virtual addresses through one vCPU's translation."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine

    def physical(self, vcpu: Any, gva: int) -> int:
        """The guest-physical address of `gva` (itself when the guest has no mapping)."""
        page = gva & ~(PAGE - 1)
        try:
            t = vcpu.translate(page)
        except (OSError, ValueError):
            return gva
        return t.gpa + (gva - page) if t.valid else gva

    def _chunks(self, gva: int, length: int):
        while length > 0:
            n = min(length, PAGE - (gva & (PAGE - 1)))
            yield gva, n
            gva += n
            length -= n

    def read(self, vcpu: Any, gva: int, length: int) -> bytes:
        out = bytearray()
        for addr, n in self._chunks(gva, length):
            out += self.machine.memory.read(self.physical(vcpu, addr), n)
        return bytes(out)

    def write(self, vcpu: Any, gva: int, data: bytes) -> None:
        pos = 0
        for addr, n in self._chunks(gva, len(data)):
            self.machine.memory.write(self.physical(vcpu, addr), data[pos: pos + n])
            pos += n


@dataclass
class _Slot:
    ztype: int
    bp: HwBreakpoint


class Breakpoints:
    """gdb's breakpoints and watchpoints on one machine, and the KVM_SET_GUEST_DEBUG
    configuration that implements them."""

    def __init__(self, machine: Any, memory: GuestMemory, support: DebugSupport) -> None:
        self.machine = machine
        self.memory = memory
        self.support = support
        self._int3: dict[int, tuple[int, bytes]] = {}   # gva -> (gpa, original byte)
        self._slots: list[_Slot] = []
        #: Breakpoints the server finds by single-stepping (no int3, no debug registers).
        self.stepped: set[int] = set()
        self._lock = threading.Lock()
        self.stepping: int | None = None               # id of the vCPU being stepped
        # Step without diving into interrupt handlers, where this KVM can.
        caps = machine.vm.check_extension(SET_GUEST_DEBUG2) if machine.vcpus else 0
        self.block_irqs = bool(caps & GUESTDBG_BLOCKIRQ)

    # -- inserting and removing

    def insert(self, ztype: int, address: int, kind: int, vcpu: Any) -> None:
        """Z packet: raises NoSlot, ValueError (bad length/alignment) or OSError (memory)."""
        if ztype == 0 and self.support.int3_intercepted:
            if address in self._int3:
                return
            gpa = self.memory.physical(vcpu, address)
            original = self.machine.memory.read(gpa, 1)
            self.machine.memory.write(gpa, INT3)
            self._int3[address] = (gpa, original)
            return
        if ztype in (0, 1) and not self.support.exec_breakpoints_fire:
            self.stepped.add(address)
            return
        if ztype in (0, 1):
            bp = HwBreakpoint(address, "exec", 1)
        else:
            bp = HwBreakpoint(address, _WATCH[ztype][0], kind)
        if any(s.ztype == ztype and s.bp == bp for s in self._slots):
            return
        if len(self._slots) >= HW_BREAKPOINT_SLOTS:
            raise NoSlot(f"all {HW_BREAKPOINT_SLOTS} debug registers are in use")
        self._slots.append(_Slot(ztype, bp))

    def remove(self, ztype: int, address: int, kind: int) -> None:
        if ztype == 0 and address in self._int3:
            gpa, original = self._int3.pop(address)
            self.machine.memory.write(gpa, original)
            return
        if ztype in (0, 1) and address in self.stepped:
            self.stepped.discard(address)
            return
        for slot in self._slots:
            if slot.ztype == ztype and slot.bp.address == address:
                self._slots.remove(slot)
                return

    def clear(self) -> None:
        """Remove everything (detach): memory gets its bytes back, debugging goes off."""
        for address in list(self._int3):
            self.remove(0, address, 1)
        self._slots.clear()
        self.stepped.clear()
        self.stepping = None
        for vcpu in self.machine.vcpus:
            set_guest_debug(vcpu)

    def hide(self, vcpu: Any, gva: int, data: bytes) -> bytes:
        """`data` read at `gva` with the planted int3 bytes replaced by the originals."""
        out = bytearray(data)
        for address, (_, original) in self._int3.items():
            if gva <= address < gva + len(data):
                out[address - gva] = original[0]
        return bytes(out)

    def write_through(self, gva: int, data: bytes) -> bytes:
        """gdb writes memory under a planted int3: keep the new byte as the original and the
        int3 in place. Returns the bytes to write."""
        out = bytearray(data)
        for address, (gpa, _) in list(self._int3.items()):
            if gva <= address < gva + len(data):
                self._int3[address] = (gpa, bytes((out[address - gva],)))
                out[address - gva] = INT3[0]
        return bytes(out)

    # -- applying

    def apply(self, vcpu: Any, inject: int | None = None) -> None:
        """KVM_SET_GUEST_DEBUG for `vcpu` with the current breakpoints (and `inject`)."""
        set_guest_debug(vcpu, single_step=self.stepping == vcpu.id,
                        sw_breakpoints=bool(self._int3),
                        hw_breakpoints=[s.bp for s in self._slots], inject=inject,
                        block_irqs=self.block_irqs)

    def apply_all(self) -> None:
        for vcpu in self.machine.vcpus:
            self.apply(vcpu)

    # -- classifying stops

    def classify(self, exit: DebugExit, vcpu: Any) -> StopReason | None:
        """Why `exit` is the debugger's, or None when the exception is the guest's own."""
        if exit.exception == BP_VECTOR:
            return StopReason("swbreak") if exit.pc in self._int3 else None
        if exit.exception != DB_VECTOR:
            return None
        for index, slot in enumerate(self._slots):
            if exit.dr6 >> index & 1:
                if slot.ztype == 0:
                    return StopReason("swbreak")
                if slot.ztype == 1:
                    return StopReason("hwbreak")
                return StopReason(_WATCH[slot.ztype][1], slot.bp.address)
        if exit.dr6 & DR6_BS and self.stepping == vcpu.id:
            return StopReason("step")
        return None
