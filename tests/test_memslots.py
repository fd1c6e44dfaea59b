# SPDX-License-Identifier: GPL-2.0-or-later
"""Changing memslots of a live VM: moving a slot (`Vm.move_memory`, KVM's KVM_MR_MOVE) and
toggling its flags (`Vm.set_memory_flags`), checked before any ioctl and seen by the guest;
and scenarios in the spirit of the kernel's set_memory_region_test, written our own way: a
slot moved between a guest's reads, moved away or deleted while a vCPU spins on it in
another thread, a VM with no memory, zero-size and overlapping slots, and as many slots as
KVM_CAP_NR_MEMSLOTS allows."""

from __future__ import annotations

import errno
import threading
import time

import pytest
from helpers import code, expect, ioctl_spy, real_mode  # noqa: F401  (ioctl_spy: a fixture)

from pyvmm import Cap, KvmError, Machine, exits, guests
from pyvmm.memory import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms

MAGIC = 0x5107_0000_0000_0000      # page n of a test region starts with the u64 MAGIC + n
MMIO_VALUE = 0x4D4D_494F_4D4D_494F  # what the host answers a read no slot holds ("MMIOMMIO")


def fill_pages(vm, region) -> None:
    for n in range(region.size // 0x1000):
        vm.memory.write_u64(region.guest_addr + n * 0x1000, MAGIC + n)


class MmioAnswer:
    """An MMIO device that answers every read with MMIO_VALUE and remembers the accesses."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.reads: list[int] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append(self.base + offset)
        return MMIO_VALUE.to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((self.base + offset, bytes(data)))


# -- move_memory: checks before any ioctl, and the bookkeeping ---------------------------------

@pytest.mark.parametrize("target, why", [
    (0x40800, "not page-aligned"),
    (-0x1000, "not page-aligned"),
    ((1 << 52) - 0x1000, "52-bit"),             # would end past the guest-physical space
    ((1 << 64) - 0x1000, "52-bit"),             # would wrap around
    (0x1F000, "overlaps"),                      # over the end of `other`
    (0x10000, "overlaps"),                      # exactly `other`
    (True, "integer"),
    ("0x40000", "integer"),
    (0x40000 + 0.0, "integer"),
])
def test_move_memory_rejects_bad_targets_before_any_ioctl(vm, ioctl_spy, target, why):
    other = vm.add_memory(0x10000, 0x10000)
    region = vm.add_memory(0x80000, 0x2000)
    ioctl_spy.clear()
    with pytest.raises(ValueError, match=why):
        vm.move_memory(region, target)
    assert "KVM_SET_USER_MEMORY_REGION" not in ioctl_spy
    assert (region.guest_addr, vm.memory.find(0x80000)) == (0x80000, region)
    assert vm.memory.regions() == [other, region]


def test_move_memory_rejects_regions_it_cannot_move(kvm, vm, ioctl_spy):
    ram = vm.add_memory(0, 0x10000)
    alias = vm.alias_memory(ram, 0x100000, offset=0x1000, size=0x1000, address_space=0)
    gone = vm.add_memory(0x200000, 0x1000)
    vm.remove_memory(gone)
    ioctl_spy.clear()
    with pytest.raises(ValueError, match="alias"):
        vm.move_memory(ram, 0x400000)             # its alias would stay behind
    with pytest.raises(ValueError, match="not a live region"):
        vm.move_memory(gone, 0x400000)
    with kvm.create_vm() as other:
        with pytest.raises(ValueError, match="not a live region"):
            other.move_memory(ram, 0x400000)      # another VM's region
    assert "KVM_SET_USER_MEMORY_REGION" not in ioctl_spy
    assert ram.guest_addr == 0
    # An alias is a memslot of its own: it may move.
    vm.move_memory(alias, 0x300000)
    assert (alias.guest_addr, alias.host_addr) == (0x300000, ram.host_addr + 0x1000)
    vm.memory.write(0x1000, b"seen")
    assert vm.memory.read(0x300000, 4) == b"seen"


def test_move_memory_keeps_the_bookkeeping(vm, ioctl_spy):
    low = vm.add_memory(0x10000, 0x1000)
    region = vm.add_memory(0x40000, 0x4000)
    high = vm.add_memory(0x100000, 0x1000)
    slot, host = region.slot, region.host_addr
    fill_pages(vm, region)
    ioctl_spy.clear()
    assert vm.move_memory(region, 0x200000) is region
    assert ioctl_spy == ["KVM_SET_USER_MEMORY_REGION"]
    assert (region.guest_addr, region.end, region.slot, region.host_addr) == (
        0x200000, 0x204000, slot, host)
    assert vm.memory.regions() == [low, high, region]          # kept sorted by address
    assert vm.memory.find(0x40000) is None and vm.memory.find(0x203FFF) is region
    assert vm.memory.read_u64(0x202000) == MAGIC + 2           # the same host memory
    with pytest.raises(ValueError, match="not in any memory region"):
        vm.memory.read(0x40000, 8)
    # Overlap checks follow the new range: the old one is free, the new one taken.
    with pytest.raises(ValueError, match="overlaps"):
        vm.add_memory(0x203000, 0x1000)
    freed = vm.add_memory(0x40000, 0x4000)
    # Moving to where it is costs no ioctl; remove deletes the slot at its new address in
    # the kernel too (an overlapping slot there is accepted afterwards, not EEXIST).
    ioctl_spy.clear()
    vm.move_memory(region, 0x200000)
    assert ioctl_spy == []
    vm.remove_memory(region)
    assert vm.add_memory(0x1FF000, 0x2000).slot == slot
    assert freed.guest_addr == 0x40000


def test_move_over_its_own_old_range(vm):
    """KVM checks a move for overlaps with the other slots only: shifting a region by one
    page, into its own old range, is a move like any other."""
    region = vm.add_memory(0x200000, 0x200000)
    fill_pages(vm, region)
    vm.move_memory(region, 0x201000)
    vm.move_memory(region, 0x1FF000)
    assert vm.memory.read_u64(0x200000) == MAGIC + 1
    assert vm.memory.regions() == [region]


def test_kernel_refusal_keeps_errno_and_the_region_where_it_was(vm):
    """A slot the bookkeeping does not know (made through the raw ioctl) makes KVM refuse
    the move with EEXIST; the region stays where it was, for Python and for the guest."""
    region = vm.add_memory(0x20000, 0x1000)
    vm.memory.write_u64(0x20000, 0xA1B2C3D4)
    hidden = vm.add_memory(0x800000, 0x1000)
    vm.set_user_memory_region(99, 0, 0x400000, 0x1000, hidden.host_addr)
    with pytest.raises(KvmError) as info:
        vm.move_memory(region, 0x400000)
    err = info.value
    assert (err.errno, err.ioctl, err.role) == (errno.EEXIST, "KVM_SET_USER_MEMORY_REGION",
                                                "vm")
    assert "gpa 0x400000" in str(err)
    assert region.guest_addr == 0x20000 and vm.memory.find(0x20000) is region
    vcpu = vm.create_vcpu()
    vm.add_memory(0, 0x10000)
    vm.memory.write(0x1000, code("""
        mov $0x2000, %ax
        mov %ax, %ds
        movl (0), %ebx
        hlt
    """))
    real_mode(vcpu)
    expect(vcpu, exits.HltExit)
    assert vcpu.get_regs().rbx & 0xFFFFFFFF == 0xA1B2C3D4


# -- what the guest sees, and the flags the kernel keeps ----------------------------------------

READER = """
    mov $0x3000, %ax
    mov %ax, %ds
    movl (0), %ebx               # 0x30000
    movl $0x600dbeef, (4)        # 0x30004
    movl (8), %ecx               # 0x30008
    hlt
"""


@pytest.mark.parametrize("flags", ["readonly", "log_dirty"])
def test_a_moved_slot_keeps_its_flags_in_the_kernel(vm, flags):
    """Moved from 0x20000 to 0x30000, a read-only slot is still read-only for the guest (its
    write is an MMIO exit), a logging one still logs (KVM_GET_DIRTY_LOG of a slot without the
    flag is ENOENT)."""
    vm.add_memory(0, 0x10000)
    region = vm.add_memory(0x20000, 0x1000, **{flags: True})
    vm.memory.write(0x20000, (0x11223344).to_bytes(4, "little"))
    vm.memory.write(0x20008, (0x55667788).to_bytes(4, "little"))
    vm.memory.write(0x1000, code(READER))
    vcpu = vm.create_vcpu()
    real_mode(vcpu)
    vm.move_memory(region, 0x30000)
    assert (region.readonly, region.log_dirty) == (flags == "readonly", flags == "log_dirty")
    if flags == "readonly":
        ex = expect(vcpu, exits.MmioExit)
        assert (ex.address, ex.is_write, bytes(ex.data)) == (
            0x30004, True, (0x600DBEEF).to_bytes(4, "little"))
        expect(vcpu, exits.HltExit)
        assert vm.memory.read(0x30004, 4) == b"\0\0\0\0"
    else:
        expect(vcpu, exits.HltExit)
        assert vm.dirty_log(region).pages() == [0]
        assert vm.memory.read(0x30004, 4) == (0x600DBEEF).to_bytes(4, "little")
    r = vcpu.get_regs()
    assert (r.rbx & 0xFFFFFFFF, r.rcx & 0xFFFFFFFF) == (0x11223344, 0x55667788)


def test_toggling_dirty_logging_and_the_readonly_refusal(vm, ioctl_spy):
    """log_dirty toggles in place (the guest's writes are logged only while it is on);
    KVM cannot change KVM_MEM_READONLY of a live slot: a clear ValueError before any ioctl,
    and EINVAL from the kernel through the raw ioctl."""
    vm.add_memory(0, 0x10000)
    region = vm.add_memory(0x30000, 0x2000)
    vm.memory.write(0x1000, code("""
        mov $0x3000, %ax
        mov %ax, %ds
        movb $1, (0x0000)            # page 0: before logging is on
        out %al, $0x10
        movb $2, (0x1000)            # page 1: while it is on
        hlt
    """))
    vcpu = vm.create_vcpu()
    real_mode(vcpu)
    expect(vcpu, exits.IoExit)
    vm.set_memory_flags(region, log_dirty=True)
    assert region.log_dirty
    assert vm.dirty_log(region).pages() == []            # nothing before it was on
    expect(vcpu, exits.HltExit)
    assert vm.dirty_log(region).pages() == [1]
    ioctl_spy.clear()
    vm.set_memory_flags(region, log_dirty=True)          # already on: nothing to do
    vm.set_memory_flags(region)
    assert ioctl_spy == []
    ro_region = vm.add_memory(0x50000, 0x1000, readonly=True)
    for target, readonly in ((region, True), (ro_region, False)):
        ioctl_spy.clear()
        with pytest.raises(ValueError, match="cannot make a live memslot"):
            vm.set_memory_flags(target, readonly=readonly, log_dirty=False)
        assert ioctl_spy == [] and target.readonly is not readonly
        # The kernel says the same through the raw ioctl, errno kept.
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(target.kernel_slot,
                                      KVM_MEM_READONLY if readonly else 0,
                                      target.guest_addr, target.size, target.host_addr)
        assert (info.value.errno, info.value.ioctl) == (errno.EINVAL,
                                                         "KVM_SET_USER_MEMORY_REGION")
    assert region.log_dirty                              # the refusals changed nothing
    vm.set_memory_flags(region, log_dirty=False)
    assert not region.log_dirty
    with pytest.raises(ValueError, match="log_dirty"):
        vm.dirty_log(region)
    vm.set_log_dirty(region, True)                       # the older spelling, same path
    assert region.log_dirty and vm.dirty_log(region).pages() == []
    # The raw ioctl with the flag cleared really turns logging off in the kernel.
    vm.set_user_memory_region(region.kernel_slot, 0, region.guest_addr, region.size,
                              region.host_addr)
    with pytest.raises(KvmError) as info:
        vm.dirty_log(region)
    assert info.value.errno == errno.ENOENT
    vm.set_user_memory_region(region.kernel_slot, KVM_MEM_LOG_DIRTY_PAGES, region.guest_addr,
                              region.size, region.host_addr)
    assert vm.dirty_log(region).pages() == []


# -- a slot moved between a guest's reads (guests/slotmove.S) -----------------------------------

PROBE = 0x40001000          # the guest's first address: page 1 of the region at its start
ELSEWHERE = 0x80000000      # the guest's second address: where the region goes in step 1
START = 0x40000000


def test_guest_reads_a_slot_the_host_moves_between_its_steps(kvm):
    """Step by step (the guest tells the host each step with an OUT, the host moves the
    2 MiB region, the guest reads two addresses): memory where the region is, an MMIO read
    where it was, and memory again once it is back or moved over its own old range."""
    placement = {0: START, 1: ELSEWHERE, 2: START, 3: START - 0x1000, 4: START + 0x1000}
    with Machine(kvm=kvm, serial=False) as m:
        m.load("slotmove", regs={"rcx": len(placement), "rdi": PROBE, "rsi": ELSEWHERE})
        region = m.add_memory(START, 0x200000)
        fill_pages(m.vm, region)
        answers = {base: MmioAnswer(base) for base in (START - 0x1000, ELSEWHERE)}
        m.mmio.register(START - 0x1000, 0x400000, answers[START - 0x1000])
        m.mmio.register(ELSEWHERE, 0x400000, answers[ELSEWHERE])
        steps: list[int] = []

        class Mover:
            def read(self, offset: int, size: int) -> bytes:
                raise AssertionError("the guest only writes the step port")

            def write(self, offset: int, data: bytes) -> None:
                step = int.from_bytes(data, "little")
                steps.append(step)
                m.move_memory(region, placement[step])
                assert m.memory.find(placement[step]) is region

        port = m.payload.symbol("SLOTMOVE_PORT_STEP")
        m.pio.register(port, 4, Mover())
        result = m.run(timeout=30)
    assert result.ok, result
    assert steps == list(range(len(placement)))
    seen = {r.tag: r.value64 for r in result.reports}
    assert seen == {
        0: MAGIC + 1, 0x100: MMIO_VALUE,      # at START: page 1 at PROBE; nothing elsewhere
        1: MMIO_VALUE, 0x101: MAGIC + 0,      # moved away: PROBE is MMIO, page 0 elsewhere
        2: MAGIC + 1, 0x102: MMIO_VALUE,      # back
        3: MAGIC + 2, 0x103: MMIO_VALUE,      # one page down, over its old range
        4: MAGIC + 0, 0x104: MMIO_VALUE,      # one page up: page 0 is at PROBE now
    }
    assert answers[START - 0x1000].reads == [PROBE]
    assert answers[ELSEWHERE].reads == [ELSEWHERE] * 4


# -- a slot changed while a vCPU runs in another thread (guests/slotspin_user.S) ----------------

WATCHED = 0x40000000


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.mark.parametrize("change", ["move", "delete"])
def test_slot_changed_while_a_vcpu_spins_on_it(kvm, change):
    """The guest spins natively (CPL3) reading WATCHED while the host, from another thread,
    moves the region away or deletes it: the guest's next read is an MMIO exit the host
    answers, and the run loop goes on. Then the host moves it back (or adds memory there
    again) while the guest spins on MMIO reads, and the guest sees memory again and ends."""
    with Machine(kvm=kvm, serial=False) as m:
        m.load("slotspin_user", regs={"rdi": WATCHED, "rsi": MAGIC})
        counters = m.payload.symbol("spins")
        region = m.add_memory(WATCHED, 0x200000)
        fill_pages(m.vm, region)
        answer = MmioAnswer(WATCHED)
        m.mmio.register(WATCHED, 0x1000, answer)
        errors: list[BaseException] = []
        spins_then: list[int] = []     # phase-1 iterations once the change had returned

        def host() -> None:
            try:
                wait_for(lambda: m.memory.read_u64(counters) > 1000, "the guest to spin")
                if change == "move":
                    m.move_memory(region, 0x80000000)
                else:
                    m.vm.remove_memory(region)
                spins_then.append(m.memory.read_u64(counters))
                wait_for(lambda: len(answer.reads) >= 10, "MMIO reads of the gone slot")
                if change == "move":
                    m.move_memory(region, WATCHED)
                else:
                    again = m.add_memory(WATCHED, 0x1000)
                    m.memory.write_u64(WATCHED, MAGIC)
                    assert again.slot == 1
            except BaseException as err:  # reported by the main thread
                errors.append(err)
                m.stop("host thread failed")

        thread = threading.Thread(target=host)
        thread.start()
        try:
            result = m.run(timeout=60)
        finally:
            thread.join(30)
        spins, mmio_spins = m.memory.read_u64(counters), m.memory.read_u64(counters + 8)
    assert not errors, errors
    assert result.ok, result
    assert [(r.tag, r.value64) for r in result.reports] == [(1, MMIO_VALUE), (2, MAGIC)]
    assert spins > 1000 and mmio_spins >= 10
    # No stale mapping: once the ioctl returned, the guest finished at most the iteration
    # it was in (its read of the old memory, had one come later, would have looped again).
    assert spins - spins_then[0] <= 1, (spins, spins_then)
    # Every read of phase 2 but the last was MMIO (a read of the re-added page before the
    # host wrote it gives 0, from memory), and one more ended phase 1.
    assert set(answer.reads) == {WATCHED} and 10 <= len(answer.reads) <= mmio_spins
    assert result.exits["MmioExit"] == len(answer.reads)


# -- the kernel's rules: no memory, zero size, overlaps, the slot limit --------------------------

def test_run_with_no_memory_ends_cleanly(vm):
    """A vCPU of a VM without a single memslot: stock KVM reports an emulation failure
    (an internal-error exit, as the kernel's selftest expects), kvm_pvm refuses KVM_RUN with
    ENOSPC (docs/HOSTS.md). Either way the run ends, and the vCPU is still usable."""
    vcpu = vm.create_vcpu()
    try:
        ex = vcpu.run(timeout=5)
    except KvmError as err:
        assert (err.errno, err.ioctl) == (errno.ENOSPC, "KVM_RUN")
    else:
        assert isinstance(ex, (exits.InternalErrorExit, exits.ShutdownExit)), ex
    vm.add_memory(0, 0x10000)
    vm.memory.write(0x1000, code("hlt"))
    real_mode(vcpu)
    expect(vcpu, exits.HltExit)


def test_zero_size_and_overlapping_slots(vm, ioctl_spy):
    """Zero size and overlaps are ValueErrors before any ioctl; through the raw ioctl, KVM
    answers an overlap with EEXIST and deleting (size 0) a slot that does not exist with
    EINVAL."""
    region = vm.add_memory(0x100000, 0x10000)
    ioctl_spy.clear()
    with pytest.raises(ValueError, match="positive multiple"):
        vm.add_memory(0x200000, 0)
    for addr, size in ((0x100000, 0x10000), (0xFF000, 0x2000), (0x10F000, 0x1000),
                       (0x108000, 0x1000), (0, 0x200000)):
        with pytest.raises(ValueError, match="overlaps"):
            vm.add_memory(addr, size)
    assert ioctl_spy == []
    other = vm.add_memory(0x400000, 0x10000)
    for addr, size in ((0x100000, 0x10000), (0xFF000, 0x2000), (0x10F000, 0x1000),
                       (0, 0x200000)):
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(9, 0, addr, size, other.host_addr)
        assert info.value.errno == errno.EEXIST, (hex(addr), hex(size))
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(9, 0, 0x300000, 0, 0)
    assert info.value.errno == errno.EINVAL
    assert vm.memory.regions() == [region, other]


def test_as_many_slots_as_nr_memslots(vm):
    """KVM_CAP_NR_MEMSLOTS one-page regions (32764 on this project's hosts): all accepted;
    the next add_memory is a ValueError naming the cap, and the kernel itself refuses a slot
    number past the limit with EINVAL. The slot allocator and the address lookups stay fast
    at that size."""
    limit = vm.check_extension(Cap.NR_MEMSLOTS)
    assert limit > 0
    started = time.monotonic()
    regions = [vm.add_memory(i * 0x1000, 0x1000) for i in range(limit)]
    took = time.monotonic() - started
    assert [r.slot for r in regions[:3]] == [0, 1, 2] and regions[-1].slot == limit - 1
    with pytest.raises(ValueError, match="no free memslot.*NR_MEMSLOTS"):
        vm.add_memory(limit * 0x1000, 0x1000)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(limit, 0, limit * 0x1000, 0x1000, regions[0].host_addr)
    assert info.value.errno == errno.EINVAL
    # A freed slot comes back; lookups find regions by address among all of them.
    vm.remove_memory(regions[limit // 2])
    again = vm.add_memory(limit * 0x1000, 0x1000)
    assert again.slot == limit // 2
    assert vm.memory.find(limit * 0x1000) is again
    assert vm.memory.find((limit // 2) * 0x1000) is None
    vm.move_memory(regions[7], (limit + 1) * 0x1000)
    vm.memory.write_u64((limit + 1) * 0x1000, 7)
    assert vm.memory.read_u64((limit + 1) * 0x1000) == 7
    assert took < 120, f"{limit} slots took {took:.1f} s"


def test_slotmove_payloads_build():
    for name, mode in (("slotmove", "long64"), ("slotspin_user", "long64-user")):
        p = guests.build(name)
        assert p.mode == mode and p.entry == p.symbols["start"]
