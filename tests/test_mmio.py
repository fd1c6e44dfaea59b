# SPDX-License-Identifier: GPL-2.0-or-later
"""The `mmio` payload: 1/2/4/8-byte stores and loads to unbacked guest-physical memory in long
mode, and a store to a read-only memslot (an MMIO write exit; the memory is unchanged)."""

from __future__ import annotations

from pyvmm import exits, guests

LOAD_VALUES = {1: 0xA5, 2: 0xBEEF, 4: 0xDEADBEEF, 8: 0x1122334455667788}
RO_PATTERN = bytes(range(0x40, 0x50))


class MmioDevice:
    def __init__(self, base):
        self.base = base
        self.log = []

    def __call__(self, ex, vcpu):
        assert isinstance(ex, exits.MmioExit), ex
        if not ex.is_write:
            assert self.base <= ex.address < self.base + 0x1000
            ex.data[:] = LOAD_VALUES[ex.length].to_bytes(8, "little")[:len(ex.data)]
        self.log.append((ex.address, ex.length, ex.is_write, bytes(ex.data)))


def test_mmio_payload(kvm):
    p = guests.build("mmio")
    base, ro = p.symbol("MMIO_BASE"), p.symbol("RO_BASE")
    assert (base, ro) == (0xD0000000, 0x200000)
    dev = MmioDevice(base)
    with kvm.create_vm() as vm:
        vcpu = p.prepare(vm, cpuid=kvm.supported_cpuid())
        vm.add_memory(ro, 0x1000, readonly=True)
        vm.memory.write(ro, RO_PATTERN)  # the host may write what the guest may not
        r = guests.run_loop(vcpu, guests.GuestResult(p.name), timeout=10, handler=dev)
        ro_after = vm.memory.read(ro, len(RO_PATTERN))
    assert r.ok, str(r)

    # stores: address, width and little-endian data as the guest wrote them
    assert dev.log[:4] == [
        (base + 0, 1, True, b"\x12"),
        (base + 2, 2, True, (0x3456).to_bytes(2, "little")),
        (base + 4, 4, True, (0x789ABCDE).to_bytes(4, "little")),
        (base + 8, 8, True, (0x0123456789ABCDEF).to_bytes(8, "little")),
    ]
    # loads: the host's data reached the guest, which reported it back
    assert [(a, n, w) for a, n, w, _ in dev.log[4:8]] == [
        (base + 16, 1, False), (base + 18, 2, False), (base + 20, 4, False),
        (base + 24, 8, False)]
    assert [(rep.tag, rep.value64) for rep in r.reports[:4]] == [
        (n, LOAD_VALUES[n]) for n in (1, 2, 4, 8)]

    # read-only slot: the load completes in the guest (no exit), the store exits as an MMIO
    # write with the guest's data, the memory stays as the host wrote it
    ro_value = int.from_bytes(RO_PATTERN[:4], "little")
    assert dev.log[8:] == [(ro, 4, True, (0x0BADC0DE).to_bytes(4, "little"))]
    assert [(rep.tag, rep.value64) for rep in r.reports[4:]] == [(0x10, ro_value),
                                                                (0x11, ro_value)]
    assert ro_after == RO_PATTERN
    assert r.exits == {"MmioExit": 9, "IoExit": len(r.events)}


def test_mmio_without_readonly_slot_still_exits(kvm):
    """Without the read-only slot, RO_BASE is just unbacked: its load exits too."""
    dev_log = []

    def handler(ex, vcpu):
        if not ex.is_write:
            ex.data[:] = bytes(len(ex.data))
        dev_log.append((ex.address, ex.is_write))

    r = guests.run("mmio", kvm=kvm, handler=handler)
    assert r.ok, str(r)
    assert dev_log[-3:] == [(0x200000, False), (0x200000, True), (0x200000, False)]
