# SPDX-License-Identifier: GPL-2.0-or-later
"""Hypercalls: the dispatcher, the binding's hypercall and quirk switches, VM close hooks, and
the `hypercall` payload.

Userspace hypercalls need stock KVM: on kvm_pvm (this project's hosts) a CPL0 VMCALL never
returns from KVM_RUN, so there the tests check that the run's timeout ends it cleanly, and the
tests that need real hypercall exits are skipped as a missing EXIT_HYPERCALL (kvm_pvm reports
the capability but never delivers the exit) and run in ``pyvmm nested``::

    python -m pyvmm.testing.nested -- python -m pytest -q -m stock_kvm tests/test_hypercall.py
"""

from __future__ import annotations

import pytest

from pyvmm import Cap, Machine, exits
from pyvmm.devices import HypercallDispatcher, HypercallError
from pyvmm.devices.hypercall import (KVM_ENOSYS, KVM_HC_MAP_GPA_RANGE,
                                     KVM_X86_QUIRK_FIX_HYPERCALL_INSN, VMCALL, VMMCALL,
                                     native_instruction, to_signed, to_u64)
from pyvmm.errors import GuestError, MissingCapability
from pyvmm.testing import hostinfo
from pyvmm.testing.plugin import CAP_SKIP_PROPERTY

ON_PVM = hostinfo.kvm_module() == "kvm_pvm"
INSNS = {"vmcall": (0, VMCALL), "vmmcall": (1, VMMCALL)}


@pytest.fixture
def userspace_hypercalls(request, kvm):
    """Skip (as a missing EXIT_HYPERCALL, so `pyvmm nested --check-skips` follows it) where
    KVM reports the capability but cannot deliver the exit: kvm_pvm."""
    if ON_PVM:
        request.node.user_properties.append((CAP_SKIP_PROPERTY, ["EXIT_HYPERCALL"]))
        pytest.skip("pyvmm: missing KVM capability EXIT_HYPERCALL on kvm_pvm (reported, but "
                    "a CPL0 hypercall never reaches userspace; see docs/HOSTS.md)")
    return kvm


def _wrong(name: str) -> str:
    return "vmcall" if name == "vmmcall" else "vmmcall"


# ------------------------------------------------- dispatcher logic (its exits: stock KVM below)

def test_dispatcher_runs_the_handler():
    d = HypercallDispatcher()
    seen = []
    d.register(12, lambda call: seen.append(call) or 0x1234)
    assert d.call(12, (1, 2, 3, 0, 0, 0), vcpu="cpu0") == 0x1234
    call = seen[0]
    assert (call.nr, call.args[:3], call.longmode, call.vcpu) == (12, (1, 2, 3), True, "cpu0")


def test_dispatcher_unknown_number_is_enosys():
    d = HypercallDispatcher()
    assert d.call(99, ()) == -KVM_ENOSYS == -1000
    assert to_signed(to_u64(-KVM_ENOSYS)) == -1000
    assert d.unknown == 1


@pytest.mark.parametrize(("error", "code"), [
    (HypercallError(2), -2),
    (GuestError("bad arguments"), -22),
    (ValueError("bad"), -22),
    (MemoryError(), -12),
    (RuntimeError("host bug"), -5),
    (ZeroDivisionError(), -5),
])
def test_dispatcher_handler_exception_becomes_error_code(error, code):
    d = HypercallDispatcher()

    def broken(call):
        raise error

    d.register(12, broken)
    assert d.call(12, ()) == code           # never raises
    assert d.error_count == 1 and d.errors[0][1] is error


def test_dispatcher_registration_rules():
    d = HypercallDispatcher()
    d.register(12, lambda call: 0)
    with pytest.raises(ValueError, match="already"):
        d.register(12, lambda call: 0)
    with pytest.raises(TypeError):
        d.register(13, "not callable")
    assert d.numbers == [12]
    d.unregister(12)
    with pytest.raises(ValueError):
        d.unregister(12)
    assert d.call(12, ()) == -KVM_ENOSYS


def test_dispatcher_none_is_success_and_errors_are_bounded():
    d = HypercallDispatcher()
    d.register(1, lambda call: None)
    d.register(2, lambda call: 1 / 0)
    assert d.call(1, ()) == 0
    for _ in range(100):
        assert d.call(2, ()) == -5
    assert d.error_count == 100 and len(d.errors) == 16


def test_hypercall_exit_ret_writes_kvm_run(vm):
    vcpu = vm.create_vcpu()
    ex = exits.HypercallExit(vcpu.kvm_run, 12, (0x1000, 1, 0, 0, 0, 0), 1)
    HypercallDispatcher().handle(ex, vcpu)          # nobody serves 12: -ENOSYS
    assert vcpu.kvm_run.hypercall.ret == to_u64(-1000) == ex.ret


# ------------------------------------------------------------------------ binding switches

def test_enable_hypercall_exits_rejects_numbers_the_host_lacks(vm):
    with pytest.raises(MissingCapability) as info:
        vm.enable_hypercall_exits(KVM_HC_MAP_GPA_RANGE, 5)   # KICK_CPU never exits
    assert info.value.cap == Cap.EXIT_HYPERCALL
    assert "EXIT_HYPERCALL" in str(info.value.detail) and "[5]" in info.value.detail
    with pytest.raises(ValueError):
        vm.enable_hypercall_exits(64)


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL, vm=True)
def test_enable_hypercall_exits_accumulates(vm):
    # (kvm_pvm accepts this too; it just never delivers the exit.)
    assert vm.enable_hypercall_exits(KVM_HC_MAP_GPA_RANGE) == 1 << 12
    assert vm.enable_hypercall_exits() == 1 << 12


@pytest.mark.requires_cap(Cap.DISABLE_QUIRKS2)
def test_disable_quirks(vm):
    assert vm.disable_quirks(KVM_X86_QUIRK_FIX_HYPERCALL_INSN) == 32
    assert vm.disable_quirks(0) == 32
    with pytest.raises(MissingCapability) as info:
        vm.disable_quirks(1 << 40)
    assert info.value.cap == Cap.DISABLE_QUIRKS2


def test_close_hooks_run_once_before_memory_goes(kvm):
    vm = kvm.create_vm()
    region = vm.add_memory(0, 0x10000)
    vm.memory.write(0x100, b"alive")
    order = []

    def first(v):
        order.append(("first", bytes(region.view(0x100, 5)), region.closed))

    def broken(v):
        order.append("broken")
        raise RuntimeError("device bug")

    vm.add_close_hook(first)
    vm.add_close_hook(broken)
    vm.close()
    vm.close()
    # Reverse order; the failing hook neither stops the first nor the release of memory.
    assert order == ["broken", ("first", b"alive", False)]
    assert region.closed
    assert len(vm.close_hook_errors) == 1
    with pytest.raises(ValueError):
        vm.add_close_hook(first)                     # a closed VM takes no more hooks


# ------------------------------------------------------------------ kvm_pvm: the CPL0 hang

@pytest.mark.skipif(not ON_PVM, reason="the CPL0 hypercall hang is kvm_pvm's")
@pytest.mark.parametrize("insn", ["vmcall", "vmmcall"])
def test_cpl0_hypercall_on_kvm_pvm_ends_with_the_run_timeout(kvm, insn):
    with Machine(kvm=kvm) as m:
        p = m.load("hypercall", regs={"r12": INSNS[insn][0]})
        result = m.run(timeout=0.5)
        assert result.stop == "timeout", result.summary()
        assert isinstance(result.last_exit, exits.IntrExit)
        assert result.exits == {"IntrExit": 1}                  # no exit before the hang
        rip = m.vcpus[0].get_regs().rip
        # kvm_pvm treats VMCALL as its own: VMMCALL is patched to it, then hangs the same way.
        assert rip == p.symbol(f"hc_{insn}")
        assert m.memory.read(rip, 3) == VMCALL


@pytest.mark.skipif(not ON_PVM, reason="the CPL0 hypercall hang is kvm_pvm's")
def test_cpl0_hypercall_on_kvm_pvm_vcpu_run_timeout(kvm):
    with Machine(kvm=kvm) as m:
        p = m.load("hypercall", regs={"r12": 0})
        ex = m.vcpus[0].run(timeout=0.3)
        assert isinstance(ex, exits.IntrExit) and ex.timed_out
        assert m.vcpus[0].get_regs().rip == p.symbol("hc_vmcall")   # not executed


@pytest.mark.skipif(not ON_PVM, reason="both instructions #UD without the quirk on kvm_pvm")
def test_kvm_pvm_without_fix_hypercall_quirk_raises_ud(kvm):
    with Machine(kvm=kvm) as m:
        m.vm.disable_quirks(KVM_X86_QUIRK_FIX_HYPERCALL_INSN)
        for insn in ("vmcall", "vmmcall"):
            p = m.load("hypercall", regs={"r12": INSNS[insn][0]})
            result = m.run(timeout=5)
            assert result.stop == "fault" and result.event.name == "#UD", result.summary()
            assert result.event.rip == p.symbol(f"hc_{insn}")


# ---------------------------------------------------------------- stock KVM: real hypercalls

def _hypercall_machine(kvm, *, insn, exits_on=True, quirk=True, handler=None):
    m = Machine(kvm=kvm)
    calls = []
    if not quirk:
        m.vm.disable_quirks(KVM_X86_QUIRK_FIX_HYPERCALL_INSN)
    if exits_on:
        m.vm.enable_hypercall_exits(KVM_HC_MAP_GPA_RANGE)
    d = HypercallDispatcher()
    p = m.load("hypercall", regs={"r12": INSNS[insn][0], "r13": 1 if exits_on else 0})

    def map_gpa_range(call):
        calls.append(call)
        if handler is not None:
            return handler(call)
        expected = (p.symbol("HC_ARG_GPA"), p.symbol("HC_ARG_NPAGES"), p.symbol("HC_ARG_ATTRS"))
        if call.args[:3] != expected:
            raise HypercallError(22, f"unexpected args {call.args[:3]}")
        return p.symbol("HC_MAGIC_RET")

    d.register(KVM_HC_MAP_GPA_RANGE, map_gpa_range)
    m.exit_handlers[exits.HypercallExit] = d.handle
    return m, p, calls


def _tags(result):
    return {r.tag: to_signed(r.value64) for r in result.reports}


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL)
def test_map_gpa_range_exit_and_in_kernel_answers(userspace_hypercalls):
    kvm = userspace_hypercalls
    assert kvm.check_extension(Cap.EXIT_HYPERCALL) >> KVM_HC_MAP_GPA_RANGE & 1
    insn = native_instruction(kvm)
    m, p, calls = _hypercall_machine(kvm, insn=insn)
    with m:
        result = m.run(timeout=60)
        assert result.ok, result.summary()
        # One exit: MAP_GPA_RANGE with the guest's args; the unknown number and the requests
        # KVM validates itself (unaligned gpa, 0 pages, gfn wrap) never leave the kernel.
        assert result.exits["HypercallExit"] == 1
        assert len(calls) == 1 and calls[0].longmode
        assert calls[0].args[:3] == (0x123000, 0x45, 0x11)
        assert _tags(result) == {1: -1000, 2: to_signed(p.symbol("HC_MAGIC_RET")),
                                 3: -22, 4: -22, 5: -22}
        assert m.memory.read(p.symbol(f"hc_{insn}"), 3) == INSNS[insn][1]


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL)
def test_map_gpa_range_stays_in_kernel_unless_enabled(userspace_hypercalls):
    kvm = userspace_hypercalls
    m, p, calls = _hypercall_machine(kvm, insn=native_instruction(kvm), exits_on=False)
    with m:
        result = m.run(timeout=60)
        assert result.ok, result.summary()
        assert _tags(result) == {1: -1000, 2: -1000}
        assert not calls and "HypercallExit" not in result.exits


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL)
def test_handler_exception_reaches_the_guest_as_an_error(userspace_hypercalls):
    kvm = userspace_hypercalls

    def broken(call):
        raise RuntimeError("device bug")

    m, p, calls = _hypercall_machine(kvm, insn=native_instruction(kvm), handler=broken)
    with m:
        result = m.run(timeout=60)
        # The guest expected the magic value, got -EIO, and said so: the VMM lives on.
        assert result.stop == "fail" and result.status == 2, result.summary()
        assert _tags(result)[2] == -5


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL, Cap.DISABLE_QUIRKS2)
def test_fix_hypercall_quirk_patches_the_other_vendors_instruction(userspace_hypercalls):
    kvm = userspace_hypercalls
    native = native_instruction(kvm)
    wrong = _wrong(native)
    m, p, calls = _hypercall_machine(kvm, insn=wrong)
    with m:
        where = p.symbol(f"hc_{wrong}")
        assert m.memory.read(where, 3) == INSNS[wrong][1]
        result = m.run(timeout=60)
        assert result.ok, result.summary()
        assert len(calls) == 1
        assert m.memory.read(where, 3) == INSNS[native][1]       # rewritten by KVM


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL, Cap.DISABLE_QUIRKS2)
def test_without_the_quirk_the_other_vendors_instruction_is_ud(userspace_hypercalls):
    kvm = userspace_hypercalls
    wrong = _wrong(native_instruction(kvm))
    m, p, calls = _hypercall_machine(kvm, insn=wrong, quirk=False)
    with m:
        result = m.run(timeout=60)
        assert result.stop == "fault" and result.event.name == "#UD", result.summary()
        assert result.event.rip == p.symbol(f"hc_{wrong}")
        assert m.memory.read(result.event.rip, 3) == INSNS[wrong][1]   # left alone
        assert not calls


@pytest.mark.requires_cap(Cap.EXIT_HYPERCALL, Cap.DISABLE_QUIRKS2)
def test_without_the_quirk_the_native_instruction_still_works(userspace_hypercalls):
    kvm = userspace_hypercalls
    m, p, calls = _hypercall_machine(kvm, insn=native_instruction(kvm), quirk=False)
    with m:
        result = m.run(timeout=60)
        assert result.ok, result.summary()
        assert len(calls) == 1
