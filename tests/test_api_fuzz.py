# SPDX-License-Identifier: GPL-2.0-or-later
"""A stateful fuzzer of the public API (hypothesis' RuleBasedStateMachine) on the real
/dev/kvm: it creates and closes Kvm/Vm/Vcpu/Machine handles, adds and removes memory,
registers doorbells (with callbacks that count, raise, remove their own doorbell, stop or
close their machine), irqfds and raw ioeventfds, runs vCPUs and machines with timeouts, kicks,
and stops and closes machines from other threads while they run, in any order, on open and
on closed handles alike.

After every step: no exception but the documented ones (ValueError, ClosedError, KvmError,
RuntimeError for a second run), no step longer than STEP_BOUND seconds (a hang past
HANG_BOUND dumps every thread's stack and ends the process, so CI cannot wait forever); at the
end of each example, open fds and threads are back to where they started.

CI runs a short budget. A long run: PYVMM_API_FUZZ_EXAMPLES=500 PYVMM_API_FUZZ_STEPS=60
(PYVMM_API_FUZZ_RANDOM=1 for a new random seed each run instead of the fixed one).
"""

from __future__ import annotations

import faulthandler
import gc
import os
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant,
                                 precondition, rule, run_state_machine_as_test)

from pyvmm import IoEventAddress, Kvm, KvmError, Machine, guests
from pyvmm.devices import PvDma
from resources import open_fds, settle

EXAMPLES = int(os.environ.get("PYVMM_API_FUZZ_EXAMPLES", "30"))
STEPS = int(os.environ.get("PYVMM_API_FUZZ_STEPS", "30"))
RANDOM = os.environ.get("PYVMM_API_FUZZ_RANDOM") == "1"
STEP_BOUND = 15.0   # seconds a step may take (the longest timeout a step uses is 0.5 s)
HANG_BOUND = 120.0  # past this a step is hung: dump the stacks and end the process

#: What the API may raise at a caller who asks for something impossible.
EXPECTED = (ValueError, KvmError, RuntimeError)
PORT, OTHER, MMIO = 0x510, 0x600, 0xD000_0000
PAYLOADS = {name: guests.build(name) for name in ("hello", "doorbell")}
#: Tally of the documented errors seen over the whole session (printed at the end).
SEEN: Counter = Counter()


class Step:
    """One bounded step: documented errors are tallied, anything else fails the example."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self):
        self.start = time.monotonic()
        faulthandler.dump_traceback_later(HANG_BOUND, exit=True)
        return self

    def __exit__(self, kind, err, tb):
        faulthandler.cancel_dump_traceback_later()
        elapsed = time.monotonic() - self.start
        assert elapsed < STEP_BOUND, f"{self.what} took {elapsed:.1f} s"
        if err is not None and isinstance(err, EXPECTED):
            SEEN[f"{self.what}: {type(err).__name__}"] += 1
            return True
        return False


def callback(kind: str, machine: Machine):
    """A doorbell callback of some behaviour; it holds the machine only where it must."""
    if kind == "count":
        return lambda bell, n: None
    if kind == "raise":
        def broken(bell, n):
            raise RuntimeError("device bug")
        return broken
    if kind == "oneshot":
        return lambda bell, n: bell.remove()
    if kind == "stop":
        return lambda bell, n: machine.stop("done")
    if kind == "close":
        return lambda bell, n: machine.close()
    raise AssertionError(kind)


class ApiFuzz(RuleBasedStateMachine):
    vms = Bundle("vms")
    regions = Bundle("regions")
    vcpus = Bundle("vcpus")
    machines = Bundle("machines")
    doorbells = Bundle("doorbells")
    interrupts = Bundle("interrupts")

    def __init__(self) -> None:
        super().__init__()
        gc.collect()
        self.baseline = (open_fds(), threading.active_count())
        self.kvm = Kvm()
        self.owned_vms: list = []
        self.owned_machines: list[Machine] = []
        self.eventfds: list[int] = []
        self.threads: list[threading.Thread] = []

    # -- raw handles ------------------------------------------------------------------------

    @precondition(lambda self: len(self.owned_vms) < 3)
    @rule(target=vms)
    def new_vm(self):
        vm = self.kvm.create_vm()
        self.owned_vms.append(vm)
        return vm

    @rule(vm=vms)
    def close_vm(self, vm):
        with Step("vm.close"):
            vm.close()

    @rule(target=regions, vm=vms, page=st.integers(0, 600), npages=st.sampled_from([1, 16, 512]),
          readonly=st.booleans())
    def add_memory(self, vm, page, npages, readonly):
        with Step("vm.add_memory"):
            return (vm, vm.add_memory(page * 4096, npages * 4096, readonly=readonly))
        return (vm, None)

    @rule(entry=consumes(regions))
    def remove_memory(self, entry):
        vm, region = entry
        if region is not None:
            with Step("vm.remove_memory"):
                vm.remove_memory(region)

    @rule(target=vcpus, vm=vms, vcpu_id=st.none() | st.integers(0, 4))
    def new_vcpu(self, vm, vcpu_id):
        with Step("vm.create_vcpu"):
            return vm.create_vcpu(vcpu_id)
        return None

    @rule(vcpu=vcpus, timeout=st.sampled_from([0.0, 0.01, 0.1]))
    def vcpu_run(self, vcpu, timeout):
        if vcpu is not None:
            with Step("vcpu.run"):
                vcpu.run(timeout=timeout)

    @rule(vcpu=vcpus, delay=st.sampled_from([0.0, 0.005, 0.05]))
    def vcpu_run_kicked_from_a_thread(self, vcpu, delay):
        if vcpu is None:
            return
        kicker = threading.Thread(target=lambda: (time.sleep(delay), vcpu.kick()))
        kicker.start()
        with Step("vcpu.run kicked"):
            vcpu.run(timeout=0.5)
        kicker.join(STEP_BOUND)
        assert not kicker.is_alive()

    @rule(vcpu=vcpus, from_thread=st.booleans())
    def vcpu_state(self, vcpu, from_thread):
        """Registers read and written back, here or from another thread (while the vCPU may
        be in a run another rule started)."""
        if vcpu is None:
            return

        def body():
            with Step("vcpu state"):
                vcpu.set_regs(vcpu.get_regs())
                vcpu.set_sregs(vcpu.get_sregs())

        if from_thread:
            t = threading.Thread(target=body)
            t.start()
            self.threads.append(t)
        else:
            body()

    @rule(vm=vms, gpa=st.integers(0, 1 << 22), length=st.integers(0, 9000), write=st.booleans())
    def memory_access(self, vm, gpa, length, write):
        with Step("vm.memory"):
            if write:
                vm.memory.write(gpa, bytes(length))
            else:
                assert len(vm.memory.read(gpa, length)) == length

    @rule(vcpu=vcpus)
    def vcpu_close(self, vcpu):
        if vcpu is not None:
            with Step("vcpu.close"):
                vcpu.close()
            vcpu.kick()  # harmless after close

    @rule(vm=vms, space=st.sampled_from(["pio", "mmio"]), length=st.sampled_from([0, 1, 2, 4, 8]),
          datamatch=st.none() | st.integers(0, 255), unregister=st.booleans())
    def raw_ioevent(self, vm, space, length, datamatch, unregister):
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.eventfds.append(fd)
        address = IoEventAddress.pio(PORT) if space == "pio" else IoEventAddress.mmio(MMIO)
        with Step("vm.register_ioevent"):
            vm.register_ioevent(fd, address, length=length, datamatch=datamatch)
            if unregister:
                vm.unregister_ioevent(fd, address, length=length, datamatch=datamatch)

    # -- machines ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.owned_machines) < 3)
    @rule(target=machines, vcpus=st.integers(1, 2), irqchip=st.booleans(),
          payload=st.sampled_from([None, "hello", "doorbell"]))
    def new_machine(self, vcpus, irqchip, payload):
        m = Machine(kvm=self.kvm, vcpus=vcpus, irqchip=irqchip)
        self.owned_machines.append(m)
        if payload == "doorbell":
            m.load(PAYLOADS[payload], regs={"rcx": 50, "rdi": 0, "r10": 1, "rsi": 1,
                                            "r8": PORT, "r9": MMIO})
        elif payload is not None:
            m.load(PAYLOADS[payload])
        return m

    @rule(kind=st.sampled_from(["count", "raise", "oneshot", "stop", "close"]))
    def machine_dropped_without_close(self, kind):
        """Issue 13.8: a machine nobody closes must still release everything (checked by the
        fd and thread counts at the end of the example)."""
        m = Machine(kvm=self.kvm, irqchip=True, serial=False)
        m.interrupt(5)
        m.doorbell(IoEventAddress.pio(PORT), length=1, callback=callback(kind, m))
        del m

    @rule(m=machines, timeout=st.sampled_from([0.0, 0.05, 0.3]))
    def machine_run(self, m, timeout):
        with Step("machine.run"):
            result = m.run(timeout=timeout)
            assert result.stop != "error" or result.error is not None

    @rule(m=machines, action=st.sampled_from(["stop", "close"]),
          delay=st.sampled_from([0.0, 0.01, 0.1]))
    def machine_run_in_a_thread(self, m, action, delay):
        def body():
            try:
                m.run(timeout=0.5)
            except EXPECTED:
                pass

        runner = threading.Thread(target=body, name="fuzz-run")
        runner.start()
        self.threads.append(runner)
        time.sleep(delay)
        with Step(f"machine.{action} from another thread"):
            m.stop() if action == "stop" else m.close()

    @rule(m=machines)
    def machine_close(self, m):
        with Step("machine.close"):
            m.close()

    @rule(target=doorbells, m=machines, space=st.sampled_from(["pio", "mmio"]),
          port=st.sampled_from([PORT, OTHER]), length=st.sampled_from([0, 1, 2, 4]),
          kind=st.sampled_from([None, "count", "raise", "oneshot", "stop", "close"]))
    def machine_doorbell(self, m, space, port, length, kind):
        address = IoEventAddress.pio(port) if space == "pio" else IoEventAddress.mmio(MMIO)
        with Step("machine.doorbell"):
            return m.doorbell(address, length=length,
                              callback=None if kind is None else callback(kind, m))
        return None

    @rule(bell=doorbells, action=st.sampled_from(["remove", "count", "flush", "wait", "move"]))
    def doorbell_use(self, bell, action):
        if bell is None:
            return
        with Step(f"doorbell.{action}"):
            if action == "remove":
                bell.remove()
            elif action == "count":
                assert bell.count >= 0
            elif action == "flush":
                bell.flush(timeout=STEP_BOUND / 2)
            elif action == "wait":
                bell.wait(timeout=0.01)
            else:
                bell.move(IoEventAddress.pio(0x700), length=1)

    @rule(m=machines, requests=st.lists(st.tuples(st.integers(0, 600),
                                                   st.sampled_from([0, 1, 2, 513]),
                                                   st.sampled_from([0, 16, 3, 1 << 31])),
                                         max_size=8))
    def pvdma(self, m, requests):
        """A PV-DMA device on the machine and a burst of guest requests (map, unmap, bad)."""
        with Step("pvdma"):
            dma = PvDma(m.vm, m.pio, None, "pio", mmio=m.mmio, max_mappings=4)
            try:
                for page, npages, attrs in requests:
                    assert dma.request(page * 4096, npages, attrs) <= 0
                assert len(dma.mappings) <= 4
            finally:
                dma.close()
            assert dma.pinned_pages == 0 and not dma.mappings

    @rule(target=interrupts, m=machines,
          gsi=st.sampled_from([0, 5, 23, 24, 4095, 4096, 2**31, -1, True]))
    def machine_interrupt(self, m, gsi):
        with Step("machine.interrupt"):
            return m.interrupt(gsi)
        return None

    @rule(target=interrupts, m=machines, vector=st.sampled_from([0, 15, 16, 48, 255, 256]))
    def machine_msi_interrupt(self, m, vector):
        with Step("machine.msi_interrupt"):
            return m.msi_interrupt(vector)
        return None

    @rule(irq=interrupts, close=st.booleans())
    def interrupt_use(self, irq, close):
        if irq is None:
            return
        with Step("interrupt.close" if close else "interrupt.trigger"):
            irq.close() if close else irq.trigger()

    # -- after every step -------------------------------------------------------------------

    @invariant()
    def no_background_thread_outlives_its_bound(self):
        for t in self.threads:
            t.join(STEP_BOUND)
            assert not t.is_alive(), f"{t.name} still running after {STEP_BOUND} s"
        self.threads.clear()

    def teardown(self) -> None:
        with Step("teardown"):
            for t in self.threads:
                t.join(STEP_BOUND)
                assert not t.is_alive()
            for m in self.owned_machines:
                m.close()
            for vm in self.owned_vms:
                vm.close()
            for fd in self.eventfds:
                os.close(fd)
            self.kvm.close()
        fds, threads = self.baseline
        assert settle(lambda: threading.active_count() == threads), threading.enumerate()
        assert settle(lambda: open_fds() == fds), os.listdir("/proc/self/fd")


ApiFuzz.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not RANDOM,
    database=None, suppress_health_check=list(HealthCheck))


def test_public_api_state_machine(kvm):
    """Any sequence of public calls: documented errors only, bounded steps, and every fd and
    thread back at the end."""
    with Machine(kvm=kvm) as m:  # starts pyvmm's one watchdog thread, which stays
        m.load(PAYLOADS["hello"])
        assert m.run(timeout=10).ok
    gc.collect()
    fds, threads = open_fds(), threading.active_count()
    started = time.monotonic()
    run_state_machine_as_test(ApiFuzz, settings=ApiFuzz.TestCase.settings)
    assert settle(lambda: threading.active_count() == threads), threading.enumerate()
    assert settle(lambda: open_fds() == fds), os.listdir("/proc/self/fd")
    print(f"\napi fuzz: {EXAMPLES} examples x {STEPS} steps in "
          f"{time.monotonic() - started:.1f} s; documented errors seen: {dict(SEEN)}")


@pytest.fixture(autouse=True)
def _no_stray_dump():
    yield
    faulthandler.cancel_dump_traceback_later()
