"""Kicks racing run() entry: over 100,000 tries, every kick ends exactly the run it was aimed
at, whether it lands before KVM_RUN, inside it, or as run() returns."""

from __future__ import annotations

import os
import random
import threading
import time

from helpers import spin_payload

from pyvmm import Machine
from pyvmm.exits import IntrExit

TRIES = int(os.environ.get("PYVMM_KICK_TRIES", "100000"))


def test_no_kick_is_lost(kvm, tmp_path):
    src = spin_payload(tmp_path)
    with Machine(kvm=kvm) as m:
        m.load(src)
        vcpu = m.vcpus[0]
        go = threading.Semaphore(0)
        done = threading.Event()
        rng = random.Random(1234)
        delays = [rng.choice((0, 0, 1, 5, 20, 100)) for _ in range(TRIES)]

        def kicker():
            for delay in delays:
                go.acquire()
                if done.is_set():
                    return
                end = time.perf_counter_ns() + delay * 1000  # spin: land at a random point
                while time.perf_counter_ns() < end:
                    pass
                vcpu.kick()

        thread = threading.Thread(target=kicker)
        thread.start()
        lost = []
        try:
            for i in range(TRIES):
                go.release()
                exit = vcpu.run(timeout=2.0)  # the safety net: a lost kick times out
                if not isinstance(exit, IntrExit) or exit.timed_out:
                    lost.append((i, exit))
                    break
        finally:
            done.set()
            go.release()
            thread.join(10)
        assert not lost, f"kick {lost[0][0]} was lost: {lost[0][1]!r}"
        assert not thread.is_alive()
        # No kick was delivered twice either: nothing is left over to end a kick-less run.
        assert vcpu.run(timeout=0.2).timed_out


def test_kicks_never_reach_a_signal_handler_across_runs(kvm, tmp_path):
    """Every Machine.run() with several vCPUs starts new threads, whose ids Python reuses:
    each must still block the kick signal, so no kick is ever delivered to a handler."""
    import signal

    from pyvmm.vcpu import KICK_SIGNAL

    src = spin_payload(tmp_path)
    delivered = []
    previous = signal.signal(KICK_SIGNAL, lambda signum, frame: delivered.append(signum))
    try:
        with Machine(kvm=kvm, vcpus=2) as m:
            m.load(src, start_aps=True)
            for _ in range(5):
                assert m.run(timeout=0.1).stop == "timeout"
    finally:
        signal.signal(KICK_SIGNAL, previous)
    assert delivered == []
