# SPDX-License-Identifier: GPL-2.0-or-later
"""SMP guests: one thread per vCPU, each running its own vCPU fd.

The `smp` payloads (guests/smp.inc) have N vCPUs add 1..K into shared memory with `lock`
instructions, each ringing its own doorbell (one port, one ioeventfd per vCPU told apart by
datamatch = vCPU id). The host checks the exact total and every vCPU's ring count. APs are
started both ways: by the host (registers plus MP state RUNNABLE) and by the guest's BSP with
INIT-SIPI-SIPI through its local APIC. Also: stop and timeout end every vCPU thread, the first
failure is reported with its vCPU id, and the VM's lifetime follows its fds.

CPL0 guest code is emulated on kvm_pvm (about 1 us an instruction), so the CPL0 sums stay in
the thousands; smp_user runs at CPL3, natively.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import threading
import time

import pytest

from pyvmm import Cap, IoEventAddress, Machine
from pyvmm.testing.hostinfo import kvm_module
from pyvmm import ioctls as io
from pyvmm._ffi import ffi, libc
from pyvmm.errors import ClosedError
from pyvmm.exits import IntrExit
from pyvmm.machine import AP_STACK_SIZE, MpState
from pyvmm.vcpu import KICK_SIGNAL

PORT = 0x600
TAG_SHARE, TAG_TOTAL = 0x51, 0x52
STACK_TOP = 0x80000


def smp_machine(kvm, n: int, *, irqchip: bool = False) -> tuple[Machine, list]:
    m = Machine(kvm=kvm, vcpus=n, irqchip=irqchip, serial=False)
    bells = [m.doorbell(IoEventAddress.pio(PORT), length=4, datamatch=i) for i in range(n)]
    return m, bells


def params(n: int, k: int, *, sipi: bool = False) -> dict[str, int]:
    return {"rdi": n, "rsi": k, "r8": PORT, "r9": 1 if sipi else 0}


def terms_of(vcpu_id: int, n: int, k: int) -> list[int]:
    return list(range(vcpu_id + 1, k + 1, n))


def check_sum(m: Machine, bells: list, result, n: int, k: int) -> None:
    assert result.ok, result
    assert result.stop == "done" and result.error is None
    shares = {r.rcx: r for r in result.reports if r.tag == TAG_SHARE}
    totals = [r for r in result.reports if r.tag == TAG_TOTAL]
    assert sorted(shares) == list(range(n))
    for vcpu_id, report in shares.items():
        mine = terms_of(vcpu_id, n, k)
        assert report.value64 == sum(mine)
        assert report.rdx == len(mine)
        # every vCPU rang only its own doorbell, once per term it added
        assert bells[vcpu_id].count == len(mine)
        # and ran on a stack of its own
        assert report.rsp == STACK_TOP - vcpu_id * AP_STACK_SIZE
    assert len(totals) == 1
    assert totals[0].value64 == k * (k + 1) // 2
    assert totals[0].rcx == k and totals[0].rdx == n
    # the shared memory agrees, read by the host
    total = int.from_bytes(m.memory.read(m.payload.symbol("smp_total"), 8), "little")
    assert total == k * (k + 1) // 2
    # the per-thread exit counts add up exactly: a report and a done per vCPU, and the total
    assert result.exits["IoExit"] == 2 * n + 1
    assert sum(sum(c.values()) for c in result.exits_per_vcpu.values()) == 2 * n + 1
    assert sorted(result.exits_per_vcpu) == list(range(n))


def vcpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pyvmm-vcpu")]


def kvm_fds() -> set[tuple[int, str]]:
    """The KVM fds this process holds, as (fd, what). A Python mmap of a vCPU's kvm_run page
    holds a duplicate of the vCPU fd until the page's last view (an exit's data) is gone and
    the mmap is collected, so machines of earlier tests may still be letting theirs go:
    tests check that nothing *new* stays open (`<=` a baseline), never an exact count."""
    gc.collect()
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("anon_inode:kvm-"):
            out.add((int(fd), target))
    return out


def new_kvm_fds(baseline: set) -> set:
    return kvm_fds() - baseline


# -- the sum, host-started APs ----------------------------------------------------------------

@pytest.mark.parametrize("n,irqchip", [(1, False), (2, False), (2, True), (4, True), (8, False)],
                         ids=["1vcpu", "2vcpus", "2vcpus-irqchip", "4vcpus-irqchip", "8vcpus"])
def test_sum_with_host_started_vcpus(kvm, n, irqchip):
    k = 1000
    m, bells = smp_machine(kvm, n, irqchip=irqchip)
    with m:
        m.load("smp", regs=params(n, k), start_aps=True, vcpu_regs=lambda i: {"r10": i})
        for vcpu in m.vcpus:
            assert vcpu.get_mp_state() == MpState.RUNNABLE
        result = m.run(timeout=60)
        check_sum(m, bells, result, n, k)
    assert not vcpu_threads()


def test_more_vcpus_than_host_cpus_and_than_kvm_recommends(kvm):
    # KVM_CAP_NR_VCPUS is a recommendation (the host's CPU count); KVM creates many more.
    n = max(8, 2 * (os.cpu_count() or 1), 2 * kvm.check_extension(Cap.NR_VCPUS))
    assert n <= kvm.check_extension(Cap.MAX_VCPUS)
    k = 3 * n
    m, bells = smp_machine(kvm, n)
    with m:
        m.load("smp", regs=params(n, k), start_aps=True, vcpu_regs={i: {"r10": i}
                                                                    for i in range(n)})
        check_sum(m, bells, m.run(timeout=60), n, k)


def test_user_mode_sum_runs_natively(kvm):
    # CPL3: the lock-prefixed adds really race on the host's cores; 4 vCPUs share 2 CPUs here.
    for n, k in ((2, 200_000), (4, 40_000)):
        m, bells = smp_machine(kvm, n, irqchip=n == 4)
        with m:
            m.load("smp_user", regs=params(n, k), start_aps=True,
                   vcpu_regs=lambda i: {"r10": i})
            result = m.run(timeout=60)
            check_sum(m, bells, result, n, k)
            # native: of the AP's loop only the OUTs (the rings) went through the
            # instruction emulator, not the lock-prefixed adds
            if kvm_module() == "kvm_pvm":  # (stock KVM emulates none of them)
                rings = len(terms_of(1, n, k))
                assert rings <= m.vcpus[1].stats()["insn_emulation"] < rings + 100


def test_runs_again_after_a_reload(kvm):
    m, bells = smp_machine(kvm, 2)
    with m:
        for k in (10, 21):
            # load() rewrites the image, and with it the shared variables
            m.load("smp", regs=params(2, k), start_aps=True, vcpu_regs=lambda i: {"r10": i})
            before = [b.count for b in bells]
            result = m.run(timeout=30)
            assert result.ok, result
            assert result.reports[-1].value64 == k * (k + 1) // 2
            assert [b.count - c for b, c in zip(bells, before, strict=True)] == [
                len(terms_of(i, 2, k)) for i in range(2)]


# -- the guest starts its APs ------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4])
def test_bsp_starts_aps_with_init_sipi_sipi(kvm, n):
    k = 600
    m, bells = smp_machine(kvm, n, irqchip=True)
    with m:
        payload = m.load("smp", regs=params(n, k, sipi=True))
        assert m.vcpus[0].get_mp_state() == MpState.RUNNABLE
        for ap in m.vcpus[1:]:
            assert ap.get_mp_state() == MpState.UNINITIALIZED
            assert ap.cpuid_set  # to switch to long mode itself, an AP needs LM in CPUID
        result = m.run(timeout=60)
        check_sum(m, bells, result, n, k)
        for ap in m.vcpus[1:]:
            assert ap.get_mp_state() == MpState.RUNNABLE
            sregs = ap.get_sregs()
            assert sregs.cs.selector == 0x18 and sregs.efer & 0x400  # long mode, CPL0
            assert payload.symbol("ap_start16") % 0x1000 == 0


def test_woken_ap_returns_eagain_once_then_runs(kvm):
    """The raw kernel behaviour that Vcpu.run() hides: after INIT-SIPI, the AP's KVM_RUN
    returns -1/EAGAIN without running; the AP then sits at the SIPI vector in real mode."""
    n, k = 2, 40
    m, bells = smp_machine(kvm, n, irqchip=True)
    with m:
        payload = m.load("smp", regs=params(n, k, sipi=True))
        bsp, ap = m.vcpus
        # The BSP sends INIT-SIPI-SIPI, then spins at the start barrier for the AP.
        ex = bsp.run(timeout=0.5)
        assert isinstance(ex, IntrExit) and ex.timed_out
        # (No get_mp_state() here: KVM_GET_MP_STATE itself takes pending INIT/SIPI.)

        seen = {}

        def raw_run():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {KICK_SIGNAL})
            rc = libc.ioctl(ap.fileno(), io.KVM_RUN, ffi.cast("unsigned long", 0))
            seen["rc"], seen["errno"] = rc, ffi.errno

        thread = threading.Thread(target=raw_run)
        thread.start()
        thread.join(5)
        if thread.is_alive():  # never leave it blocked: interrupt KVM_RUN, then fail
            signal.pthread_kill(thread.ident, KICK_SIGNAL)
            thread.join()
            pytest.fail("the AP's KVM_RUN blocked although INIT and SIPI were sent")
        assert seen == {"rc": -1, "errno": errno.EAGAIN}
        assert ap.get_mp_state() == MpState.RUNNABLE
        sregs, regs = ap.get_sregs(), ap.get_regs()
        vector = payload.symbol("ap_start16") >> 12
        assert (sregs.cs.selector, sregs.cs.base, regs.rip) == (vector << 8, vector << 12, 0)
        assert not sregs.cr0 & 1  # real mode
        # Both go on from there: the machine finishes the sum.
        check_sum(m, bells, m.run(timeout=30), n, k)


# -- stopping ----------------------------------------------------------------------------------

SPIN = """# pyvmm: mode=long64-user load=0x1000 entry=start
.include "pyvmm.inc"
    .code64
    .globl start
start:
    cmpq %r11, %r10                 # the vCPU whose id is R11 fails, after a short while
    jne spin
    movl $3000000, %ecx
1:  decl %ecx
    jnz 1b
    movq %r10, %rsi
    FAIL $0x77
spin:
    cmpq %r12, %r10                 # the vCPU whose id is R12 writes to port 0x700
    jne 2f
    movw $0x700, %dx
    outb %al, %dx
2:  pause
    jmp 2b
"""


@pytest.fixture
def spin_source(tmp_path):
    src = tmp_path / "smp_spin.S"
    src.write_text(SPIN)
    return str(src)


def spin_regs(i: int) -> dict[str, int]:
    return {"r10": i, "r11": 99, "r12": 99}


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_stop_and_timeout_end_every_vcpu_thread(make_machine, spin_source, how):
    m = make_machine(vcpus=4, irqchip=True)
    m.load(spin_source, start_aps=True, vcpu_regs=spin_regs)
    if how == "stop":
        threading.Timer(0.3, m.stop).start()
    started = time.monotonic()
    result = m.run(timeout=0.3 if how == "timeout" else 30)
    assert time.monotonic() - started < 5
    assert result.stop == ("stopped" if how == "stop" else how)
    assert result.error is None
    assert not vcpu_threads()
    assert not any(v.running for v in m.vcpus)


def test_stop_reaches_aps_still_waiting_for_sipi(make_machine, spin_source):
    # vCPU 0 spins; the APs were never started and block inside KVM_RUN (UNINITIALIZED):
    # the kick gets them out too.
    m = make_machine(vcpus=3, irqchip=True)
    m.load(spin_source, vcpu_regs=spin_regs)
    for ap in m.vcpus[1:]:
        assert ap.get_mp_state() == MpState.UNINITIALIZED
    result = m.run(timeout=0.3)
    assert result.stop == "timeout"
    assert not vcpu_threads()
    # the machine is usable again: the APs can still be started by the host
    for ap in m.vcpus[1:]:
        m.start_vcpu(ap.id, regs=spin_regs(ap.id))
    assert m.run(timeout=0.3).stop == "timeout"
    assert all(c.get("IntrExit") for c in m.run(timeout=0.2).exits_per_vcpu.values())


def test_first_failure_is_reported_with_its_vcpu_id(make_machine, spin_source):
    m = make_machine(vcpus=4)
    m.load(spin_source, start_aps=True, vcpu_regs=lambda i: {**spin_regs(i), "r11": 2})
    result = m.run(timeout=30)
    assert result.stop == "fail", result
    assert result.vcpu == 2 and result.status == 0x77
    assert result.event.regs["rsi"] == 2
    assert not vcpu_threads()


def test_device_error_is_reported_with_its_vcpu_id(make_machine, spin_source):
    class Broken:
        def read(self, offset, size):
            raise ZeroDivisionError("model bug")

        def write(self, offset, data):
            raise ZeroDivisionError("model bug")

    m = make_machine(vcpus=3)
    m.pio.register(0x700, 1, Broken())
    m.load(spin_source, start_aps=True, vcpu_regs=lambda i: {**spin_regs(i), "r12": 1})
    result = m.run(timeout=30)
    assert result.stop == "error"
    assert result.vcpu == 1
    assert isinstance(result.error, ZeroDivisionError)


def test_machine_close_while_vcpu_threads_spin(kvm, spin_source):
    baseline = kvm_fds()
    m = Machine(kvm=kvm, vcpus=4, irqchip=True)
    m.doorbell(IoEventAddress.pio(PORT), length=4, datamatch=0)
    m.load(spin_source, start_aps=True, vcpu_regs=spin_regs)
    out = {}
    runner = threading.Thread(target=lambda: out.setdefault("result", m.run(timeout=60)))
    runner.start()
    deadline = time.monotonic() + 5
    while sum(v.running for v in m.vcpus) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(v.running for v in m.vcpus) == 4
    m.close()
    runner.join(10)
    assert not runner.is_alive()
    assert out["result"].stop in ("closed", "stopped")
    assert out["result"].error is None
    assert not vcpu_threads()
    assert all(v.closed for v in m.vcpus)
    gc.collect()
    assert not new_kvm_fds(baseline)


# -- VM lifetime -------------------------------------------------------------------------------

def _real_mode_out(vcpu, port: int, memory) -> None:
    """Point `vcpu` at a two-instruction real-mode guest at 0x1000: out %al, $port; hlt
    (written to `memory` unless it is None: already there)."""
    vcpu.complete_io()  # finish a previous OUT first: KVM may move RIP past it on next run
    if memory is not None:
        memory.write(0x1000 + 0x10 * vcpu.id, bytes([0xE6, port, 0xF4]))
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = 0x1000 + 0x10 * vcpu.id, 0x2
    vcpu.set_regs(regs)


def test_vcpus_closed_first_vm_stays_usable(kvm):
    baseline = kvm_fds()
    vm = kvm.create_vm()
    vm.add_memory(0, 0x10000)
    vcpus = [vm.create_vcpu() for _ in range(3)]
    assert (vm.fileno(), "anon_inode:kvm-vm") in new_kvm_fds(baseline)
    for order in ([1, 0, 2],):
        for i in order:
            vcpus[i].close()
            assert vcpus[i].closed
            # the VM and the vCPUs left work: each remaining one runs a guest
            for other in vcpus:
                if not other.closed:
                    _real_mode_out(other, 0x40 + other.id, vm.memory)
                    # (no exit object kept: its data view would keep the kvm_run page
                    # mapped, and the mapping holds the vCPU file open)
                    assert other.run(timeout=5).port == 0x40 + other.id
    # a new vCPU in the same VM (KVM never reuses a closed vCPU's id)
    extra = vm.create_vcpu()
    assert extra.id == 3
    _real_mode_out(extra, 0x43, vm.memory)
    assert extra.run(timeout=5).port == 0x43
    vm.close()
    assert extra.closed
    gc.collect()
    assert not new_kvm_fds(baseline)


def test_vm_closed_first_closes_its_vcpus(kvm):
    baseline = kvm_fds()
    vm = kvm.create_vm()
    vm.add_memory(0, 0x10000)
    vcpus = [vm.create_vcpu() for _ in range(2)]
    vm.close()
    for vcpu in vcpus:
        assert vcpu.closed
        vcpu.close()  # idempotent
        with pytest.raises(ClosedError):
            vcpu.run()
    gc.collect()
    assert not new_kvm_fds(baseline)


def test_a_vcpu_keeps_its_vm_alive(kvm):
    baseline = kvm_fds()

    def make():
        vm = kvm.create_vm()
        vm.add_memory(0, 0x10000)
        vcpu = vm.create_vcpu()
        vm.memory.write(0x1000, bytes([0xE6, 0x41, 0xF4]))
        return vcpu

    vcpu = make()  # no reference to the Vm is left outside the vCPU
    gc.collect()
    _real_mode_out(vcpu, 0x41, None)
    assert vcpu.run().port == 0x41  # (a run timeout would hold the vCPU until it expires)
    del vcpu
    gc.collect()
    assert not new_kvm_fds(baseline)


def test_kernel_keeps_the_vm_while_a_vcpu_fd_is_open(kvm):
    """At the fd level: a duplicate of a vCPU fd outlives the Vm's own fds and still answers
    vCPU ioctls (the kernel's VM lives until its last fd closes); closing it releases all."""
    baseline = kvm_fds()
    vm = kvm.create_vm()
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu()
    regs = vcpu.get_regs()
    regs.rbx = 0x5150
    vcpu.set_regs(regs)
    dup = os.dup(vcpu.fileno())
    try:
        vm.close()
        assert new_kvm_fds(baseline) == {(dup, "anon_inode:kvm-vcpu:0")}
        out = ffi.new("struct kvm_regs *")
        io.ioctl(dup, io.KVM_GET_REGS, out, "vcpu")
        assert out.rbx == 0x5150
        state = ffi.new("struct kvm_mp_state *")
        io.ioctl(dup, io.KVM_GET_MP_STATE, state, "vcpu")
        assert state.mp_state == MpState.RUNNABLE
    finally:
        os.close(dup)
    assert not new_kvm_fds(baseline)
