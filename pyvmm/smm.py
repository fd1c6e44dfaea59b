# SPDX-License-Identifier: GPL-2.0-or-later
"""System Management Mode helpers: SMRAM in memslot address space 1, SMBASE, and the
state-save area KVM writes on SMI entry and reads back on RSM.

How KVM does SMM (stock kvm_intel/kvm_amd with ``KVM_CAP_X86_SMM``):

* A VM has two memslot address spaces (``KVM_CAP_MULTI_ADDRESS_SPACE`` = 2): a vCPU outside
  SMM sees the slots of address space 0, a vCPU inside SMM sees *only* those of address space 1
  (bits 16-31 of the slot number). Address space 1 is a complete, separate view: RAM that the
  SMI handler needs must be registered there too (QEMU registers its RAM in both), and a
  guest-physical address with no slot in address space 1 is MMIO while in SMM even when
  address space 0 has RAM there. ``vm.add_memory(..., address_space=1)`` adds such a slot and
  ``vm.memory.read/write/view(..., address_space=1)`` reach it.
* An SMI (``vcpu.smi()``, ``KVM_SET_VCPU_EVENTS`` with ``smi.pending``, or the guest's own
  local APIC ICR with delivery mode SMI) saves the vCPU state at SMBASE+0xFE00..0xFFFF, then
  starts the handler at SMBASE+0x8000 in "big real mode": CS selector SMBASE>>4 with base
  SMBASE, the other segments base 0 with 4 GiB limits, CR0.PE/PG clear, EFER 0, RFLAGS 2.
  The general registers keep their values. RSM reloads everything from the save area,
  including SMBASE, which is how a handler relocates it.
* Which save-area layout KVM uses depends on the guest CPUID (long mode, 0x80000001 EDX bit 29),
  not on the mode the vCPU was in: the AMD64-style 64-bit layout (revision 0x00020064) when the
  guest CPUID has long mode, else the Intel P6-style 32-bit layout (revision 0x00020000).
  Both keep the revision at SMBASE+0xFEFC.
* SMBASE is also readable and writable by the host as ``MSR_IA32_SMBASE`` (0x9e; the guest
  itself cannot access that MSR).
* ``kvm_run.flags & KVM_RUN_X86_SMM`` (``vcpu.in_smm``) says whether the vCPU was in SMM when
  KVM_RUN returned; ``get_events().smi`` carries smm, pending, smm_inside_nmi and latched_init
  (with ``KVM_VCPUEVENT_VALID_SMM`` in ``flags`` on set).

Offsets below are relative to SMBASE. The field layouts are those of the AMD APM (64-bit) and
the Intel SDM P6 table (32-bit) as KVM implements them (``arch/x86/kvm/smm.h``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .caps import Cap
from .errors import MissingCapability
from .smm_state_save import (
    DEFAULT_SMBASE,
    REVISION_32,
    REVISION_64,
    REVISION_OFFSET,
    SMRAM_ADDRESS_SPACE,
    STATE_SAVE_OFFSET,
    STATE_SAVE_SIZE,
    SaveSegment,
    StateSave,
    StateSave32,
    StateSave64,
    state_save,
)

__all__ = [
    "APIC_ICR_SELF_SMI",
    "DEFAULT_SMBASE",
    "HANDLER_OFFSET",
    "MSR_IA32_SMBASE",
    "REVISION_32",
    "REVISION_64",
    "REVISION_OFFSET",
    "SMRAM_ADDRESS_SPACE",
    "SMRAM_SIZE",
    "STATE_SAVE_OFFSET",
    "STATE_SAVE_SIZE",
    "KVM_VCPUEVENT_VALID_SMM",
    "SaveSegment",
    "SmmState",
    "StateSave",
    "StateSave32",
    "StateSave64",
    "add_smram",
    "get_smbase",
    "guest_has_long_mode",
    "inject_smi",
    "install_handler",
    "require_smm",
    "set_smbase",
    "smm_state",
    "state_save",
]

HANDLER_OFFSET = 0x8000           # the handler starts at SMBASE+0x8000 (CS:IP = SMBASE>>4:8000)
SMRAM_SIZE = 0x10000              # SMBASE .. SMBASE+0xFFFF: handler and save area
MSR_IA32_SMBASE = 0x9E
KVM_VCPUEVENT_VALID_SMM = 8

# Local APIC ICR (low dword, xAPIC MMIO 0xFEE00300): delivery mode SMI (0b010 << 8), level
# assert (1 << 14), destination shorthand "self" (0b01 << 18); the vector must be 0.
APIC_ICR_SELF_SMI = (0b010 << 8) | (1 << 14) | (0b01 << 18)

_CPUID_EXT_FEATURES = 0x80000001
_CPUID_LM = 1 << 29               # EDX bit 29: long mode


# ------------------------------------------------------------------------- capability, SMRAM

def require_smm(vm: Any, what: str = "SMM") -> None:
    """Raise MissingCapability unless the VM has SMM and a second memslot address space."""
    if not vm.check_extension(Cap.X86_SMM):
        raise MissingCapability(Cap.X86_SMM, "KVM_CHECK_EXTENSION", "vm",
                                f"{what} needs System Management Mode, which this host's KVM "
                                "does not have (stock KVM does: try `pyvmm nested`)")
    if vm.check_extension(Cap.MULTI_ADDRESS_SPACE) < 2:
        raise MissingCapability(Cap.MULTI_ADDRESS_SPACE, "KVM_CHECK_EXTENSION", "vm",
                                f"{what} needs a second memslot address space for SMRAM")


def add_smram(vm: Any, smbase: int = DEFAULT_SMBASE, size: int = SMRAM_SIZE) -> Any:
    """Add `size` bytes of SMRAM at guest-physical `smbase` in address space 1 (visible only
    inside SMM). The default covers the handler entry and the state-save area."""
    return vm.add_memory(smbase, size, address_space=SMRAM_ADDRESS_SPACE)


def alias_ram(vm: Any, ram: Any, smbase: int = DEFAULT_SMBASE,
              size: int = SMRAM_SIZE) -> list[Any]:
    """Show `ram` (a region of address space 0) in SMM's address space too, except where
    SMRAM sits, as QEMU maps a PC: the SMI handler then reaches the memory the rest of the
    guest uses. Returns the alias regions (none where SMRAM covers `ram` entirely)."""
    aliases = []
    before = min(max(smbase - ram.guest_addr, 0), ram.size)
    after = min(max(smbase + size - ram.guest_addr, 0), ram.size)
    if before > 0:
        aliases.append(vm.alias_memory(ram, size=before, address_space=SMRAM_ADDRESS_SPACE))
    if after < ram.size:
        aliases.append(vm.alias_memory(ram, offset=after, address_space=SMRAM_ADDRESS_SPACE))
    return aliases


def install_handler(vm: Any, code: bytes, smbase: int = DEFAULT_SMBASE) -> None:
    """Write SMI handler code at SMBASE+0x8000 in SMRAM (address space 1). The code runs in
    16-bit big real mode with CS base = SMBASE, so it must not depend on its link address
    (relative jumps; data through %cs:offset)."""
    if len(code) > STATE_SAVE_OFFSET - HANDLER_OFFSET:
        raise ValueError(f"a handler of {len(code)} bytes would run into the state-save area")
    vm.memory.write(smbase + HANDLER_OFFSET, code, address_space=SMRAM_ADDRESS_SPACE)


# ------------------------------------------------------------------------------- vCPU helpers

def get_smbase(vcpu: Any) -> int:
    """The vCPU's SMBASE (MSR_IA32_SMBASE, host-initiated read)."""
    return vcpu.get_msrs([MSR_IA32_SMBASE])[MSR_IA32_SMBASE]


def set_smbase(vcpu: Any, smbase: int) -> None:
    vcpu.set_msrs({MSR_IA32_SMBASE: smbase})


def inject_smi(vcpu: Any) -> None:
    """Make an SMI pending through KVM_SET_VCPU_EVENTS (the other way besides ``vcpu.smi()``)."""
    events = vcpu.get_events()
    events.smi.pending = 1
    events.flags |= KVM_VCPUEVENT_VALID_SMM
    vcpu.set_events(events)


@dataclass(frozen=True)
class SmmState:
    """The SMM part of KVM_GET_VCPU_EVENTS."""

    smm: bool
    pending: bool
    smm_inside_nmi: bool
    latched_init: bool


def smm_state(vcpu: Any) -> SmmState:
    smi = vcpu.get_events().smi
    return SmmState(bool(smi.smm), bool(smi.pending), bool(smi.smm_inside_nmi),
                    bool(smi.latched_init))


def guest_has_long_mode(cpuid: Iterable[Any]) -> bool:
    """Whether a CPUID table offers long mode, which makes KVM use the 64-bit save layout."""
    for entry in cpuid:
        if entry.function == _CPUID_EXT_FEATURES:
            return bool(entry.edx & _CPUID_LM)
    return False


# -------------------------------------------------------------------------- state-save area
