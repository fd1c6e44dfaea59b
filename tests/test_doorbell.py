"""ioeventfd doorbells on the real /dev/kvm: exact ring counts with no userspace exits, the
bus seeing what a doorbell does not match, removal and moving while the guest rings."""

from __future__ import annotations

import errno
import gc
import itertools
import os
import threading
import time
import weakref

import pytest

from pyvmm import IoEventAddress, KvmError, Machine
from pyvmm.devices import Counter

PORT = 0x510
MMIO = 0xD0000000
RINGS = 300


def ring_regs(space: str, width: int, rings: int, value: int = 0x5A) -> dict[str, int]:
    return {"rcx": rings, "rdi": 1 if space == "mmio" else 0, "r10": width, "rsi": value,
            "r8": PORT, "r9": MMIO}


def address(space: str) -> IoEventAddress:
    return IoEventAddress.mmio(MMIO) if space == "mmio" else IoEventAddress.pio(PORT)


def attach_counter(m: Machine, space: str) -> Counter:
    counter = Counter()
    (m.mmio.register(MMIO, 8, counter) if space == "mmio" else m.pio.register(PORT, 4, counter))
    return counter


COMBOS = [(space, width, match)
          for space, widths in (("pio", (1, 2, 4)), ("mmio", (1, 2, 4, 8)))
          for width, match in itertools.product(widths, ("wildcard", "datamatch", "anylength"))]


@pytest.mark.parametrize("space,width,match", COMBOS,
                         ids=[f"{s}-{w}-{m}" for s, w, m in COMBOS])
def test_every_ring_counted_without_userspace_exits(kvm, space, width, match):
    value = 0x5A
    with Machine(kvm=kvm, serial=False) as m:
        counter = attach_counter(m, space)
        length = 0 if match == "anylength" else width
        bell = m.doorbell(address(space), length=length,
                          datamatch=value if match == "datamatch" else None)
        m.load("doorbell", regs=ring_regs(space, width, RINGS, value))
        before = m.vcpus[0].stats()["mmio_exits"]
        result = m.run(timeout=30)
        assert result.ok, result
        assert bell.count == RINGS
        assert counter.count == 0
        # Only the guest's REPORT and DONE came back from run() ...
        assert sum(result.exits.values()) == 2
        # ... and for MMIO the kernel's count of MMIO exits to userspace agrees. (There is no
        # such stat for PIO: stock KVM's io_exits counts every PIO VM exit, ioeventfd ones
        # included, and kvm_pvm's stays 0 because PIO goes through its emulator.)
        if space == "mmio":
            assert m.vcpus[0].stats()["mmio_exits"] - before == 0


def test_userspace_mmio_rings_move_the_mmio_exits_stat(kvm):
    """The control for the stats check above: without a doorbell, each ring is counted."""
    with Machine(kvm=kvm, serial=False) as m:
        counter = attach_counter(m, "mmio")
        m.load("doorbell", regs=ring_regs("mmio", 4, RINGS))
        before = m.vcpus[0].stats()["mmio_exits"]
        assert m.run(timeout=30).ok
        assert counter.count == RINGS
        assert m.vcpus[0].stats()["mmio_exits"] - before == RINGS


@pytest.mark.parametrize("space", ["pio", "mmio"])
def test_non_matching_writes_reach_the_bus(kvm, space):
    with Machine(kvm=kvm, serial=False) as m:
        counter = attach_counter(m, space)
        bell = m.doorbell(address(space), length=4, datamatch=0x1111)
        m.load("doorbell", regs=ring_regs(space, 4, RINGS, value=0x2222))
        result = m.run(timeout=30)
        assert result.ok, result
        assert bell.count == 0
        assert counter.count == RINGS
        assert counter.last == (0x2222).to_bytes(4, "little")
        assert result.exits["IoExit" if space == "pio" else "MmioExit"] >= RINGS


@pytest.mark.parametrize("space", ["pio", "mmio"])
def test_other_length_reaches_the_bus(kvm, space):
    with Machine(kvm=kvm, serial=False) as m:
        counter = attach_counter(m, space)
        bell = m.doorbell(address(space), length=2)
        m.load("doorbell", regs=ring_regs(space, 1, 50))
        assert m.run(timeout=30).ok
        assert (bell.count, counter.count) == (0, 50)


def test_removed_doorbell_sends_rings_to_the_bus(kvm):
    with Machine(kvm=kvm, serial=False) as m:
        counter = attach_counter(m, "pio")
        bell = m.doorbell(address("pio"), length=1)
        bell.remove()
        assert bell.closed
        m.load("doorbell", regs=ring_regs("pio", 1, 100))
        assert m.run(timeout=30).ok
        assert counter.count == 100


def test_remove_while_the_guest_rings_loses_nothing(kvm):
    """The doorbell goes away mid-loop: every ring is counted once, by the doorbell before the
    deassign or by the bus after it."""
    rings = 20000
    with Machine(kvm=kvm, serial=False) as m:
        counter = attach_counter(m, "pio")
        bell = m.doorbell(address("pio"), length=1)
        m.load("doorbell", regs=ring_regs("pio", 1, rings))

        def remove_midway():
            assert bell.wait(2000, timeout=30)
            bell.remove()

        remover = threading.Thread(target=remove_midway)
        remover.start()
        result = m.run(timeout=60)
        remover.join()
        assert result.ok, result
        assert bell.closed
        assert bell.count >= 2000
        assert counter.count > 0, "the guest finished before the doorbell was removed"
        assert bell.count + counter.count == rings


def test_move_while_the_guest_rings_loses_nothing(kvm):
    rings = 20000
    with Machine(kvm=kvm, serial=False) as m:
        counter = attach_counter(m, "pio")
        bell = m.doorbell(IoEventAddress.pio(PORT), length=1)
        m.load("doorbell", regs=ring_regs("pio", 1, rings))
        moved = []

        def move_midway():
            assert bell.wait(2000, timeout=30)
            before = bell.count
            bell.move(IoEventAddress.pio(0x600))
            moved.append(before)

        mover = threading.Thread(target=move_midway)
        mover.start()
        result = m.run(timeout=60)
        mover.join()
        assert result.ok, result
        assert bell.address == IoEventAddress.pio(0x600)
        assert counter.count > 0
        assert bell.count + counter.count == rings
        assert bell.count >= moved[0]


def test_million_rings_from_cpl3_are_all_counted(kvm):
    rings = 1_000_000
    with Machine(kvm=kvm, serial=False) as m:
        bell = m.doorbell(address("pio"), length=4)
        m.load("doorbell_user", regs=ring_regs("pio", 4, rings))
        result = m.run(timeout=120)
        assert result.ok, result
        assert bell.count == rings
        assert sum(result.exits.values()) == 2


def test_callback_errors_do_not_stop_the_worker(kvm):
    seen = []

    def flaky(bell, n):
        seen.append(n)
        raise RuntimeError("device bug")

    with Machine(kvm=kvm, serial=False) as m:
        bell = m.doorbell(address("pio"), length=1, callback=flaky)
        got = []
        good = m.doorbell(IoEventAddress.pio(0x600), length=1,
                          callback=lambda bell, n: got.append(n))
        m.load("doorbell", regs=ring_regs("pio", 1, 500))
        result = m.run(timeout=30)
        assert result.ok, result
        assert bell.count == 500
        assert sum(seen) == 500  # every ring reached the callback despite the raises
        assert m.worker.running
        assert m.worker.errors and isinstance(m.worker.errors[0][1], RuntimeError)
        assert isinstance(result.error, RuntimeError)
        # The worker still serves other doorbells afterwards.
        m.load("doorbell", regs={**ring_regs("pio", 1, 7), "r8": 0x600})
        assert m.run(timeout=30).ok
        assert good.wait(7, timeout=5) and good.count == 7
        assert sum(got) == 7


def test_wait_blocks_until_the_count(kvm):
    with Machine(kvm=kvm, serial=False) as m:
        bell = m.doorbell(address("pio"), length=1)
        assert bell.wait(1, timeout=0.05) is False
        m.load("doorbell", regs=ring_regs("pio", 1, 10))
        threading.Thread(target=m.run, kwargs={"timeout": 30}).start()
        assert bell.wait(10, timeout=30)
        assert bell.count == 10


def test_registration_errors_are_clear(kvm):
    with Machine(kvm=kvm, serial=False) as m:
        m.doorbell(address("pio"), length=2)
        with pytest.raises(KvmError) as info:
            m.doorbell(address("pio"), length=2)
        assert info.value.errno == errno.EEXIST
        assert "already registered" in str(info.value)
        with pytest.raises(ValueError, match="8 bytes can never match"):
            m.doorbell(address("pio"), length=8)
        with pytest.raises(ValueError, match="length 3"):
            m.doorbell(address("mmio"), length=3)
        with pytest.raises(ValueError, match="datamatch needs a length"):
            m.doorbell(address("mmio"), length=0, datamatch=1)
        with pytest.raises(ValueError, match="does not fit"):
            m.doorbell(address("mmio"), length=1, datamatch=0x100)
        with pytest.raises(KvmError) as info:
            m.vm.unregister_ioevent(m.doorbells[0].fileno(), address("pio"), length=4)
        assert info.value.errno == errno.ENOENT
        # A failed registration leaves no doorbell and no eventfd behind.
        assert len(m.doorbells) == 1


def test_a_callback_error_in_the_result_does_not_keep_the_machine_alive(kvm):
    def kvm_fds() -> set[str]:
        return {fd for fd in os.listdir("/proc/self/fd")
                if "kvm-" in os.path.realpath(f"/proc/self/fd/{fd}")}

    def broken(bell, n):
        raise RuntimeError("device bug")

    gc.collect()
    before, threads = kvm_fds(), threading.active_count()
    m = Machine(kvm=kvm, serial=False)
    m.doorbell(address("pio"), length=1, callback=broken)
    m.load("doorbell", regs=ring_regs("pio", 1, 3))
    result = m.run(timeout=30)
    vm = weakref.ref(m.vm)
    del m
    gc.collect()
    assert vm() is None or vm().closed
    assert kvm_fds() <= before
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= threads   # the doorbell worker is gone
    assert isinstance(result.error, RuntimeError) and str(result.error) == "device bug"
    assert result.error.__traceback__ is None
    assert any("broken" in note for note in result.error.__notes__)  # where it was raised


def test_a_callback_that_never_returns_does_not_hold_run_forever(kvm):
    release = threading.Event()
    with Machine(kvm=kvm, serial=False) as m:
        m.doorbell(address("pio"), length=1, callback=lambda bell, n: release.wait(60))
        m.flush_timeout = 0.3
        m.load("doorbell", regs=ring_regs("pio", 1, 1))
        results = []
        runner = threading.Thread(target=lambda: results.append(m.run(timeout=30)))
        runner.start()
        try:
            runner.join(20)
            assert not runner.is_alive(), "run() still waits for the stuck callback"
        finally:
            release.set()
            runner.join()
        assert results[0].stop == "done" and results[0].callbacks_pending
        assert "callback was still running" in results[0].detail
        assert not m.run(timeout=30).callbacks_pending   # released: the next run flushes
