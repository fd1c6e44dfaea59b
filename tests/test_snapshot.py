# SPDX-License-Identifier: GPL-2.0-or-later
"""Machine.snapshot(path) / Machine.restore(path): a guest stopped mid-computation (every
mode, CPL0 and CPL3, SMP with the in-kernel irqchip and PIT) is written to a file and finishes,
in a new machine of this process or of another one, with the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from helpers import code, real_mode
from test_state import lcg_expected

from pyvmm import IoEventAddress, Machine
from pyvmm.snapshot import read_header
from pyvmm.testing.hostinfo import kvm_module

# Also run on stock kvm_amd by CI's nested runner (pytest -m both_kvms).
pytestmark = pytest.mark.both_kvms


def _reports(result) -> dict[int, int]:
    return {r.tag: r.value64 for r in result.reports}


def test_cpl3_mid_loop_with_sse(kvm, tmp_path):
    steps = 60_000_000
    with Machine(kvm=kvm) as m:
        m.load("state_user", regs={"rcx": steps})
        straight = m.run(timeout=30)
    assert straight.ok
    with Machine(kvm=kvm) as m:
        m.load("state_user", regs={"rcx": steps})
        first = m.run(timeout=0.02)
        assert first.stop == "timeout" and not first.reports
        m.snapshot(tmp_path / "s.snap")
    with Machine.restore(tmp_path / "s.snap", kvm=kvm) as m2:
        rest = m2.run(timeout=30)
    assert rest.ok and _reports(rest) == _reports(straight) and len(rest.reports) == 4


def test_cpl0_mid_loop(kvm, tmp_path):
    steps = 3000 if kvm_module() == "kvm_pvm" else 300_000
    with Machine(kvm=kvm) as m:
        m.load("state", regs={"rcx": steps})
        first = m.run(timeout=0.005)
        assert first.stop == "timeout"
        m.snapshot(tmp_path / "s.snap")
    with Machine.restore(tmp_path / "s.snap", kvm=kvm) as m2:
        rest = m2.run(timeout=30)
    # A late timeout (TCG in the nested runner) may stop it after its reports: they count.
    assert rest.ok and _reports(first) | _reports(rest) == lcg_expected(steps)


@pytest.mark.parametrize("stop_after", [3, 9, 16, 24])
def test_every_mode_stopped_after_console_output(kvm, tmp_path, stop_after):
    """modes.S prints as it climbs real16 -> prot32 -> long64 -> CPL3; the machine is stopped
    right after its `stop_after`-th console byte (an OUT whose I/O is not complete yet)."""
    with Machine(kvm=kvm) as m:
        m.load("modes")
        straight = m.run(timeout=30)
    assert straight.ok
    with Machine(kvm=kvm) as m:
        m.load("modes")
        seen = []

        def sink(data: bytes) -> None:
            seen.append(data)
            if len(seen) == stop_after:
                m.stop()
        m.console_sink = sink
        first = m.run(timeout=30)
        assert first.stop == "stopped"
        m.snapshot(tmp_path / "s.snap")
    with Machine.restore(tmp_path / "s.snap", kvm=kvm) as m2:
        rest = m2.run(timeout=30)
    assert rest.ok
    assert first.console + rest.console == straight.console
    assert first.values + rest.values == straight.values


PORT, TAG_SHARE, TAG_TOTAL = 0x600, 0x51, 0x52


def _smp_machine(kvm, n):
    m = Machine(kvm=kvm, vcpus=n, irqchip=True, serial=False)
    m.vm.create_pit()
    return m


@pytest.mark.parametrize("sipi", [False, True], ids=["host-started", "init-sipi"])
def test_smp_with_irqchip_and_pit(kvm, tmp_path, sipi):
    """Two vCPUs adding into shared memory with `lock`, each ringing its doorbell per term;
    stopped by a doorbell callback mid-sum, snapshotted, restored, finished: the sum, each
    vCPU's share and each doorbell's count (before + after) are exact."""
    n, k = 2, 20000          # long enough that the stop lands mid-sum even under load
    regs = {"rdi": n, "rsi": k, "r8": PORT, "r9": 1 if sipi else 0}
    m = _smp_machine(kvm, n)
    with m:
        stop_once = threading.Event()

        def ring(bell, count):
            if bell.count >= 50 and not stop_once.is_set():
                stop_once.set()
                m.stop()
        bells = [m.doorbell(IoEventAddress.pio(PORT), length=4, datamatch=i, callback=ring)
                 for i in range(n)]
        if sipi:
            m.load("smp", regs=regs)
        else:
            m.load("smp", regs=regs, start_aps=True, vcpu_regs=lambda i: {"r10": i})
        first = m.run(timeout=60)
        assert first.stop == "stopped" and not first.reports, first
        before = [b.count for b in bells]
        header = m.snapshot(tmp_path / "smp.snap")
        pit = m.vm.get_pit()
    assert header["irqchip"] and header["pit"] and len(header["vcpu_states"]) == n
    restored_bells = []

    def setup(machine):
        restored_bells.extend(machine.doorbell(IoEventAddress.pio(PORT), length=4,
                                               datamatch=i) for i in range(n))
    with Machine.restore(tmp_path / "smp.snap", kvm=kvm, setup=setup) as m2:
        assert [dict(c, count_load_time=0) for c in m2.vm.get_pit().to_dict()["channels"]] \
            == [dict(c, count_load_time=0) for c in pit.to_dict()["channels"]]
        rest = m2.run(timeout=60)
        assert rest.ok, rest
        shares = {r.rcx: r.value64 for r in rest.reports if r.tag == TAG_SHARE}
        totals = [r for r in rest.reports if r.tag == TAG_TOTAL]
        assert shares == {i: sum(range(i + 1, k + 1, n)) for i in range(n)}
        assert totals[0].value64 == k * (k + 1) // 2 and totals[0].rcx == k
        for i in range(n):
            assert before[i] + restored_bells[i].count == len(range(i + 1, k + 1, n))


def test_restore_in_another_process(kvm, tmp_path):
    steps = 40_000_000
    path = tmp_path / "s.snap"
    with Machine(kvm=kvm) as m:
        m.load("state_user", regs={"rcx": steps})
        assert m.run(timeout=0.02).stop == "timeout"
        m.snapshot(path)
        m.run(timeout=30)  # the original goes on too: it must not disturb the copy
    script = ("import json, sys\nfrom pyvmm import Machine\n"
              "with Machine.restore(sys.argv[1]) as m:\n"
              "    r = m.run(timeout=30)\n"
              "    print(json.dumps({'stop': r.stop, 'status': r.status,\n"
              "                      'reports': {r.tag: r.value64 for r in r.reports}}))\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    with Machine(kvm=kvm) as m:
        m.load("state_user", regs={"rcx": steps})
        straight = m.run(timeout=30)
    assert got["stop"] == "done" and got["status"] == 0
    assert {int(k): v for k, v in got["reports"].items()} == _reports(straight)


class Register:
    """A device with state: one 4-byte register the guest writes and reads back."""

    def __init__(self) -> None:
        self.value = 0

    def read(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(4, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.value = int.from_bytes(data, "little")

    def save_state(self) -> dict:
        return {"value": self.value}

    def load_state(self, state: dict) -> None:
        self.value = int(state["value"])


def test_device_state_protocol(kvm, tmp_path):
    """The guest writes 0x5050 to the device, the machine is snapshotted; the restored guest
    reads it back from the restored device and reports it."""
    image = code("""
        mov $0x700, %dx
        mov $0x5050, %eax
        out %eax, %dx
        out %al, $0x80          # the host stops here (its own port)
        in %dx, %eax
        out %eax, $0xea         # report
        xor %eax, %eax
        out %eax, $0xeb         # done
    """)
    path = tmp_path / "dev.snap"
    with Machine(kvm=kvm) as m:
        m.add_memory(0, 0x10000)
        m.memory.write(0x1000, image)
        real_mode(m.vcpus[0])
        dev = Register()
        m.pio.register(0x700, 4, dev)

        class Stopper:
            def read(self, offset, size):
                return bytes(size)

            def write(self, offset, data):
                m.stop()
        m.pio.register(0x80, 1, Stopper())
        assert m.run(timeout=10).stop == "stopped"
        assert dev.value == 0x5050
        header = m.snapshot(path)
    assert header["devices"] == [{"bus": "pio", "base": 0x700, "length": 4,
                                  "type": f"{__name__}.Register", "state": {"value": 0x5050}}]
    fresh = Register()
    with Machine.restore(path, kvm=kvm, setup=lambda mm: mm.pio.register(0x700, 4, fresh)) \
            as m2:
        result = m2.run(timeout=10)
    assert result.ok and result.values == [0x5050] and fresh.value == 0x5050
    with pytest.raises(ValueError, match="register it in setup"):
        Machine.restore(path, kvm=kvm)
    with Machine.restore(path, kvm=kvm, strict=False) as m3:
        assert m3.run(timeout=10).values == [0xFFFFFFFF]   # no device: the IN floats high


def test_idle_memory_is_left_out_and_bad_files_are_refused(kvm, tmp_path):
    path = tmp_path / "big.snap"
    with Machine(kvm=kvm, memory_size=64 << 20) as m:
        m.load("hello")
        assert m.run(timeout=10).ok
        m.snapshot(path)
    assert os.path.getsize(path) < 2 << 20                   # 64 MiB of RAM, mostly zero
    header, start = read_header(path)
    assert header["regions"][0]["size"] == 64 << 20 and start % 4096 == 0
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"not a snapshot at all")
    with pytest.raises(ValueError, match="not a pyvmm snapshot"):
        Machine.restore(bad, kvm=kvm)
    data = path.read_bytes()
    (tmp_path / "cut.snap").write_bytes(data[:start + 100])
    with pytest.raises(ValueError, match="truncated"):
        Machine.restore(tmp_path / "cut.snap", kvm=kvm)
    (tmp_path / "damaged.snap").write_bytes(data[:40] + b"\xff" * 20 + data[60:])
    with pytest.raises(ValueError):
        Machine.restore(tmp_path / "damaged.snap", kvm=kvm)


def test_ap_with_init_and_sipi_still_pending(kvm, tmp_path):
    """Only the BSP runs: it sends INIT-SIPI-SIPI and waits for the AP at the start barrier.
    The AP never ran, so KVM still holds the INIT and SIPI as pending events when the machine
    is saved; restored, the AP must start at the SIPI vector (and not wait for a SIPI again,
    which is what a state that re-latches the INIT would make it do)."""
    n, k = 2, 200
    with _smp_machine(kvm, n) as m:
        m.load("smp", regs={"rdi": n, "rsi": k, "r8": PORT, "r9": 1})
        first = m.run(timeout=0.5, vcpus=[0])
        assert first.stop == "timeout" and not first.reports
        m.snapshot(tmp_path / "sipi.snap")
    with Machine.restore(tmp_path / "sipi.snap", kvm=kvm) as m2:
        rest = m2.run(timeout=60)
    assert rest.ok, rest
    assert [r.value64 for r in rest.reports if r.tag == TAG_TOTAL] == [k * (k + 1) // 2]
