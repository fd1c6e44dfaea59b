# SPDX-License-Identifier: GPL-2.0-or-later
"""The VM-wide x86 state: the in-kernel PICs and IOAPIC, the PIT, the kvmclock clock, and
`VmState`, which holds all of them for a snapshot or a migration. Also the two VM ioctls that
go with moving a guest: KVM_SET_IDENTITY_MAP_ADDR and KVM_CLEAR_DIRTY_LOG.

Plain functions of a `Vm`, using its public API; the thin methods on Vm call these.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, cast

from .. import ioctls as io
from .._ffi import ffi
from ..caps import Cap
from ..errors import KvmError, MissingCapability
from .structs import ClockData, IoapicState, Irqchip, PicState, PitState, from_bytes

if TYPE_CHECKING:
    from ..memory import MemoryRegion
    from ..vm import Vm

__all__ = ["IRQCHIP_IOAPIC", "IRQCHIP_PIC_MASTER", "IRQCHIP_PIC_SLAVE", "VmState",
           "clear_dirty_log", "enable_manual_dirty_log", "get_clock", "get_irqchip", "get_pit",
           "has_irqchip", "has_pit", "load_vm_state", "save_vm_state", "set_clock",
           "set_identity_map_addr", "set_irqchip", "set_pit"]

IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2
_CHIP_TYPES = {IRQCHIP_PIC_MASTER: PicState, IRQCHIP_PIC_SLAVE: PicState,
               IRQCHIP_IOAPIC: IoapicState}
KVM_CLOCK_REALTIME = 4
DIRTY_LOG_MANUAL_PROTECT_ENABLE, DIRTY_LOG_INITIALLY_SET = 1, 2
PAGE_SIZE = 4096


def _ioctl(vm: Vm, request: int, arg: object = 0, detail: str | None = None) -> int:
    return vm.ioctl(request, arg, detail)


def _absent(call, *args) -> bool:
    """Run call(*args); True when KVM says the device is not there (ENXIO)."""
    try:
        call(*args)
    except KvmError as err:
        if err.errno == errno.ENXIO:
            return True
        raise
    return False


# -- irqchip -----------------------------------------------------------------------------------

def _check_chip(chip: int) -> Any:
    if chip not in _CHIP_TYPES:
        raise ValueError(f"irqchip {chip!r} is not 0 (PIC master), 1 (PIC slave) or 2 (IOAPIC)")
    return _CHIP_TYPES[chip]


def get_irqchip(vm: Vm, chip: int) -> PicState | IoapicState:
    """KVM_GET_IRQCHIP: a copy of one in-kernel interrupt controller (0 PIC master, 1 PIC
    slave, 2 IOAPIC). KvmError ENXIO without a full in-kernel irqchip."""
    cls = _check_chip(chip)
    req = Irqchip(chip_id=chip)
    _ioctl(vm, io.KVM_GET_IRQCHIP, req._c, detail=f"chip {chip}")
    raw = ffi.buffer(ffi.addressof(req._c.chip), ffi.sizeof(cls.ctype))[:]
    return from_bytes(cls, raw)


def set_irqchip(vm: Vm, chip: int, state: PicState | IoapicState) -> None:
    """KVM_SET_IRQCHIP: replace one in-kernel interrupt controller's state."""
    cls = _check_chip(chip)
    if not isinstance(state, cls):
        raise TypeError(f"irqchip {chip} takes a {cls.__name__}, got {type(state).__name__}")
    req = Irqchip(chip_id=chip)
    ffi.memmove(ffi.addressof(req._c.chip), state._c, ffi.sizeof(cls.ctype))
    _ioctl(vm, io.KVM_SET_IRQCHIP, req._c, detail=f"chip {chip}")


def has_irqchip(vm: Vm) -> bool:
    """Whether the VM has the full in-kernel irqchip (PICs and IOAPIC; a split irqchip has
    them in userspace)."""
    return not _absent(get_irqchip, vm, IRQCHIP_PIC_MASTER)


# -- PIT ---------------------------------------------------------------------------------------

def get_pit(vm: Vm) -> PitState:
    """KVM_GET_PIT2: the in-kernel i8254's three channels. KvmError ENXIO without a PIT."""
    state = PitState()
    _ioctl(vm, io.KVM_GET_PIT2, state._c)
    return state


def set_pit(vm: Vm, state: PitState) -> None:
    """KVM_SET_PIT2."""
    _ioctl(vm, io.KVM_SET_PIT2, PitState.cast(state)._c)


def has_pit(vm: Vm) -> bool:
    """Whether the VM has an in-kernel PIT (create_pit())."""
    return not _absent(get_pit, vm)


# -- clock -------------------------------------------------------------------------------------

def get_clock(vm: Vm) -> ClockData:
    """KVM_GET_CLOCK: the VM's kvmclock time in ns (with the host realtime/TSC it pairs with
    where flags say so)."""
    if not vm.check_extension(Cap.ADJUST_CLOCK):
        raise MissingCapability(Cap.ADJUST_CLOCK, "KVM_GET_CLOCK", vm.role,
                                "this host cannot read the VM clock")
    clock = ClockData()
    _ioctl(vm, io.KVM_GET_CLOCK, clock._c)
    return clock


def set_clock(vm: Vm, clock: ClockData | int, *, realtime: bool = False) -> None:
    """KVM_SET_CLOCK: set the VM's kvmclock to `clock` (a ClockData or ns). With
    `realtime=True` (and a ClockData from get_clock with KVM_CLOCK_REALTIME), KVM adds the host
    realtime that passed since it was read, so guest time keeps pace with wall time across a
    migration; by default the clock resumes exactly where it was."""
    if isinstance(clock, int):
        if not 0 <= clock < 1 << 64:
            raise ValueError(f"clock {clock} ns is outside 0..2**64-1")
        data = ClockData(clock=clock)
    else:
        data = ClockData.cast(clock).copy()
    if realtime and not data.flags & KVM_CLOCK_REALTIME:
        raise ValueError("realtime=True needs a ClockData read with KVM_CLOCK_REALTIME set")
    data.flags = KVM_CLOCK_REALTIME if realtime else 0
    if not vm.check_extension(Cap.ADJUST_CLOCK):
        raise MissingCapability(Cap.ADJUST_CLOCK, "KVM_SET_CLOCK", vm.role,
                                "this host cannot set the VM clock")
    _ioctl(vm, io.KVM_SET_CLOCK, data._c)


# -- memory ------------------------------------------------------------------------------------

def set_identity_map_addr(vm: Vm, addr: int) -> None:
    """KVM_SET_IDENTITY_MAP_ADDR: where (one page, guest-physical) Intel's real-mode identity
    page table lives. Only before the first vCPU is created (EINVAL after)."""
    if not 0 <= addr < 1 << 52 or addr % PAGE_SIZE:
        raise ValueError(f"identity map address {addr:#x} is not a page-aligned guest address")
    _ioctl(vm, io.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr), detail=f"{addr:#x}")


def enable_manual_dirty_log(vm: Vm, *, initially_set: bool = False) -> int:
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG stops re-protecting pages, which
    clear_dirty_log() does instead (for the pages asked for). With `initially_set`, slots
    start with every page dirty (and unprotected) rather than the whole slot write-protected
    at once. Returns the flags enabled."""
    offered = vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2)
    flags = DIRTY_LOG_MANUAL_PROTECT_ENABLE | (DIRTY_LOG_INITIALLY_SET if initially_set else 0)
    if flags & ~offered:
        raise MissingCapability(Cap.MANUAL_DIRTY_LOG_PROTECT2, "KVM_ENABLE_CAP", vm.role,
                                f"flags {flags:#x} asked, this host offers {offered:#x}")
    vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, flags)
    return flags


def clear_dirty_log(vm: Vm, region: MemoryRegion, first_page: int = 0,
                    num_pages: int | None = None) -> None:
    """KVM_CLEAR_DIRTY_LOG: reset the dirty bits of pages first_page..first_page+num_pages-1
    of `region` (all of the rest of it by default) and write-protect them again, so the next
    dirty_log() reports only writes made after this. Needs enable_manual_dirty_log().
    KVM wants `first_page` a multiple of 64, and `num_pages` one too unless the range ends
    at the region's end."""
    if not vm.memory.owns(region):
        raise ValueError(f"{region!r} is not a live region of this VM")
    if not region.log_dirty:
        raise ValueError(f"{region!r} was not added with log_dirty=True")
    npages = region.size // PAGE_SIZE
    if num_pages is None:
        num_pages = npages - first_page
    if first_page < 0 or first_page % 64:
        raise ValueError(f"first_page {first_page} is not a multiple of 64 (KVM's rule)")
    if num_pages <= 0 or first_page + num_pages > npages:
        raise ValueError(f"pages {first_page}+{num_pages} are outside the region's {npages}")
    if num_pages % 64 and first_page + num_pages != npages:
        raise ValueError(f"num_pages {num_pages} is not a multiple of 64 and does not reach "
                         "the region's end (KVM's rule)")
    words = (num_pages + 63) // 64
    bitmap = ffi.new("uint64_t[]", [(1 << 64) - 1] * words)
    req = ffi.new("struct kvm_clear_dirty_log *", {"slot": region.kernel_slot,
                                                   "num_pages": num_pages,
                                                   "first_page": first_page})
    req.dirty_bitmap = bitmap
    _ioctl(vm, io.KVM_CLEAR_DIRTY_LOG, req, detail=f"slot {region.kernel_slot} pages "
           f"{first_page}+{num_pages}")


# -- VmState -----------------------------------------------------------------------------------

@dataclass(eq=False)
class VmState:
    """The VM-wide state: kvmclock, the PICs and IOAPIC (None without an in-kernel irqchip)
    and the PIT (None without one). Picklable; encode() gives plain values."""

    clock: ClockData | None = None
    pic_master: PicState | None = None
    pic_slave: PicState | None = None
    ioapic: IoapicState | None = None
    pit: PitState | None = None

    _TYPES = {"clock": ClockData, "pic_master": PicState, "pic_slave": PicState,
              "ioapic": IoapicState, "pit": PitState}

    @property
    def irqchip(self) -> bool:
        """Whether the source VM had the in-kernel irqchip."""
        return self.ioapic is not None

    def encode(self) -> dict[str, Any]:
        """{field: hex of the struct's bytes, or None}."""
        return {f.name: None if getattr(self, f.name) is None
                else getattr(self, f.name).to_bytes().hex() for f in fields(self)}

    @classmethod
    def decode(cls, data: dict[str, Any]) -> VmState:
        """The inverse of encode(); ValueError for anything malformed."""
        try:
            return cls(**{name: None if data.get(name) is None
                          else from_bytes(t, bytes.fromhex(data[name]))
                          for name, t in cls._TYPES.items()})
        except (TypeError, AttributeError) as err:
            raise ValueError(f"not an encoded VmState: {err}") from None

    def __reduce__(self):
        return (VmState.decode, (self.encode(),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VmState) and self.encode() == other.encode()

    __hash__ = None  # type: ignore[assignment]


def save_vm_state(vm: Vm) -> VmState:
    """Read the VM-wide state. Stop every vCPU first (the devices move while they run)."""
    state = VmState()
    if vm.check_extension(Cap.ADJUST_CLOCK):
        state.clock = get_clock(vm)
    if has_irqchip(vm):
        state.pic_master = cast(PicState, get_irqchip(vm, IRQCHIP_PIC_MASTER))
        state.pic_slave = cast(PicState, get_irqchip(vm, IRQCHIP_PIC_SLAVE))
        state.ioapic = cast(IoapicState, get_irqchip(vm, IRQCHIP_IOAPIC))
    if has_pit(vm):
        state.pit = get_pit(vm)
    return state


def load_vm_state(vm: Vm, state: VmState) -> None:
    """Put `state` into `vm`, which must have the same devices (create_irqchip() before its
    vCPUs, create_pit() when the state has a PIT): interrupt controllers first, then the PIT
    (its output goes to them), then the clock."""
    if not isinstance(state, VmState):
        raise TypeError(f"expected VmState, got {type(state).__name__}")
    if state.irqchip and not has_irqchip(vm):
        raise ValueError("the state has an in-kernel irqchip and this VM has none: "
                         "create_irqchip() first")
    if state.pit is not None and not has_pit(vm):
        raise ValueError("the state has an in-kernel PIT and this VM has none: create_pit() "
                         "first")
    for chip, value in ((IRQCHIP_PIC_MASTER, state.pic_master),
                        (IRQCHIP_PIC_SLAVE, state.pic_slave), (IRQCHIP_IOAPIC, state.ioapic)):
        if value is not None:
            set_irqchip(vm, chip, value)
    if state.pit is not None:
        set_pit(vm, state.pit)
    if state.clock is not None:
        set_clock(vm, state.clock)
