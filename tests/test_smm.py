# SPDX-License-Identifier: GPL-2.0-or-later
"""System Management Mode: SMRAM in memslot address space 1, KVM_SMI and self-SMIs, the
state-save area (both layouts), SMBASE relocation, and vCPU state carried across fresh VMs.

The tests that need SMM are marked ``requires_cap(Cap.X86_SMM)``: they skip on kvm_pvm (this
project's hosts have no SMM) and run on stock kvm_amd inside the nested runner::

    pyvmm nested -- python -m pytest -q -m stock_kvm -k smm tests/test_smm.py

The others check, on any host, the save-area layouts against KVM's offsets, the payload's
numbers against pyvmm.smm, and the clear errors where SMM is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from pyvmm import Cap, KvmError, MissingCapability, exits, guests, smm
from pyvmm.runloop import ConsoleBuffer, RunControl, RunResult, Stop, run_vcpu

from helpers import code, expect, real_mode

SMM = pytest.mark.requires_cap(Cap.X86_SMM)
RUN_TIMEOUT = 120.0          # a whole payload run; QEMU TCG under the nested runner is slow


@functools.cache
def payload():
    return guests.build("smm")


def sym(name: str) -> int:
    return payload().symbols[name]


TAG_STAGE, TAG_HANDLER = 0x5354, 0x534D
FLAG_REAL_ONLY, FLAG_SELF_SMI = 1, 2
NEW_SMBASE = 0x50000
SENTINEL = 0x5E5E5E5E
HOST_VALUE = 0xC0FFEE                      # what the host writes as the saved RSI
SMBASES = (smm.DEFAULT_SMBASE, NEW_SMBASE)

CR0_PG, CR4_PAE, EFER_LME, EFER_LMA = 1 << 31, 1 << 5, 1 << 8, 1 << 10


def stage(n: int) -> tuple[int, int]:
    return (TAG_STAGE, n)


def handler(smbase: int) -> tuple[int, int]:
    return (TAG_HANDLER, smbase)


# Where the host injects an SMI (KVM_SMI) after a main-code report, and what comes back.
SMI_STAGES = (1, 2, 3, 4, 5)
REAL_SEQUENCE = [stage(1), handler(0x30000), stage(2), handler(0x30000), stage(3),
                 handler(0x30000), stage(4), handler(NEW_SMBASE)]
FULL_SEQUENCE = REAL_SEQUENCE + [stage(5), handler(NEW_SMBASE), stage(6)]
SELF_SMI_SEQUENCE = FULL_SEQUENCE + [stage(7), handler(NEW_SMBASE), stage(8)]


def no_long_mode(cpuid):
    out = []
    for e in cpuid:
        if e.function == 0x80000001:
            e = dataclasses.replace(e, edx=e.edx & ~(1 << 29))
        out.append(e)
    return out


# ------------------------------------------------------------------------------ the driver

@dataclass
class Record:
    """One report of the smm payload, with what the host saw at its exit."""

    tag: int
    value: int
    regs: dict
    in_smm: bool                 # kvm_run.flags & KVM_RUN_X86_SMM
    events_smm: bool             # KVM_GET_VCPU_EVENTS smi.smm
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.tag, self.value)


class SmmGuest:
    """The smm payload on a VM with SMRAM at both SMBASEs (address space 1) and the decoy at the
    same addresses of normal RAM; `run()` drives it, injecting SMIs after the main-code
    reports of `smi_stages`, calling `on_report(guest, record)`, and, with
    `save_restore=True`, moving the vCPU to a fresh VM at every report."""

    def __init__(self, kvm, *, flags: int = 0, cpuid=None, irqchip: bool = False,
                 smi_stages=SMI_STAGES, inject=None) -> None:
        self.kvm = kvm
        self.cpuid = list(cpuid if cpuid is not None else kvm.supported_cpuid())
        self.irqchip = irqchip
        self.smi_stages = set(smi_stages)
        self.inject = inject or (lambda vcpu: vcpu.smi())
        self.records: list[Record] = []
        self.migrations = 0
        self.rejected_msrs: set[int] = set()
        self._readable_msrs: list[int] | None = None
        p = payload()
        self.handler_code = p.image[sym("smm_handler") - p.load_address:
                                    sym("smm_handler_end") - p.load_address]
        self.decoy_code = p.image[sym("smm_decoy") - p.load_address:
                                  sym("smm_decoy_end") - p.load_address]
        self.vm = self._new_vm()
        p.load(self.vm)
        for base in SMBASES:
            smm.install_handler(self.vm, self.handler_code, base)
            self.vm.memory.write(base + smm.HANDLER_OFFSET, self.decoy_code)   # normal RAM
        self.vcpu = self.vm.create_vcpu()
        p.setup_vcpu(self.vcpu, regs={"rbp": flags}, cpuid=self.cpuid)

    def _new_vm(self):
        vm = self.kvm.create_vm()
        if self.irqchip:
            vm.create_irqchip()
        vm.add_memory(0, payload().memory_size)
        for base in SMBASES:
            smm.add_smram(vm, base)
        return vm

    def close(self) -> None:
        self.vm.close()

    def save_area(self, smbase: int | None = None) -> smm.StateSave:
        return smm.state_save(self.vm, smm.get_smbase(self.vcpu) if smbase is None else smbase)

    # -- running

    def run(self, on_report=None, *, save_restore: bool = False,
            timeout: float = RUN_TIMEOUT) -> list[Record]:
        """Run on pyvmm's run loop to DONE; with `save_restore`, the loop ends after each
        report, the vCPU moves to a fresh VM (migrate) and the loop starts again there."""
        deadline = time.monotonic() + timeout

        def report(event, vcpu):
            rec = Record(event.tag, event.value, dict(event.regs), vcpu.in_smm,
                         bool(vcpu.get_events().smi.smm))
            self.records.append(rec)
            if rec.tag == TAG_STAGE and rec.value in self.smi_stages:
                self.inject(vcpu)
            if on_report is not None:
                on_report(self, rec)
            if save_restore:
                self.migrate()
                return Stop.STOPPED   # go on with the migrated vCPU
            return None

        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; reports so far: {self.keys()}"
            control = RunControl([self.vcpu])
            control.arm(remaining)
            try:
                out = run_vcpu(self.vcpu, control, RunResult(), console=ConsoleBuffer(),
                               counts=Counter(), on_report=report)
            finally:
                control.disarm()
            if out.error is not None:
                raise out.error
            if out.stop == Stop.STOPPED and save_restore:
                continue
            if out.stop == Stop.DONE:
                assert out.status == 0
                return self.records
            if out.stop == Stop.TIMEOUT:
                pytest.fail(f"timed out; reports so far: {self.keys()}")
            if out.event is not None:
                pytest.fail(f"guest: {out.event} after {self.keys()}")
            pytest.fail(f"unexpected exit {out.last_exit!r} (in SMM: {self.vcpu.in_smm}) "
                        f"after {self.keys()}")

    def keys(self) -> list[tuple[int, int]]:
        return [r.key for r in self.records]

    # -- save and restore across a fresh VM (as the kernel's smm_test does)

    def readable_msrs(self) -> list[int]:
        if self._readable_msrs is None:
            ok = []
            for index in self.kvm.msr_index_list():
                try:
                    self.vcpu.get_msrs([index])
                except KvmError:
                    continue
                ok.append(index)
            self._readable_msrs = ok
        return self._readable_msrs

    def migrate(self) -> None:
        vcpu = self.vcpu
        # Finish the OUT that exited to us: KVM completes pending I/O on the next KVM_RUN
        # before it looks at immediate_exit, so the saved RIP is past the instruction.
        vcpu.kick()
        assert isinstance(vcpu.run(), exits.IntrExit)
        state = {
            "sregs": vcpu.get_sregs(), "regs": vcpu.get_regs(), "fpu": vcpu.get_fpu(),
            "events": vcpu.get_events(), "mp_state": vcpu.get_mp_state(),
            "msrs": vcpu.get_msrs(self.readable_msrs()),
            "lapic": vcpu.get_lapic() if self.irqchip else None,
        }
        memory = [(r.address_space, r.guest_addr, bytes(r.view()))
                  for r in self.vm.memory.regions()]
        self.vm.close()

        self.vm = vm = self._new_vm()
        for space, gpa, data in memory:
            vm.memory.write(gpa, data, address_space=space)
        self.vcpu = new = vm.create_vcpu()
        new.set_cpuid(self.cpuid)
        new.set_sregs(state["sregs"])
        try:
            new.set_msrs(state["msrs"])
        except KvmError:
            for index, value in state["msrs"].items():
                try:
                    new.set_msrs({index: value})
                except KvmError:
                    self.rejected_msrs.add(index)
        new.set_fpu(state["fpu"])
        if state["lapic"] is not None:
            new.set_lapic(state["lapic"])
        new.set_events(state["events"])
        new.set_mp_state(state["mp_state"])
        new.set_regs(state["regs"])
        self.migrations += 1
        assert smm.MSR_IA32_SMBASE not in self.rejected_msrs
        assert smm.get_smbase(new) == state["msrs"][smm.MSR_IA32_SMBASE]
        assert new.get_events().smi.smm == state["events"].smi.smm
        assert new.get_events().smi.pending == state["events"].smi.pending


@pytest.fixture
def smm_guest(kvm):
    made = []

    def make(**kwargs) -> SmmGuest:
        g = SmmGuest(kvm, **kwargs)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def check_smm_flags(records: list[Record]) -> None:
    """in_smm (and the events' smi.smm) true exactly at the handler's reports."""
    for r in records:
        inside = r.tag == TAG_HANDLER
        assert r.in_smm is inside, r
        assert r.events_smm is inside, r


# ------------------------------------------------------------------- stock KVM: the variants

@SMM
@pytest.mark.parametrize("how", ["KVM_SMI", "events"])
def test_smm_stages_real_and_long_mode(smm_guest, how):
    inject = None if how == "KVM_SMI" else smm.inject_smi
    g = smm_guest(inject=inject)
    records = g.run()
    assert g.keys() == FULL_SEQUENCE
    check_smm_flags(records)
    # The handler saw KVM's 64-bit layout (the guest CPUID has long mode), also from real mode.
    assert {r.regs["rcx"] & 0xFFFFFFFF for r in records if r.tag == TAG_HANDLER} \
        == {smm.REVISION_64}
    assert g.vcpu.in_smm is False and g.vcpu.get_events().smi.smm == 0


@SMM
def test_smm_save_area_64bit_and_rsm_restores_long_mode(smm_guest):
    seen = {}

    def on_report(g, rec):
        if rec.tag == TAG_STAGE and rec.value in (1, 5):
            seen[f"sregs{rec.value}"] = g.vcpu.get_sregs()
        if rec.tag == TAG_HANDLER:
            save = g.save_area(rec.value)
            assert isinstance(save, smm.StateSave64)
            before = g.records[-2].value
            seen[before] = (save.to_dict(), g.vcpu.get_sregs(), g.vcpu.get_regs())

    g = smm_guest()
    g.run(on_report)
    # SMI after stage 1: real mode, saved at SMBASE 0x30000
    s1, sregs_smm, regs_smm = seen[1]
    assert s1["revision"] == smm.REVISION_64 and s1["smbase"] == 0x30000
    assert s1["rip"] == sym("after_stage1")
    assert s1["cs"].selector == 0 and s1["cs"].base == 0
    assert s1["cr0"] == seen["sregs1"].cr0 and s1["efer"] == 0
    assert s1["rsi"] == 0 and s1["rdi"] == 0
    # inside SMM: big real mode at SMBASE, paging and protection off
    assert sregs_smm.cs.selector == 0x3000 and sregs_smm.cs.base == 0x30000
    assert sregs_smm.cr0 & 1 == 0 and regs_smm.rip > smm.HANDLER_OFFSET
    # SMI after stage 5: 64-bit long mode with paging, saved at the relocated SMBASE
    s5, sregs_smm5, _ = seen[5]
    long_sregs = seen["sregs5"]
    assert s5["smbase"] == NEW_SMBASE and s5["rip"] == sym("after_stage5")
    assert s5["cr0"] == long_sregs.cr0 and s5["cr0"] & CR0_PG
    assert s5["cr3"] == long_sregs.cr3 and s5["cr4"] == long_sregs.cr4
    assert s5["efer"] == long_sregs.efer and s5["efer"] & (EFER_LME | EFER_LMA)
    assert s5["cs"].selector == long_sregs.cs.selector and s5["cs"].l == 1
    assert s5["gdtr"].base == long_sregs.gdt.base and s5["idtr"].base == long_sregs.idt.base
    assert s5["tr"].selector == long_sregs.tr.selector
    assert sregs_smm5.efer == 0 and sregs_smm5.cr0 & CR0_PG == 0
    assert sregs_smm5.cs.base == NEW_SMBASE
    # After RSM the guest read CR0/CR4/EFER again (RCX/RDX/RSI), still in 64-bit mode (R15).
    after = g.records[g.keys().index(stage(6))].regs
    assert (after["rcx"], after["rdx"], after["rsi"]) == (long_sregs.cr0, long_sregs.cr4,
                                                          long_sregs.efer)
    assert after["r15"] == 0x0123456789ABCDEF
    final = g.vcpu.get_sregs()
    assert final.cr0 == long_sregs.cr0 and final.efer == long_sregs.efer
    assert final.cr4 == long_sregs.cr4 and final.cs.l == 1


@SMM
def test_smm_host_write_to_save_area_seen_after_rsm(smm_guest):
    def on_report(g, rec):
        if rec.tag == TAG_HANDLER and g.records[-2].key == stage(2):
            save = g.save_area()
            assert save["rsi"] == SENTINEL      # the value the guest had when the SMI came
            save["rsi"] = HOST_VALUE

    g = smm_guest(flags=FLAG_REAL_ONLY)
    g.run(on_report)
    assert g.keys() == REAL_SEQUENCE
    assert g.records[g.keys().index(stage(3))].regs["rsi"] == HOST_VALUE


@SMM
def test_smm_guest_relocates_smbase(smm_guest):
    smbase_at = {}

    def on_report(g, rec):
        if rec.tag == TAG_STAGE:
            smbase_at[rec.value] = smm.get_smbase(g.vcpu)

    g = smm_guest(flags=FLAG_REAL_ONLY)
    g.run(on_report)
    assert smbase_at == {1: 0x30000, 2: 0x30000, 3: 0x30000, 4: NEW_SMBASE}
    handlers = [r for r in g.records if r.tag == TAG_HANDLER]
    assert [r.value for r in handlers] == [0x30000, 0x30000, 0x30000, NEW_SMBASE]
    # The handler at the new base ran with CS = NEW_SMBASE >> 4 and saved its state there.
    assert g.save_area(NEW_SMBASE)["smbase"] == NEW_SMBASE
    # The host can move it too (MSR_IA32_SMBASE is host-writable).
    smm.set_smbase(g.vcpu, 0x30000)
    assert smm.get_smbase(g.vcpu) == 0x30000


@SMM
def test_smm_save_area_32bit_without_long_mode_cpuid(smm_guest, kvm):
    cpuid = no_long_mode(kvm.supported_cpuid())
    assert not smm.guest_has_long_mode(cpuid)
    seen = {}

    def on_report(g, rec):
        if rec.tag == TAG_HANDLER:
            save = g.save_area(rec.value)
            seen[g.records[-2].value] = save.to_dict()
            if g.records[-2].key == stage(2):
                save["esi"] = HOST_VALUE

    g = smm_guest(flags=FLAG_REAL_ONLY, cpuid=cpuid)
    records = g.run(on_report)
    assert g.keys() == REAL_SEQUENCE
    check_smm_flags(records)
    assert {r.regs["rcx"] for r in records if r.tag == TAG_HANDLER} == {smm.REVISION_32}
    s1 = seen[1]
    assert s1["revision"] == smm.REVISION_32 and s1["smbase"] == 0x30000
    assert s1["rip"] == sym("after_stage1") and s1["cs_sel"] == 0
    assert s1["cs"].selector == 0 and s1["cs"].base == 0 and s1["cs"].present == 1
    assert s1["rflags"] & 2 and s1["cr0"] & 1 == 0
    assert s1["rbx"] == TAG_STAGE and s1["rax"] == 1
    # relocation through the 32-bit layout's SMBASE field, and the host's write to ESI
    assert seen[4]["smbase"] == NEW_SMBASE
    assert records[g.keys().index(stage(3))].regs["rsi"] == HOST_VALUE


@SMM
def test_smm_self_smi_through_local_apic_icr(smm_guest):
    g = smm_guest(flags=FLAG_SELF_SMI, irqchip=True)
    records = g.run()
    assert g.keys() == SELF_SMI_SEQUENCE
    check_smm_flags(records)


@SMM
def test_smm_smi_inside_smm_is_held_until_rsm(smm_guest):
    def on_report(g, rec):
        if rec.tag == TAG_HANDLER and g.records[-2].key == stage(1):
            g.vcpu.smi()                        # a second SMI while the handler runs
            assert smm.smm_state(g.vcpu) == smm.SmmState(True, True, False, False)

    g = smm_guest(flags=FLAG_REAL_ONLY)
    g.run(on_report)
    # RSM ends the first handler, the held SMI enters it again before the main code goes on
    assert g.keys() == REAL_SEQUENCE[:2] + [handler(0x30000)] + REAL_SEQUENCE[2:]
    check_smm_flags(g.records)


@SMM
def test_smram_invisible_outside_smm(smm_guest):
    g = smm_guest(flags=FLAG_REAL_ONLY)
    checked = []

    def on_report(g, rec):
        for base in SMBASES:
            gpa = base + smm.HANDLER_OFFSET
            n = len(g.handler_code)
            # the same guest-physical address: the handler in SMRAM, the decoy in normal RAM
            assert g.vm.memory.read(gpa, n, address_space=1) == g.handler_code
            assert g.vm.memory.read(gpa, len(g.decoy_code)) == g.decoy_code
            assert bytes(g.vm.memory.view(gpa, n, address_space=1)) == g.handler_code
        if rec.tag == TAG_HANDLER:
            # KVM wrote the save area into SMRAM only; normal RAM there is untouched.
            save = rec.value + smm.STATE_SAVE_OFFSET
            assert any(g.vm.memory.read(save, smm.STATE_SAVE_SIZE, address_space=1))
            assert not any(g.vm.memory.read(save, smm.STATE_SAVE_SIZE))
        checked.append(rec.key)

    g.run(on_report)   # the decoy would report FAIL 0xDEC0 had it run
    assert checked == REAL_SEQUENCE


@SMM
def test_smm_sees_only_address_space_1(vm):
    """Address space 1 is a separate, complete view: RAM that exists only in address space 0
    is MMIO to code running in SMM."""
    vm.add_memory(0, 0x10000)
    smm.add_smram(vm, smm.DEFAULT_SMBASE)
    vm.memory.write(0x2000, (0xAAAAAAAA).to_bytes(4, "little"))
    smm.install_handler(vm, code("""
        movl $0x2000, %ebx
        addr32 movl (%ebx), %eax
        outl %eax, $0xEA
        rsm
    """, base=0))
    vcpu = vm.create_vcpu()
    vm_code = code("outb %al, $0xEA\nhlt")
    vm.memory.write(0x1000, vm_code)
    real_mode(vcpu)
    ex = expect(vcpu, exits.IoExit)
    assert not vcpu.in_smm
    vcpu.smi()
    ex = expect(vcpu, exits.MmioExit, timeout=30)
    assert vcpu.in_smm and ex.address == 0x2000 and not ex.is_write and ex.length == 4
    ex.data[:4] = (0x12345678).to_bytes(4, "little")
    ex = expect(vcpu, exits.IoExit, timeout=30)
    assert vcpu.in_smm and vcpu.get_regs().rax & 0xFFFFFFFF == 0x12345678
    expect(vcpu, exits.HltExit, timeout=30)
    assert not vcpu.in_smm


@SMM
@pytest.mark.parametrize("variant", ["plain", "irqchip-self-smi"])
def test_smm_state_saved_and_restored_across_fresh_vms(smm_guest, variant):
    irq = variant != "plain"
    g = smm_guest(flags=FLAG_SELF_SMI if irq else 0, irqchip=irq)

    def on_report(g, rec):
        # the host's write to the save area must survive the move as well
        if rec.tag == TAG_HANDLER and g.records[-2].key == stage(2):
            g.save_area()["rsi"] = HOST_VALUE

    records = g.run(on_report, save_restore=True)
    assert g.keys() == (SELF_SMI_SEQUENCE if irq else FULL_SEQUENCE)
    assert g.migrations == len(records)
    check_smm_flags(records)
    assert records[g.keys().index(stage(3))].regs["rsi"] == HOST_VALUE
    assert records[g.keys().index(stage(6))].regs["r15"] == 0x0123456789ABCDEF


# ----------------------------------------------------------------------------- on any host

def test_state_save_offsets_match_kvm():
    # 64-bit (AMD64 style) layout
    s64 = smm.StateSave64
    assert (s64.offset("smbase"), s64.offset("revision"), s64.offset("efer")) == \
        (0xFF00, 0xFEFC, 0xFED0)
    assert (s64.offset("cr4"), s64.offset("cr3"), s64.offset("cr0")) == (0xFF48, 0xFF50, 0xFF58)
    assert (s64.offset("rflags"), s64.offset("rip")) == (0xFF70, 0xFF78)
    assert (s64.offset("r15"), s64.offset("rsi"), s64.offset("rax")) == (0xFF80, 0xFFC8, 0xFFF8)
    assert s64.SEGMENT_OFFSETS["es"] == 0xFE00 and s64.SEGMENT_OFFSETS["tr"] == 0xFE90
    # 32-bit (P6 style) layout
    s32 = smm.StateSave32
    assert (s32.offset("smbase"), s32.offset("revision"), s32.offset("cr4")) == \
        (0xFEF8, 0xFEFC, 0xFF14)
    assert (s32.offset("eax"), s32.offset("edi"), s32.offset("eip")) == (0xFFD0, 0xFFEC, 0xFFF0)
    assert (s32.offset("eflags"), s32.offset("cr3"), s32.offset("cr0")) == \
        (0xFFF4, 0xFFF8, 0xFFFC)
    assert s32.SEGMENT_OFFSETS["cs"] == 0xFF90 and s32.offset("cs_sel") == 0xFFAC
    assert "efer" not in s32.FIELDS and "r8" not in s32.FIELDS
    with pytest.raises(KeyError, match="32-bit state-save area has no field 'efer'"):
        s32.offset("efer")


def test_state_save_reads_and_writes_any_address_space(vm):
    # Reading the layouts needs no SMM: put a fake save area in ordinary RAM (space 0).
    vm.add_memory(0x30000, 0x10000)
    mem = vm.memory
    mem.write(0x30000 + 0xFEFC, smm.REVISION_64.to_bytes(4, "little"))
    mem.write(0x30000 + 0xFE10, bytes.fromhex("0800 9b20 ffffffff") + (0x1234).to_bytes(8,
                                                                                      "little"))
    save = smm.state_save(vm, 0x30000, address_space=0)
    assert isinstance(save, smm.StateSave64) and save["revision"] == smm.REVISION_64
    cs = save.segment("cs")
    assert (cs.selector, cs.base, cs.limit, cs.type, cs.s, cs.present, cs.l) == \
        (8, 0x1234, 0xFFFFFFFF, 0xB, 1, 1, 1)
    save["rax"] = 0x1122334455667788
    assert mem.read_u64(0x30000 + 0xFFF8) == 0x1122334455667788
    save["eip"] = 0xABC
    assert save["rip"] == 0xABC and save.regs()["rip"] == 0xABC
    assert len(save.read_bytes()) == smm.STATE_SAVE_SIZE

    mem.write(0x30000 + 0xFEFC, smm.REVISION_32.to_bytes(4, "little"))
    save32 = smm.state_save(vm, 0x30000, address_space=0)
    assert isinstance(save32, smm.StateSave32)
    save32["esi"] = 0xFFFFFFFF12345678           # truncated to the 32-bit slot
    assert mem.read(0x30000 + 0xFFE8, 4) == (0x12345678).to_bytes(4, "little")
    # flags in descriptor-high-dword form: type 3, S, P, D/B, G
    mem.write(0x30000 + 0xFF2C, (0x00C09300).to_bytes(4, "little") + bytes(8))
    ds = save32.segment("ds")
    assert (ds.type, ds.s, ds.present, ds.db, ds.g) == (3, 1, 1, 1, 1)
    assert save32.segment("gdtr").selector is None

    mem.write(0x30000 + 0xFEFC, bytes(4))
    with pytest.raises(ValueError, match="no SMM state-save area"):
        smm.state_save(vm, 0x30000, address_space=0)
    assert isinstance(smm.state_save(vm, 0x30000, layout=32, address_space=0), smm.StateSave32)


def test_smm_payload_numbers_match_pyvmm_smm():
    s = payload().symbols
    assert s["SMM_DEFAULT_SMBASE"] == smm.DEFAULT_SMBASE
    assert s["SMM_SAVE_REVISION"] == smm.REVISION_OFFSET
    assert s["SMM_SAVE_SMBASE32"] == smm.StateSave32.offset("smbase")
    assert s["SMM_SAVE_SMBASE64"] == smm.StateSave64.offset("smbase")
    assert s["SMM_ICR_SELF_SMI"] == smm.APIC_ICR_SELF_SMI
    assert (s["SMM_TAG_STAGE"], s["SMM_TAG_HANDLER"]) == (TAG_STAGE, TAG_HANDLER)
    assert (s["SMM_FLAG_REAL_ONLY"], s["SMM_FLAG_SELF_SMI"]) == (FLAG_REAL_ONLY, FLAG_SELF_SMI)
    assert (s["SMM_NEW_SMBASE"], s["SMM_SENTINEL"]) == (NEW_SMBASE, SENTINEL)
    handler_code = payload().image[s["smm_handler"] - 0x1000: s["smm_handler_end"] - 0x1000]
    assert handler_code.endswith(b"\x0f\xaa")    # rsm
    assert len(handler_code) < smm.STATE_SAVE_OFFSET - smm.HANDLER_OFFSET


def test_guest_has_long_mode(kvm):
    cpuid = kvm.supported_cpuid()
    assert smm.guest_has_long_mode(cpuid)
    assert not smm.guest_has_long_mode(no_long_mode(cpuid))
    assert not smm.guest_has_long_mode([])


def test_smm_payload_runs_without_smis(kvm):
    # With no SMI injected the main code just walks its stages (this is what a host without
    # SMM can run of it).
    r = guests.run("smm", kvm=kvm, timeout=30)
    assert r.ok, str(r)
    assert [(x.tag, x.value) for x in r.reports] == [stage(n) for n in range(1, 7)]


def test_smm_missing_gives_clear_errors(kvm, vm):
    if vm.check_extension(Cap.X86_SMM):
        pytest.skip("this KVM has SMM (the stock_kvm tests cover it)")
    with pytest.raises(MissingCapability, match="MULTI_ADDRESS_SPACE") as info:
        smm.add_smram(vm)
    assert info.value.cap == Cap.MULTI_ADDRESS_SPACE and not vm.memory.regions(1)
    with pytest.raises(MissingCapability, match="X86_SMM") as info:
        smm.require_smm(vm)
    assert info.value.cap == Cap.X86_SMM
    vcpu = vm.create_vcpu()
    with pytest.raises(MissingCapability, match="X86_SMM"):
        vcpu.smi()
    # the SMM fields of the events are still there, and zero
    state = smm.smm_state(vcpu)
    assert not (state.smm or state.pending or state.smm_inside_nmi)


@SMM
def test_ram_aliased_into_smm_is_the_same_memory(vm):
    """With the RAM outside SMRAM aliased into address space 1 (as QEMU maps it), the SMI
    handler reads the value the host put in normal RAM and its write is seen outside SMM,
    with no exit: one memory, two views. SMRAM itself stays private to SMM."""
    ram = vm.add_memory(0, 0x100000)
    base = smm.DEFAULT_SMBASE
    smm.add_smram(vm, base)
    aliases = smm.alias_ram(vm, ram, base)       # [0, SMBASE) and [SMBASE+64K, 1M)
    top = base + smm.SMRAM_SIZE
    assert [(a.guest_addr, a.size) for a in aliases] == [(0, base), (top, 0x100000 - top)]
    vm.memory.write(0x2000, (0xAAAAAAAA).to_bytes(4, "little"))
    smm.install_handler(vm, code("""
        movl $0x2000, %ebx
        addr32 movl (%ebx), %eax
        outl %eax, $0xEA
        addr32 movl $0x5a5a5a5a, 4(%ebx)
        rsm
    """, base=0))
    vcpu = vm.create_vcpu()
    vm.memory.write(0x1000, code("outb %al, $0xEA\nhlt"))
    real_mode(vcpu)
    expect(vcpu, exits.IoExit)
    vcpu.smi()
    expect(vcpu, exits.IoExit, timeout=30)       # the report: no MMIO exit came first
    assert vcpu.in_smm and vcpu.get_regs().rax & 0xFFFFFFFF == 0xAAAAAAAA
    expect(vcpu, exits.HltExit, timeout=30)
    assert not vcpu.in_smm
    assert vm.memory.read(0x2004, 4) == (0x5A5A5A5A).to_bytes(4, "little")
    assert vm.memory.read(0x2004, 4, address_space=1) == (0x5A5A5A5A).to_bytes(4, "little")
    # SMRAM is not aliased: the same address outside SMM is plain RAM
    assert vm.memory.read(base + smm.HANDLER_OFFSET, 4) == bytes(4)
