# SPDX-License-Identifier: GPL-2.0-or-later
"""PvDma, the paravirtual DMA device: validation, per-page pinning (checked against VmLck in
/proc/self/status), release on unmap and at VM close, the host view of a mapping, and the
`pvdma` payload's session over the PIO transport (every host) and the MAP_GPA_RANGE hypercall
exit (stock KVM; ``pyvmm nested``)."""

from __future__ import annotations

import errno
import threading

import pytest

from pyvmm import Cap, Machine
from pyvmm.devices import HypercallDispatcher, HypercallError, Memory, PvDma
from pyvmm.devices import pins as pins_mod
from pyvmm.devices import pvdma as pvdma_mod
from pyvmm.devices.hypercall import (KVM_HC_MAP_GPA_RANGE, native_instruction,
                                     serve_hypercalls, to_signed)
from pyvmm.devices.pvdma import (KVM_MAP_GPA_RANGE_ENCRYPTED, PVDMA_MAGIC, PVDMA_PORT,
                                 default_transport, locked_pages)
from pyvmm.errors import GuestError
from pyvmm.exits import HypercallExit
from pyvmm.testing import hostinfo
from pyvmm.testing.plugin import CAP_SKIP_PROPERTY

ON_PVM = hostinfo.kvm_module() == "kvm_pvm"
PAGE = 4096
MB = 1 << 20
UNMAP = KVM_MAP_GPA_RANGE_ENCRYPTED

#: Tag -> the result the pvdma payload expects (and checks itself).
SESSION = {0x11: 0, 0x12: 0x414D446D6D767970, 0x13: 0, 0x14: 0, 0x21: -2, 0x22: -2,
           0x23: -14, 0x24: -22, 0x25: -22, 0x26: -22, 0x27: -22}


@pytest.fixture
def baseline():
    """VmLck before the test; the test's pins must come back to it."""
    return locked_pages()


@pytest.fixture
def ram_machine(kvm):
    with Machine(kvm=kvm) as m:
        m.add_memory(0, 2 * MB)
        yield m


def attach(m: Machine, transport: str | None = None, dispatcher=None, **kwargs) -> PvDma:
    """A PvDma on machine `m`, wired as a VMM does it: its register block on m's PIO bus, and
    for the hypercall transport m's HypercallExit routed to the dispatcher. transport None:
    the choice for this host."""
    why = "chosen by the caller"
    if transport is None:
        transport, why = default_transport(m.vm, hostinfo.kvm_module())
    dispatcher = dispatcher if dispatcher is not None else HypercallDispatcher()
    if transport == "hypercall":
        serve_hypercalls(m.exit_handlers, dispatcher)
    return PvDma(m.vm, m.pio, dispatcher, transport, mmio=m.mmio, transport_reason=why,
                 **kwargs)


def _code(fn, *args) -> int:
    try:
        fn(*args)
    except HypercallError as err:
        return -err.errno
    return 0


class DmaEngine:
    """A test device: a 32-bit write of a gpa makes it DMA a pattern there, through PvDma."""

    def __init__(self, dma: PvDma, nbytes: int) -> None:
        self.dma, self.nbytes = dma, nbytes
        self.done = self.refused = 0

    def read(self, offset, size):
        return bytes(size)

    def write(self, offset, data):
        gpa = int.from_bytes(data, "little")
        try:
            self.dma.dma_write(gpa, b"pyvmmDMA" + bytes(self.nbytes - 16) + b"dma-end!")
        except GuestError:
            self.refused += 1
            raise
        self.done += 1


def run_session(m: Machine, dma: PvDma, *, buffer: int = 0, timeout: float = 30):
    regs = dma.guest_regs()
    regs["r13"] = buffer
    p = m.load("pvdma", regs=regs)
    engine = DmaEngine(dma, p.symbol("PVDMA_ENGINE_BYTES"))
    m.pio.register(p.symbol("PVDMA_ENGINE_PORT"), 4, engine)
    result = m.run(timeout=timeout)
    return result, engine, p


def check_session(result, engine, dma, baseline):
    assert result.ok, result.summary()
    tags = {r.tag: to_signed(r.value64) for r in result.reports}
    assert tags.pop(0x10) == {"pio": 0, "hypercall": 1}[dma.transport]
    assert tags == SESSION
    # The engine wrote once while mapped, and was refused once after the unmap.
    assert (engine.done, engine.refused) == (1, 1)
    assert not dma.mappings and dma.pinned_pages == 0
    assert locked_pages() == baseline


# ------------------------------------------------------------------ the session, PIO transport

def test_pio_session(kvm, baseline):
    with Machine(kvm=kvm) as m:
        dma = attach(m, "pio")
        assert dma.transport == "pio"
        result, engine, _ = run_session(m, dma)
        check_session(result, engine, dma, baseline)
        assert "HypercallExit" not in result.exits
        assert dma.requests == 9             # every request of the session reached it
    assert locked_pages() == baseline


def test_pio_session_with_buffer_across_two_memslots(kvm, baseline):
    with Machine(kvm=kvm) as m:
        m.add_memory(0, 2 * MB)
        m.add_memory(2 * MB, 2 * MB)
        dma = attach(m, "pio")
        seen = []
        real_map = dma.map

        def spy(gpa, npages):
            mapping = real_map(gpa, npages)
            seen.append(len(mapping.pieces))
            return mapping

        dma.map = spy
        result, engine, _ = run_session(m, dma, buffer=2 * MB - PAGE)
        check_session(result, engine, dma, baseline)
        assert seen == [2]
        # (the guest zeroed the first quadword again for its after-unmap check)
        assert m.memory.read(2 * MB + PAGE - 8, 8) == b"dma-end!"


@pytest.mark.skipif(not ON_PVM, reason="the automatic choice on kvm_pvm")
def test_default_transport_on_kvm_pvm_is_pio(machine, monkeypatch):
    monkeypatch.delenv(pvdma_mod.TRANSPORT_ENV, raising=False)
    dma = attach(machine)
    assert dma.transport == "pio" and "kvm_pvm" in dma.transport_reason
    assert dma.read(pvdma_mod.REG_TRANSPORT, 4) == (0).to_bytes(4, "little")


def test_transport_override(vm, monkeypatch):
    monkeypatch.setenv(pvdma_mod.TRANSPORT_ENV, "pio")
    assert default_transport(vm, hostinfo.kvm_module())[0] == "pio"
    monkeypatch.setenv(pvdma_mod.TRANSPORT_ENV, "carrier-pigeon")
    with pytest.raises(ValueError):
        default_transport(vm, hostinfo.kvm_module())
    with pytest.raises(ValueError):
        PvDma(vm, None, None, "carrier-pigeon")


def test_register_block(ram_machine):
    m = ram_machine
    dma = attach(m, "pio")
    assert m.pio.find(PVDMA_PORT).device is dma
    assert int.from_bytes(dma.read(pvdma_mod.REG_MAGIC, 4), "little") == PVDMA_MAGIC
    for reg, value in ((0, 0x3000), (4, 0), (8, 2), (12, 0), (16, 0)):
        dma.write(reg, value.to_bytes(4, "little"))
    dma.write(pvdma_mod.REG_COMMAND, KVM_HC_MAP_GPA_RANGE.to_bytes(4, "little"))
    assert dma.read(pvdma_mod.REG_STATUS, 4) == (0).to_bytes(4, "little")
    assert dma.mappings[0].gpa == 0x3000 and dma.mappings[0].npages == 2
    dma.write(pvdma_mod.REG_COMMAND, (99).to_bytes(4, "little"))          # unknown number
    assert to_signed(int.from_bytes(dma.read(pvdma_mod.REG_STATUS, 4), "little"), 32) == -1000
    with pytest.raises(GuestError):
        dma.write(pvdma_mod.REG_COMMAND, b"\x0c")                          # not 32-bit
    with pytest.raises(GuestError):
        dma.write(pvdma_mod.REG_TRANSPORT, b"\x01\x00\x00\x00")           # read-only
    dma.close()
    assert m.pio.find(PVDMA_PORT) is None and dma.pinned_pages == 0


def test_guest_and_host_agree_on_the_register_block():
    from pyvmm import guests

    p = guests.build("pvdma")
    assert p.symbol("PVDMA_DEFAULT_PORT") == PVDMA_PORT
    assert p.symbol("PVDMA_MAGIC") == PVDMA_MAGIC
    assert p.symbol("PVDMA_REG_COMMAND") == pvdma_mod.REG_COMMAND
    assert p.symbol("PVDMA_REG_TRANSPORT") == pvdma_mod.REG_TRANSPORT
    assert p.symbol("PVDMA_REG_MAGIC") == pvdma_mod.REG_MAGIC
    engine = p.symbol("PVDMA_ENGINE_PORT")
    assert not PVDMA_PORT <= engine < PVDMA_PORT + pvdma_mod.PVDMA_LENGTH


def test_refuses_to_replace_a_foreign_hypercall_handler(ram_machine):
    def mine(exit, vcpu):
        return None

    ram_machine.exit_handlers[HypercallExit] = mine
    with pytest.raises(ValueError, match="already"):
        attach(ram_machine, "hypercall")
    assert ram_machine.exit_handlers[HypercallExit] is mine
    assert ram_machine.pio.find(PVDMA_PORT) is None        # nothing left behind


def test_shares_the_machines_dispatcher(ram_machine):
    m = ram_machine
    d = HypercallDispatcher()
    m.exit_handlers[HypercallExit] = d.handle
    dma = attach(m, "pio", d)
    assert dma.dispatcher is d and d.numbers == [KVM_HC_MAP_GPA_RANGE]
    dma.close()
    assert d.numbers == []


# -------------------------------------------------------------------------------- validation

def test_map_validates_the_range(ram_machine, baseline):
    m = ram_machine
    m.add_memory(4 * MB, MB)                          # a gap of 2 MiB before it
    m.add_memory(6 * MB, MB, readonly=True)
    m.mmio.register(8 * MB, PAGE, Memory(PAGE))       # an MMIO device (no memslot there)
    dma = attach(m, "pio")
    cases = {
        (0x1001, 1): -errno.EINVAL,                   # unaligned
        (0x1000, 0): -errno.EINVAL,                   # no pages
        (2**64 - PAGE, 2): -errno.EINVAL,             # wraps the 64-bit space
        (PAGE, 2**52): -errno.EINVAL,                 # wraps too
        (2 * MB - PAGE, 2): -errno.EFAULT,            # runs past the end of RAM
        (3 * MB, 1): -errno.EFAULT,                   # no memslot
        (5 * MB - PAGE, 2): -errno.EFAULT,            # from RAM into the gap
        (6 * MB, 1): -errno.EFAULT,                   # read-only slot
        (8 * MB, 1): -errno.EFAULT,                   # MMIO
        (2**40, 1): -errno.EFAULT,
    }
    for (gpa, npages), code in cases.items():
        assert dma.request(gpa, npages, 0) == code, (hex(gpa), npages)
    for attrs in (3, 0xF, 0x20, 1 << 31):             # page size 3+, reserved bits
        assert dma.request(PAGE, 1, attrs) == -errno.EINVAL
    for attrs in (0, 1, 2):                           # 4K, 2M, 1G hints are accepted
        assert dma.request(PAGE, 1, attrs) == 0
        assert dma.request(PAGE, 1, attrs | UNMAP) == 0
    assert not dma.mappings and dma.pinned_pages == 0 and locked_pages() == baseline


@pytest.mark.requires_cap(Cap.X86_SMM)
def test_map_refuses_smram(kvm):
    with Machine(kvm=kvm) as m:
        m.add_memory(0, 2 * MB)
        m.add_memory(0xA0000, 0x20000, address_space=1)       # SMRAM over the normal view
        dma = attach(m, "pio")
        assert dma.request(0xA0000, 1) == -errno.EFAULT
        assert dma.request(0x9F000, 2) == -errno.EFAULT
        assert dma.request(0x9F000, 1) == 0


def test_unmap_must_match_a_map(ram_machine):
    dma = attach(ram_machine, "pio")
    assert dma.request(0x10000, 4, UNMAP) == -errno.ENOENT            # never mapped
    assert dma.request(0x10000, 4) == 0
    assert dma.request(0x10000, 2, UNMAP) == -errno.ENOENT            # not what was mapped
    assert dma.request(0x11000, 3, UNMAP) == -errno.ENOENT
    assert dma.request(0x10000, 4, UNMAP) == 0
    assert dma.request(0x10000, 4, UNMAP) == -errno.ENOENT            # twice
    assert dma.dispatcher.error_count == 4


# ------------------------------------------------------------------------------------ pinning

def test_pins_are_counted_per_page(ram_machine, baseline):
    dma = attach(ram_machine, "pio")
    a = dma.map(0x20000, 8)                           # pages 0x20-0x27
    assert locked_pages() - baseline == 8 == dma.pinned_pages
    b = dma.map(0x24000, 8)                           # 0x24-0x2b: four pages shared
    assert locked_pages() - baseline == 12 == dma.pinned_pages
    c = dma.map(0x20000, 8)                           # the same range again
    assert locked_pages() - baseline == 12
    dma.unmap(0x20000, 8)                             # the most recent of the two
    assert c.active is False and a.active is True
    assert locked_pages() - baseline == 12            # `a` still holds 0x20-0x27
    dma.unmap(0x20000, 8)
    assert locked_pages() - baseline == 8             # only b's pages are left
    dma.unmap(0x24000, 8)
    assert not b.active
    assert locked_pages() == baseline and dma.pinned_pages == 0
    assert _code(dma.unmap, 0x24000, 8) == -errno.ENOENT


def test_mapping_across_memslots_pins_both(kvm, baseline):
    with Machine(kvm=kvm) as m:
        m.add_memory(0, MB)
        m.add_memory(MB, MB)
        dma = attach(m, "pio")
        mapping = dma.map(MB - 2 * PAGE, 4)
        assert [length for _, _, length in mapping.host_ranges] == [2 * PAGE, 2 * PAGE]
        assert locked_pages() - baseline == 4
        dma.unmap(MB - 2 * PAGE, 4)
        assert locked_pages() == baseline


def test_vm_close_releases_every_pin(kvm, baseline):
    m = Machine(kvm=kvm)
    m.add_memory(0, 2 * MB)
    dma = attach(m, "pio")
    mappings = [dma.map(0x100000, 16), dma.map(0x108000, 16), dma.map(0x40000, 1)]
    assert locked_pages() - baseline == 25
    m.close()
    assert locked_pages() == baseline
    assert dma.closed and dma.pinned_pages == 0 and not dma.mappings
    assert not any(mp.active for mp in mappings)
    with pytest.raises(GuestError):
        mappings[0].write(0, b"late")
    assert _code(dma.map, 0x1000, 1) == -errno.EIO


def test_pin_failure_is_enomem_and_leaves_nothing_pinned(ram_machine, baseline, monkeypatch):
    dma = attach(ram_machine, "pio")
    dma.map(0x1000, 1)
    real = pins_mod.mlock
    calls = []

    def flaky(addr, length):
        calls.append(addr)
        return errno.ENOMEM if len(calls) > 1 else real(addr, length)

    monkeypatch.setattr(pins_mod, "mlock", flaky)
    # Pages 0x0, [0x1000 already pinned], 0x2000-0x3fff: two runs to lock, the second fails.
    assert dma.request(0x0, 4) == -errno.ENOMEM
    assert len(calls) == 2
    assert locked_pages() - baseline == 1 and dma.pinned_pages == 1
    assert len(dma.mappings) == 1


def test_concurrent_map_unmap_keeps_counts_exact(ram_machine, baseline):
    dma = attach(ram_machine, "pio")
    errors = []

    def worker(i):
        try:
            for n in range(50):
                gpa = 0x80000 + ((i * 7 + n) % 16) * PAGE
                assert dma.request(gpa, 4) == 0
                assert dma.request(gpa, 4, UNMAP) == 0
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert dma.pinned_pages == 0 and locked_pages() == baseline


# ----------------------------------------------------------------------------- the host view

def test_host_view_of_a_mapping(ram_machine):
    m = ram_machine
    dma = attach(m, "pio")
    mapping = dma.map(0x30000, 2)
    view = mapping.view()
    view[0:5] = b"hello"
    assert m.memory.read(0x30000, 5) == b"hello"
    dma.dma_write(0x31FF8, b"tail-end")
    assert dma.dma_read(0x31FF8, 8) == b"tail-end" == bytes(view[-8:])
    assert mapping.host_ranges == [(0x30000, m.memory.find(0).host_addr + 0x30000, 2 * PAGE)]
    with pytest.raises(GuestError):
        dma.dma_write(0x31FFC, b"overflow")          # runs past the mapping
    with pytest.raises(GuestError):
        dma.dma_read(0x40000, 1)                      # never mapped
    dma.unmap(0x30000, 2)
    with pytest.raises(ValueError):
        view[0]                                       # released with the mapping
    with pytest.raises(GuestError):
        dma.dma_write(0x30000, b"x")


def test_multi_slot_mapping_has_one_view_per_slot(kvm):
    with Machine(kvm=kvm) as m:
        m.add_memory(0, MB)
        m.add_memory(MB, MB)
        dma = attach(m, "pio")
        mapping = dma.map(MB - PAGE, 2)
        with pytest.raises(ValueError, match="spans 2"):
            mapping.view()
        assert [len(v) for v in mapping.views()] == [PAGE, PAGE]
        mapping.write(PAGE - 4, b"acrossit")
        assert m.memory.read(MB - 4, 8) == b"acrossit"


# ------------------------------------------------------------- stock KVM: the hypercall exit

@pytest.fixture
def userspace_hypercalls(request, kvm):
    if ON_PVM:
        request.node.user_properties.append((CAP_SKIP_PROPERTY, ["EXIT_HYPERCALL"]))
        pytest.skip("pyvmm: missing KVM capability EXIT_HYPERCALL on kvm_pvm (reported, but "
                    "a CPL0 hypercall never reaches userspace; see docs/HOSTS.md)")
    return kvm


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL)
def test_hypercall_session(userspace_hypercalls, baseline, monkeypatch):
    kvm = userspace_hypercalls
    monkeypatch.delenv(pvdma_mod.TRANSPORT_ENV, raising=False)
    with Machine(kvm=kvm) as m:
        dma = attach(m)                                   # the automatic choice
        assert dma.transport == "hypercall", dma.transport_reason
        assert dma.guest_regs()["r12"] == (native_instruction(kvm) == "vmmcall")
        result, engine, _ = run_session(m, dma)
        check_session(result, engine, dma, baseline)
        # KVM answered the unaligned and the 0-page requests itself: 7 exits, not 9.
        assert result.exits["HypercallExit"] == 7 == dma.requests
    assert locked_pages() == baseline


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL)
def test_hypercall_mapping_released_at_vm_close(userspace_hypercalls, baseline):
    kvm = userspace_hypercalls
    m = Machine(kvm=kvm)
    try:
        dma = attach(m, "hypercall")
        p = m.load("pvdma", regs=dma.guest_regs())
        # No engine: the guest stops at its first DMA request, with the buffer mapped.
        result = m.run(timeout=30)
        assert (result.stop, result.status) == ("fail", 0x12), result.summary()
        assert result.exits["HypercallExit"] == 1
        assert [(mp.gpa, mp.npages) for mp in dma.mappings] == [(p.symbol("dma_buf"), 2)]
        assert locked_pages() - baseline == 2
    finally:
        m.close()
    assert locked_pages() == baseline and dma.pinned_pages == 0


def test_memory_with_live_mappings_cannot_be_removed(ram_machine, baseline):
    """Removing a region whose pages a mapping pins is refused (the pins would otherwise
    outlive the memory and mislead the next mapping at the same host address)."""
    m = ram_machine
    dma = attach(m, "pio")
    region = m.memory.find(0x100000)
    dma.map(0x100000, 2)
    with pytest.raises(ValueError, match="PV-DMA mapping"):
        m.vm.remove_memory(region)
    dma.unmap(0x100000, 2)
    m.vm.remove_memory(region)
    assert locked_pages() == baseline


# ------------------------------------------------------------------ bounded mapping table

def test_live_mappings_are_bounded_per_vm_and_refusals_counted(ram_machine, baseline):
    """A guest mapping one page over and over (issue: 186,866 maps grew RSS by 82 MiB) gets
    -ENOSPC once the VM holds max_mappings live mappings; each refusal is counted."""
    m = ram_machine
    dma = attach(m, "pio", max_mappings=64)
    for _ in range(64):
        assert dma.request(PAGE, 1) == 0
    # Through the register block, as the guest asks: the status says ENOSPC.
    for reg, value in ((0, PAGE), (4, 0), (8, 1), (12, 0), (16, 0)):
        dma.write(reg, value.to_bytes(4, "little"))
    for _ in range(10):
        dma.write(pvdma_mod.REG_COMMAND, KVM_HC_MAP_GPA_RANGE.to_bytes(4, "little"))
        status = to_signed(int.from_bytes(dma.read(pvdma_mod.REG_STATUS, 4), "little"), 32)
        assert status == -errno.ENOSPC
    assert dma.refused == 10 and len(dma.mappings) == 64
    assert dma.pinned_pages == 1 and locked_pages() - baseline == 1
    assert dma.request(PAGE, 1, UNMAP) == 0                 # room for one more
    assert dma.request(2 * PAGE, 1) == 0
    assert dma.request(3 * PAGE, 1) == -errno.ENOSPC and dma.refused == 11
    dma.release_all()
    assert locked_pages() == baseline


def test_the_default_bound_keeps_a_mapping_flood_small(ram_machine, baseline):
    import psutil

    from pyvmm.devices.limits import DEFAULT_MAX_DMA_MAPPINGS

    dma = attach(ram_machine, "pio")
    proc = psutil.Process()
    for _ in range(100):                                    # warm-up: allocator arenas
        dma.request(PAGE, 1)
    dma.release_all()
    rss = proc.memory_info().rss
    flood = 3 * DEFAULT_MAX_DMA_MAPPINGS
    codes = [dma.request(PAGE, 1) for _ in range(flood)]
    grown = proc.memory_info().rss - rss
    assert codes.count(0) == DEFAULT_MAX_DMA_MAPPINGS
    assert codes.count(-errno.ENOSPC) == dma.refused == flood - DEFAULT_MAX_DMA_MAPPINGS
    assert grown < 8 << 20, f"RSS grew by {grown >> 10} KiB"
    dma.release_all()
    assert locked_pages() == baseline


def test_max_mappings_must_be_positive(vm):
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="max_mappings"):
            PvDma(vm, None, None, "pio", max_mappings=bad)
