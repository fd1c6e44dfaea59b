# SPDX-License-Identifier: GPL-2.0-or-later
"""Live migration between two processes over a socket pair (pyvmm.migsocket): a guest that
keeps writing memory (CPL3 and CPL0), and an SMP guest with the in-kernel irqchip, PIT and
doorbells, finish in the target process with the results of an uninterrupted run; a target
that refuses, fails or dies before the switch-over leaves the source intact, and the guest
finishes there instead with nothing lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from test_state import lcg_expected

from pyvmm import IoEventAddress, Machine
from pyvmm.migsocket import MigrationError, receive, send
from pyvmm.testing.hostinfo import kvm_module

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms

BUFFER, PAGES = 4 << 20, 4093        # dirty.S's buffer: RDI must not be a multiple of 7
PORT, TAG_SHARE, TAG_TOTAL = 0x600, 0x51, 0x52

# The target of the SMP test: its doorbells are the caller's to recreate (setup), as for
# restore; it prints the outcome and the doorbells' counts.
SMP_TARGET = """
import json, socket, sys
from pyvmm import IoEventAddress
from pyvmm.migsocket import receive
bells = []
def setup(m):
    bells.extend(m.doorbell(IoEventAddress.pio(0x600), length=4, datamatch=i) for i in range(2))
with socket.socket(fileno=int(sys.argv[1])) as sock:
    incoming = receive(sock, setup=setup)
with incoming.machine as m:
    d = m.run(timeout=120)
    print(json.dumps({"stop": str(d.stop), "status": d.status,
                      "reports": [[r.tag, r.value64, r.rcx] for r in d.reports],
                      "bells": [b.count for b in bells]}))
"""


def spawn_target(script: str | None = None) -> tuple[socket.socket, subprocess.Popen]:
    """A target process holding one end of a socket pair; returns (our end, the process)."""
    ours, theirs = socket.socketpair()
    argv = ([sys.executable, "-c", script] if script else
            [sys.executable, "-m", "pyvmm.migrate_target"]) + [str(theirs.fileno())]
    proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    theirs.close()
    return ours, proc


@contextlib.contextmanager
def target_said(proc: subprocess.Popen):
    """A migration error on our side comes with what the target process printed."""
    try:
        yield
    except MigrationError as err:
        proc.kill()
        out, errout = proc.communicate(timeout=30)
        raise AssertionError(f"{err}; the target (exit {proc.returncode}) said:\n"
                             f"{out}\n{errout}") from err


def outcome(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def dirty_machine(kvm, steps: int, spin: int) -> Machine:
    m = Machine(kvm=kvm, serial=False)
    m.add_memory(0, 32 << 20)
    m.load("dirty", regs={"rcx": steps, "rsi": BUFFER, "rdi": PAGES, "rdx": spin})
    return m


def test_guest_writing_memory_moves_to_another_process(kvm):
    steps = 3_000_000
    seen = []
    sock, proc = spawn_target()
    with sock, dirty_machine(kvm, steps, 50) as source:
        # At most 4 rounds: the switch-over comes long before the guest's end, even under load.
        result = send(source, sock, threshold_pages=8, max_rounds=4,
                      on_round=lambda i, n: seen.append((i, n)))
    got = outcome(proc)
    assert result.target is None and result.source_result.stop == "stopped"
    assert seen == list(enumerate(result.rounds)) and len(result.rounds) >= 2
    assert got["rounds"] == result.rounds                 # the target saw every round
    # Round 0 left out the zero pages: the code and what the guest had written of its buffer
    # by then (it may not have reached every page yet), not all 32 MiB.
    assert 0 < result.rounds[0] < (32 << 20) // 4096
    assert result.bytes_sent > result.pages_sent * 4096
    assert 0 < result.downtime <= result.duration
    want = steps * (steps + 1) // 2
    reports = [[r.tag, r.value64] for r in result.source_result.reports] + \
        [r[:2] for r in got["reports"]]
    assert got["stop"] == "done" and got["status"] == 0
    assert reports == [[1, want], [2, want]]


def test_cpl0_guest_moves_to_another_process(kvm):
    # Long enough to be running at the switch-over after two rounds (CPL0 is emulated on
    # kvm_pvm; on stock KVM it runs at the CPU's speed, under TCG in the nested runner).
    steps = 20_000 if kvm_module() == "kvm_pvm" else 5_000_000
    sock, proc = spawn_target()
    with sock, Machine(kvm=kvm, serial=False) as source:
        source.add_memory(0, 2 << 20)
        source.load("state", regs={"rcx": steps})
        result = send(source, sock, threshold_pages=0, max_rounds=2)
    got = outcome(proc)
    assert result.source_result.stop == "stopped", result.source_result
    assert got["stop"] == "done" and got["status"] == 0
    assert {t: v for t, v, _ in got["reports"]} == lcg_expected(steps)


@pytest.mark.parametrize("sipi", [False, True], ids=["host-started", "init-sipi"])
def test_smp_guest_with_irqchip_pit_and_doorbells(kvm, sipi):
    n, k = 2, 20000
    regs = {"rdi": n, "rsi": k, "r8": PORT, "r9": 1 if sipi else 0}
    sock, proc = spawn_target(SMP_TARGET)
    with sock, Machine(kvm=kvm, vcpus=n, irqchip=True, serial=False) as source:
        source.vm.create_pit()
        bells = [source.doorbell(IoEventAddress.pio(PORT), length=4, datamatch=i)
                 for i in range(n)]
        if sipi:
            source.load("smp", regs=regs)
        else:
            source.load("smp", regs=regs, start_aps=True, vcpu_regs=lambda i: {"r10": i})
        with target_said(proc):
            result = send(source, sock, max_rounds=3)
        before = [b.count for b in bells]
    got = outcome(proc)
    first = result.source_result
    if first.stop == "done":
        pytest.fail(f"the guest finished before it was moved: {first}")
    assert got["stop"] == "done" and got["status"] == 0, got
    reports = [(r.tag, r.value64, r.rcx) for r in first.reports] + \
        [tuple(r) for r in got["reports"]]
    shares = {rcx: v for tag, v, rcx in reports if tag == TAG_SHARE}
    assert shares == {i: sum(range(i + 1, k + 1, n)) for i in range(n)}
    assert [v for tag, v, _ in reports if tag == TAG_TOTAL] == [k * (k + 1) // 2]
    for i in range(n):
        assert before[i] + got["bells"][i] == len(range(i + 1, k + 1, n))


def _finish_on_source(source: Machine, err: MigrationError, steps: int) -> None:
    """After a failed migration the source continues: every write is still there."""
    assert not any(r.log_dirty for r in source.memory.regions())   # as before
    rest = source.run(timeout=120)
    assert rest.ok, rest
    earlier = err.source_result.reports if err.source_result is not None else []
    want = steps * (steps + 1) // 2
    assert [(r.tag, r.value64) for r in list(earlier) + list(rest.reports)] == \
        [(1, want), (2, want)]


def test_target_dying_mid_precopy_leaves_the_source_running(kvm):
    steps = 3_000_000
    sock, proc = spawn_target()

    def kill(round_no: int, pages: int) -> None:
        if round_no == 1:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with sock, dirty_machine(kvm, steps, 50) as source:
        with pytest.raises(MigrationError, match="peer is gone|truncated|reading") as info:
            send(source, sock, threshold_pages=0, max_rounds=30, on_round=kill)
        assert proc.returncode == -signal.SIGKILL
        _finish_on_source(source, info.value, steps)
    proc.communicate()


def test_target_failing_after_the_stop_leaves_the_source_intact(kvm):
    """The target fails while loading the state (its setup raises), after the source was
    stopped: the source gets the target's reason and the guest goes on there."""
    steps = 3_000_000
    ours, theirs = socket.socketpair()
    failed: list[BaseException] = []

    def target() -> None:
        def setup(machine):
            raise RuntimeError("no doorbells for you")
        try:
            receive(theirs, kvm=kvm, setup=setup, timeout=30)
        except BaseException as err:  # noqa: BLE001 - kept for the assertion
            failed.append(err)
    thread = threading.Thread(target=target)
    thread.start()
    with ours, theirs, dirty_machine(kvm, steps, 50) as source:
        with pytest.raises(MigrationError, match="no doorbells for you") as info:
            send(source, ours, threshold_pages=64, max_rounds=3)
        thread.join(30)
        assert isinstance(failed[0], RuntimeError)
        assert info.value.source_result.stop == "stopped"
        _finish_on_source(source, info.value, steps)


def test_target_refusing_the_layout(kvm):
    steps = 100_000
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=lambda: pytest.raises(
        MigrationError, receive, theirs, kvm=kvm, max_memory=1 << 20))
    thread.start()
    with ours, theirs, dirty_machine(kvm, steps, 0) as source:
        with pytest.raises(MigrationError, match="at most 1048576") as info:
            send(source, ours)
        thread.join(30)
        assert info.value.source_result is None       # the guest never ran
        _finish_on_source(source, info.value, steps)


def test_migrate_demo_between_processes(capsys):
    from pyvmm.cli import main

    assert main(["migrate-demo", "--processes", "--memory", "16", "--pages", "1021",
                 "--steps", "400000", "--spin", "50"]) == 0
    out = capsys.readouterr().out
    assert "another process" in out and "stop+copy" in out and "(right)" in out
