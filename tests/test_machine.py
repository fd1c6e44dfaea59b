"""Machine: loading payloads, run results, stop reasons, clean shutdown."""

from __future__ import annotations

import gc
import os
import threading
import time

import psutil
from helpers import spin_payload

from pyvmm import Machine


def test_result_carries_console_reports_and_exit_counts(machine):
    machine.load("modes")
    result = machine.run(timeout=10)
    assert result.ok, result
    assert result.values[:2] == [5050, 479001600]
    assert result.reports[2].value64 == 2432902008176640000
    assert result.exits["IoExit"] == sum(result.exits.values())
    assert "real16" in result.console


def test_timeout_stops_a_spinning_guest(machine, tmp_path):
    machine.load(spin_payload(tmp_path))
    started = time.monotonic()
    result = machine.run(timeout=0.3)
    assert result.stop == "timeout"
    assert time.monotonic() - started < 5


def test_stop_from_another_thread(machine, tmp_path):
    machine.load(spin_payload(tmp_path))
    threading.Timer(0.2, machine.stop).start()
    assert machine.run(timeout=30).stop == "stopped"


def test_stop_carries_a_status(machine, tmp_path):
    machine.load(spin_payload(tmp_path))
    threading.Timer(0.1, lambda: machine.stop("done", status=3)).start()
    result = machine.run(timeout=30)
    assert (result.stop, result.status, result.ok) == ("done", 3, False)


MMIO_READ = """
    movl $0xd0000000, %edi
    movl (%rdi), %eax
    REPORT_RAX
    DONE
"""


def test_unhandled_exit_stops_with_the_exit_and_handlers_serve_it(kvm, payload_source):
    src = payload_source(MMIO_READ, mode="long64")
    with Machine(kvm=kvm) as m:
        m.load(src)
        m.mmio.register(0xD0000000, 4, _Const(0x12345678))
        result = m.run(timeout=10)
        assert result.ok and result.values == [0x12345678]
    with Machine(kvm=kvm) as m:
        m.load(src)
        # No device: the unclaimed policy answers all ones.
        result = m.run(timeout=10)
        assert result.ok and result.values == [0xFFFFFFFF]
        assert m.mmio.unclaimed_reads == 1


class _Const:
    def __init__(self, value):
        self.value = value

    def read(self, offset, size):
        return self.value.to_bytes(4, "little")[:size]

    def write(self, offset, data):
        pass


def test_device_exception_ends_the_run_with_the_error(machine):
    class Broken:
        def read(self, offset, size):
            raise ZeroDivisionError("model bug")

        def write(self, offset, data):
            raise ZeroDivisionError("model bug")

    payload = machine.load("pio")
    machine.pio.register(payload.symbol("PIO_PORT"), 4, Broken())
    result = machine.run(timeout=10)
    assert result.stop == "error"
    assert isinstance(result.error, ZeroDivisionError)
    assert result.vcpu == 0


def test_close_releases_fds_and_threads(kvm):
    from pyvmm import IoEventAddress

    proc = psutil.Process()
    fds = threads = None
    for i in range(6):
        if i == 1:  # after a warm-up cycle has started pyvmm's one-off helper threads
            gc.collect()
            fds, threads = proc.num_fds(), threading.active_count()
        with Machine(kvm=kvm, irqchip=True) as m:
            m.doorbell(IoEventAddress.pio(0x510), length=1)
            m.interrupt(5)
            m.load("hello")
            assert m.run(timeout=10).ok
    gc.collect()
    assert proc.num_fds() <= fds
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= threads
    assert os.path.exists("/dev/kvm")


def test_stop_before_run_ends_the_next_run(machine, tmp_path):
    machine.load(spin_payload(tmp_path))
    machine.stop()
    started = time.monotonic()
    assert machine.run(timeout=10).stop == "stopped"
    assert time.monotonic() - started < 2
    assert machine.run(timeout=0.2).stop == "timeout"   # that stop was used up


def test_result_does_not_keep_the_vm_alive(kvm):
    def kvm_fds():
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                if "kvm-" in os.readlink(f"/proc/self/fd/{fd}"):
                    out.add(fd)
            except OSError:
                pass
        return out

    before = kvm_fds()
    with Machine(kvm=kvm) as m:
        m.load("hello")
        result = m.run(timeout=10)
    assert result.ok and result.last_exit.port == 0xEB
    assert bytes(result.last_exit.data) == bytes(4)     # detached, still readable
    assert kvm_fds() <= before
