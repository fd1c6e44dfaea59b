# SPDX-License-Identifier: GPL-2.0-or-later
"""Live migration (pre-copy over KVM's dirty log) between two machines in one process: a guest
that keeps writing memory, and an SMP guest with the in-kernel irqchip and doorbells, finish on
the target with exactly the results of an uninterrupted run."""

from __future__ import annotations

import pytest

from pyvmm import IoEventAddress, Machine
from pyvmm.migration import migrate

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms

BUFFER, PAGES = 4 << 20, 4093        # dirty.S's buffer: RDI must not be a multiple of 7


def _dirty_machine(kvm, steps: int, spin: int) -> Machine:
    m = Machine(kvm=kvm, serial=False)
    m.add_memory(0, 32 << 20)
    m.load("dirty", regs={"rcx": steps, "rsi": BUFFER, "rdi": PAGES, "rdx": spin})
    return m


def test_guest_writing_memory_moves_while_it_runs(kvm):
    steps = 3_000_000
    seen = []
    with _dirty_machine(kvm, steps, 50) as source:
        result = migrate(source, kvm=kvm, threshold_pages=8, max_rounds=4,
                         on_round=lambda i, n: seen.append((i, n)))
        with result.target as target:
            assert result.source_result.stop == "stopped"     # moved while it ran
            assert all(r.log_dirty for r in source.memory.regions())
            assert seen == list(enumerate(result.rounds))
            assert result.rounds[0] == (32 << 20) // 4096      # round 0: all of memory
            assert len(result.rounds) >= 2 and result.pages_sent >= result.rounds[0]
            assert 0 < result.downtime <= result.duration
            done = target.run(timeout=60)
    assert done.ok, done
    # Every write made before and after the move is in the buffer: its sum is the steps'
    # (reported by the target, or by the source when the stop came after the guest's reports).
    reports = result.source_result.reports + done.reports
    assert {r.tag: r.value64 for r in reports} == {1: steps * (steps + 1) // 2,
                                                   2: steps * (steps + 1) // 2}
    assert len(reports) == 2


PORT, TAG_SHARE, TAG_TOTAL = 0x600, 0x51, 0x52


def test_smp_guest_with_irqchip_and_doorbells(kvm):
    n, k = 2, 20000          # long enough that the migration ends mid-sum even under load
    source = Machine(kvm=kvm, vcpus=n, irqchip=True, serial=False)
    with source:
        source.vm.create_pit()
        bells = [source.doorbell(IoEventAddress.pio(PORT), length=4, datamatch=i)
                 for i in range(n)]
        source.load("smp", regs={"rdi": n, "rsi": k, "r8": PORT, "r9": 1})  # INIT-SIPI
        target_bells = []

        def setup(target):
            target_bells.extend(target.doorbell(IoEventAddress.pio(PORT), length=4,
                                                datamatch=i) for i in range(n))
        result = migrate(source, kvm=kvm, setup=setup, max_rounds=3)
        before = [b.count for b in bells]
        first = result.source_result
        with result.target as target:
            done = target.run(timeout=60)
    if first.stop == "done":
        pytest.fail(f"the guest finished before it was moved: {first}")
    assert done.ok, done
    shares = {r.rcx: r.value64 for r in first.reports + done.reports if r.tag == TAG_SHARE}
    assert shares == {i: sum(range(i + 1, k + 1, n)) for i in range(n)}
    totals = [r.value64 for r in done.reports if r.tag == TAG_TOTAL]
    assert totals == [k * (k + 1) // 2]
    for i in range(n):
        assert before[i] + target_bells[i].count == len(range(i + 1, k + 1, n))


def test_dirty_logging_toggled_on_a_live_region(kvm):
    with Machine(kvm=kvm, serial=False) as m, kvm.create_vm() as other:
        region = m.add_memory(0, 0x10000)
        with pytest.raises(ValueError):
            m.vm.dirty_log(region)                          # not logging yet
        m.vm.set_log_dirty(region, True)
        assert region.log_dirty and m.vm.dirty_log(region).pages() == []
        m.vm.set_log_dirty(region, False)
        assert not region.log_dirty
        with pytest.raises(ValueError):
            other.set_log_dirty(region, True)               # another VM's region


def test_migrate_demo_command(capsys):
    from pyvmm.cli import main

    assert main(["migrate-demo", "--memory", "16", "--pages", "1021", "--steps", "400000",
                 "--spin", "50"]) == 0
    out = capsys.readouterr().out
    assert "stop+copy" in out and "downtime" in out and "(right)" in out
    assert main(["migrate-demo", "--pages", "700"]) == 2          # a multiple of 7
    assert "multiple of 7" in capsys.readouterr().err
