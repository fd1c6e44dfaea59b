# SPDX-License-Identifier: GPL-2.0-or-later
"""vCPU state: XSAVE, XCRs, debug registers, TSC frequency, kvmclock control, nested state,
and `save_state()`/`load_state()`, checked the way the KVM selftests' state_test does: a guest
is stopped mid-computation, its state (and memory) moved into a fresh VM, and it must finish
there with the result an uninterrupted run gives, in every mode."""

from __future__ import annotations

import errno
import pickle

import pytest

from pyvmm import Cap, KvmError, MissingCapability, exits, guests
from pyvmm.guests import ucall
from pyvmm.testing.hostinfo import kvm_module
from pyvmm.state import DebugRegs, VcpuState, Xsave

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms

MASK64 = (1 << 64) - 1


def lcg_expected(steps: int) -> dict[int, int]:
    """The host's model of state.inc's work without SSE: {tag: value}."""
    a, b, r8, r9 = 0, 1, 6364136223846793005, 1442695040888963407
    for _ in range(steps):
        b = (b * r8 + r9) & MASK64
        a ^= b
        a = ((a << 7) | (a >> 57)) & MASK64
    return {1: a, 2: b}


def _fresh_vm(kvm, payload, memory: bytes | None = None):
    vm = kvm.create_vm()
    vm.add_memory(0, payload.memory_size)
    if memory is not None:
        vm.memory.write(0, memory)
    return vm


def _move(kvm, payload, vm, vcpu, through_pickle: bool = True):
    """The vCPU's state and all memory into a fresh VM; the old one is closed."""
    state = vcpu.save_state()
    if through_pickle:
        state = pickle.loads(pickle.dumps(state))
    vm2 = _fresh_vm(kvm, payload, vm.memory.read(0, payload.memory_size))
    vcpu2 = vm2.create_vcpu()
    vcpu2.load_state(state)
    vm.close()
    return vm2, vcpu2


def _run(kvm, name, *, regs=None, hop_every_exit=False, slice_s=None, limit=100000):
    """Run payload `name` on one vCPU, moving it to a fresh VM at every exit and/or whenever
    a time slice of `slice_s` ends. Returns (reports {tag: value64}, console, moves)."""
    payload = guests.build(name)
    vm = _fresh_vm(kvm, payload)
    payload.load(vm)
    vcpu = vm.create_vcpu()
    payload.setup_vcpu(vcpu, regs=regs)
    reports, console, moves = {}, b"", 0
    try:
        for _ in range(limit):
            ex = vcpu.run(timeout=slice_s if slice_s is not None else 30)
            if isinstance(ex, exits.IntrExit):
                assert slice_s is not None, "the guest ran for 30 s"
                vm, vcpu = _move(kvm, payload, vm, vcpu)
                moves += 1
                continue
            event = ucall.decode(ex, vcpu)
            if isinstance(event, ucall.ConsoleOutput):
                console += event.data
            elif isinstance(event, ucall.Report):
                reports[event.tag] = event.value64
            elif event is not None:
                assert event == ucall.Done(0), event
                return reports, console, moves
            else:
                pytest.fail(f"unexpected exit {ex!r}")
            if hop_every_exit:
                vm, vcpu = _move(kvm, payload, vm, vcpu, through_pickle=moves % 2 == 0)
                moves += 1
        pytest.fail("the guest did not finish")
    finally:
        vm.close()


# -- the accessors -------------------------------------------------------------------------------

def test_xsave_round_trip_and_legacy_ioctl(vm):
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu()
    x = vcpu.get_xsave()
    assert len(x.data) == max(4096, vm.check_extension(Cap.XSAVE2))
    assert x.fcw == 0x37F and x.mxcsr == 0x1F80          # the architectural reset values
    x.set_xmm(5, 0x0123456789ABCDEF_FEDCBA9876543210)
    x.mxcsr = 0x1F80 | 0x6000                              # round toward zero
    vcpu.set_xsave(x)
    back = vcpu.get_xsave()
    assert back.xmm(5) == 0x0123456789ABCDEF_FEDCBA9876543210 and back.mxcsr == 0x7F80
    legacy = vcpu.get_xsave(xsave2=False)                  # KVM_GET_XSAVE: the first 4 KiB
    assert legacy.data[:4096] == back.data[:4096]
    assert pickle.loads(pickle.dumps(back)) == back
    with pytest.raises(ValueError):
        Xsave(b"\0" * 100)
    with pytest.raises(ValueError):
        x.xmm(16)
    with pytest.raises(TypeError):
        vcpu.set_xsave(b"\0" * 4096)


def test_xcrs(vm, kvm):
    vcpu = vm.create_vcpu()
    vcpu.set_supported_cpuid()
    xcrs = vcpu.get_xcrs()
    assert xcrs.values()[0] & 1                              # x87 is always enabled
    leaf_d = next(e for e in kvm.supported_cpuid() if e.function == 0xD and e.index == 0)
    want = 3 if leaf_d.eax & 2 else 1                        # x87 | SSE where offered
    xcrs.xcrs[0].value = want
    vcpu.set_xcrs(xcrs)
    assert vcpu.get_xcrs().values()[0] == want
    xcrs.xcrs[0].value = 2                                    # SSE without x87: invalid
    with pytest.raises(KvmError) as err:
        vcpu.set_xcrs(xcrs)
    assert err.value.errno == errno.EINVAL
    xcrs.nr_xcrs = 17
    with pytest.raises(ValueError):
        vcpu.set_xcrs(xcrs)


def test_debugregs(vm):
    vcpu = vm.create_vcpu()
    regs = vcpu.get_debugregs()
    assert regs.dr7 == 0x400 and regs.dr6 == 0xFFFF0FF0      # reset values
    regs.db[0], regs.db[3], regs.dr7 = 0x1000, 0xDEAD000, 0x401
    vcpu.set_debugregs(regs)
    back = vcpu.get_debugregs()
    assert (back.db[0], back.db[3], back.dr7) == (0x1000, 0xDEAD000, 0x401)
    assert pickle.loads(pickle.dumps(back)) == back
    bad = DebugRegs()
    bad.flags = 1
    with pytest.raises(ValueError):
        vcpu.set_debugregs(bad)
    regs.dr7 = 1 << 40                                       # upper half of DR7: reserved
    with pytest.raises(KvmError) as err:
        vcpu.set_debugregs(regs)
    assert err.value.errno == errno.EINVAL


def test_tsc_khz(vm):
    vcpu = vm.create_vcpu()
    khz = vcpu.get_tsc_khz()
    assert 100_000 < khz < 10_000_000
    vcpu.set_tsc_khz(khz)                                   # its own rate: always accepted
    for bad in (0, -1, 1 << 32, 1.5):
        with pytest.raises(ValueError):
            vcpu.set_tsc_khz(bad)
    # Neither kvm_pvm nor kvm_amd under QEMU TCG offers TSC scaling, so here the other rate
    # is refused naming the capability; on a host with TSC_CONTROL it must take effect.
    if vm.check_extension(Cap.TSC_CONTROL):
        vcpu.set_tsc_khz(khz // 2)
        assert abs(vcpu.get_tsc_khz() - khz // 2) <= 1
    else:
        with pytest.raises(MissingCapability) as err:
            vcpu.set_tsc_khz(khz // 2)
        assert "TSC_CONTROL" in str(err.value)


def test_kvmclock_ctrl_needs_a_guest_kvmclock(vm):
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu()
    vcpu.set_supported_cpuid()
    with pytest.raises(KvmError) as err:                     # the guest enabled no kvmclock
        vcpu.kvmclock_ctrl()
    assert err.value.errno == errno.EINVAL
    vcpu.set_msrs({0x4B564D01: 0x8000 | 1})                  # MSR_KVM_SYSTEM_TIME_NEW, enabled
    vcpu.kvmclock_ctrl()


def test_nested_state_in_saved_state_where_the_host_has_it(vm):
    """Where the host has no nested state (kvm_pvm), the accessors say which capability is
    missing and a saved state has none; where it has (stock KVM), the state carries it."""
    vcpu = vm.create_vcpu()
    vcpu.set_supported_cpuid()
    if vm.check_extension(Cap.NESTED_STATE):
        assert vcpu.save_state(complete_io=False).nested == vcpu.get_nested_state()
        return
    with pytest.raises(MissingCapability) as err:
        vcpu.get_nested_state()
    assert "NESTED_STATE" in str(err.value)
    assert vcpu.save_state(complete_io=False).nested is None


@pytest.mark.requires_cap(Cap.NESTED_STATE)
def test_nested_state_round_trip(vm):
    vcpu = vm.create_vcpu()
    vcpu.set_supported_cpuid()
    data = vcpu.get_nested_state()
    assert len(data) >= 128
    vcpu.set_nested_state(data)
    with pytest.raises(ValueError):
        vcpu.set_nested_state(data[:100])
    state = vcpu.save_state(complete_io=False)
    assert state.nested == data


# -- VcpuState -------------------------------------------------------------------------------

def test_vcpu_state_is_complete_and_picklable(vm, kvm):
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu()
    vcpu.set_supported_cpuid()
    state = vcpu.save_state(complete_io=False)
    assert state.vcpu_id == 0 and state.regs.rip == 0xFFF0
    assert state.xsave is not None and state.xcrs is not None
    assert state.lapic is None                               # no in-kernel irqchip
    assert state.cpuid and state.tsc_khz
    # The MSRs of the save list this vCPU can read, IA32_TSC among them.
    assert 0x10 in state.msrs
    assert set(state.msrs) <= set(kvm.msr_index_list()) | set(kvm.feature_msr_indices())
    again = pickle.loads(pickle.dumps(state))
    assert again == state and again.regs.rip == 0xFFF0
    assert VcpuState.decode(state.encode()) == state
    with pytest.raises(ValueError):
        VcpuState.decode({"vcpu_id": 0})
    with pytest.raises(TypeError):
        vcpu.load_state({"regs": 1})


def test_loaded_state_reads_back_the_same(vm, kvm):
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu()
    vcpu.set_supported_cpuid()
    regs = vcpu.get_regs()
    regs.rax, regs.r15, regs.rip = 0x1111, 0xF15, 0x1234
    vcpu.set_regs(regs)
    dr = vcpu.get_debugregs()
    dr.db[1] = 0x4000
    vcpu.set_debugregs(dr)
    vcpu.set_msrs({0xC0000102: 0x77770000})                  # KERNEL_GS_BASE
    state = vcpu.save_state(complete_io=False)
    # MSRs that do not move by themselves: not IA32_TSC, not Hyper-V's VP_RUNTIME (the
    # calling thread's run time, which moves whether the vCPU runs or not) nor its reference
    # counter; others seen to move between two reads are left out too.
    moving = {0x10, 0x40000010, 0x40000020}
    stable = {k for k, v in vcpu.save_state(complete_io=False).msrs.items()
              if state.msrs[k] == v and k not in moving}
    with kvm.create_vm() as vm2:
        target = vm2.create_vcpu()
        target.load_state(state)
        assert target.get_regs() == state.regs
        sregs = target.get_sregs()
        if kvm.is_amd:                                       # see vcpu_state._tr_for_host
            sregs.tr.type |= 2
        assert sregs == state.sregs
        assert target.get_debugregs().db[1] == 0x4000
        assert target.get_msrs([0xC0000102])[0xC0000102] == 0x77770000
        assert target.get_xsave() == state.xsave
        back = target.save_state(complete_io=False)
        assert {k: back.msrs[k] for k in stable} == {k: state.msrs[k] for k in stable}
        assert len(stable) > len(state.msrs) // 2


def test_state_needs_irqchip_on_both_sides(kvm):
    with kvm.create_vm() as src, kvm.create_vm() as dst:
        src.create_irqchip()
        state = src.create_vcpu().save_state(complete_io=False)
        assert state.lapic is not None
        with pytest.raises(ValueError, match="irqchip"):
            dst.create_vcpu().load_state(state)


# -- state_test: stopped anywhere, moved, same result ------------------------------------------

def test_moved_at_every_exit_through_every_mode(kvm):
    """modes.S climbs real16 -> prot32 -> long64 -> CPL3 by itself; moved to a new VM at
    every exit, it reports what an unmoved run reports."""
    straight, console, _ = _run(kvm, "modes")
    moved, console2, moves = _run(kvm, "modes", hop_every_exit=True)
    assert moved == straight and console2 == console
    assert moves > 20
    assert console.startswith(b"real16 prot32 long64 user3")


def test_moved_mid_loop_at_cpl0(kvm):
    # Emulated one instruction at a time on kvm_pvm (3000 steps: about 30 ms); elsewhere
    # CPL0 code runs at full speed and needs more steps to be caught mid-loop.
    steps = 3000 if kvm_module() == "kvm_pvm" else 300_000
    result, _, moves = _run(kvm, "state", regs={"rcx": steps}, slice_s=0.002)
    assert result == lcg_expected(steps)
    assert moves >= 1


def test_moved_mid_loop_at_cpl3_with_sse(kvm):
    """Natively running CPL3 code with live XMM registers, stopped by timeouts wherever it
    is: XSAVE state must move with it."""
    steps = 40_000_000
    straight, _, _ = _run(kvm, "state_user", regs={"rcx": steps})
    moved, _, moves = _run(kvm, "state_user", regs={"rcx": steps}, slice_s=0.01)
    assert moved == straight and set(moved) == {1, 2, 3, 4}
    assert moves >= 1
    small, _, _ = _run(kvm, "state_user", regs={"rcx": 1000})
    assert {k: small[k] for k in (1, 2)} == lcg_expected(1000)    # the model agrees
