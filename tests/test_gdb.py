# SPDX-License-Identifier: GPL-2.0-or-later
"""The gdb stub, driven by the real gdb in batch mode against the debugme payloads.

Each test loads a payload on a Machine, starts `GdbServer.serve()` in a thread, runs
`gdb -batch` with the payload's ELF (symbols from the toolchain's build) and a list of
commands, then checks both what gdb printed and what the guest computed when it finished
after gdb detached (debugme reports `total`: 55 unless gdb changed something).

kvm_pvm (this project's hosts) single-steps CPL0 code and stops it at debug-register
execution breakpoints, but intercepts no int3, fires no data watchpoint and runs CPL3 code
natively (no breakpoint, no single step there), so gdb's breakpoints live in debug registers
and its watchpoints are software ones (single-stepping). The CPL3 test is skipped by name
here and runs on stock KVM in the nested runner:

    python -m pyvmm.testing.nested -- python -m pytest -q -m stock_kvm tests/test_gdb.py
"""

from __future__ import annotations

import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
from debug_support import need_cpl3_single_step

from pyvmm import Machine
from pyvmm.gdb import DebugSupport, GdbServer, parse_address, probe
from pyvmm.gdb import protocol as p
from pyvmm.gdb.registers import layout, target_xml

GDB_TIMEOUT = 240.0   # the nested runner's TCG makes everything slow


def _gdb() -> str:
    path = shutil.which("gdb")
    if path is None:
        if os.environ.get("PYVMM_REQUIRE_KVM", "") not in ("", "0") or os.environ.get("CI"):
            pytest.fail("gdb is not installed (apt-get install gdb)")
        pytest.skip("gdb is not installed (apt-get install gdb)")
    return path


class Session:
    """One gdb run against one machine: `output` is what gdb printed, `result` the
    RunResult serve() returned, `log` the stub's own lines."""

    def __init__(self, output: str, result, log: list[str]) -> None:
        self.output, self.result, self.log = output, result, log

    @property
    def values(self) -> list[str]:
        """gdb's `$N = value` lines, in order."""
        return re.findall(r"^\$\d+ = (.*)$", self.output, re.MULTILINE)


def run_gdb(machine: Machine, payload, commands: list[str], *, interrupt: bool = False,
            arch: str | None = None, support: DebugSupport | None = None) -> Session:
    """Serve `machine` to `gdb -batch` running `commands`. With `interrupt`, send gdb a
    SIGINT (Ctrl-C) once a vCPU has been running for a moment."""
    gdb = _gdb()
    log: list[str] = []
    server = GdbServer(machine, 0, arch=arch, log=log.append, support=support)
    box: list = []

    def serve() -> None:
        try:
            box.append(server.serve(detach_timeout=GDB_TIMEOUT, accept_timeout=GDB_TIMEOUT))
        except BaseException as err:
            box.append(err)

    thread = threading.Thread(target=serve, name="gdb-stub")
    thread.start()
    argv = server.gdb_command(str(payload.elf_path))
    argv[0:1] = [gdb, "-batch", "-nx", "-ex", "set osabi none"]
    for command in commands:
        argv += ["-ex", command]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if interrupt:
            deadline = time.monotonic() + GDB_TIMEOUT
            while not any(v.running for v in machine.vcpus):
                assert time.monotonic() < deadline, "the guest never started running"
                time.sleep(0.01)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=GDB_TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if not any(line.startswith("gdb connected") for line in log):
            server.close()                      # gdb never came: end the wait for it
        thread.join(GDB_TIMEOUT)
        server.close()
    assert not thread.is_alive(), f"the stub did not end; gdb said:\n{output}"
    result = box[0]
    if isinstance(result, BaseException):
        raise AssertionError(f"the stub failed ({result!r}); gdb said:\n{output}") from result
    return Session(output, result, log)


def _load(name: str, *, vcpus: int = 1, **regs):
    m = Machine(vcpus=vcpus)
    payload = m.load(name, regs=regs, start_aps=vcpus > 1)
    return m, payload


# --------------------------------------------------------------------- the protocol, offline

def test_packet_framing():
    assert p.frame(b"OK") == b"$OK#9a"
    assert p.escape(b"a$b#c}d*") == b"a}\x04b}\x03c}]d}\x0a"
    assert p.unescape(p.escape(bytes(range(256)))) == bytes(range(256))
    reader = p.PacketReader()
    events = list(reader.feed(b"+$g#67\x03$m10"))
    assert events == [p.Ack, p.Packet(b"g"), p.Interrupt]
    assert list(reader.feed(b"00,4#bad-")) == [p.Packet(b"m1000,4", ok=False), p.Nak]
    assert p.hex_le(0x1234, 4) == b"34120000" and p.parse_hex_le(b"34120000") == 0x1234


def test_addresses_and_loopback_only(machine):
    assert parse_address("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert parse_address(":1234") == ("127.0.0.1", 1234)
    assert parse_address(1234) == ("127.0.0.1", 1234)
    assert parse_address("[::1]:9") == ("::1", 9)
    with pytest.raises(ValueError, match="not a number"):
        parse_address("localhost:gdb")
    with pytest.raises(ValueError, match="0..65535"):
        parse_address(70000)
    with pytest.raises(ValueError, match="loopback only"):
        GdbServer(machine, "0.0.0.0:0")
    with pytest.raises(ValueError, match="architecture"):
        GdbServer(machine, 0, arch="arm")


def test_target_descriptions_number_registers_as_gdb_does():
    names64 = [r.name for r in layout("x86-64")]
    assert names64[:18] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + \
        [f"r{i}" for i in range(8, 16)] + ["rip", "eflags"]
    assert names64[names64.index("xmm0"):names64.index("mxcsr")] == [f"xmm{i}" for i in
                                                                      range(16)]
    names32 = [r.name for r in layout("i386")]
    assert names32[:10] == ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip",
                            "eflags"]
    for arch, bfd in (("x86-64", "i386:x86-64"), ("i386", "i386"), ("i8086", "i8086")):
        xml = target_xml(arch)
        assert f"<architecture>{bfd}</architecture>" in xml
        assert xml.count("<reg ") == len(layout(arch))


# ----------------------------------------------------------------------------- with gdb

def test_break_continue_registers_and_detach():
    m, payload = _load("debugme")
    with m:
        s = run_gdb(m, payload, ["p $pc", "break bump", "continue", "p $rcx", "bt 2",
                                 "continue", "p $rcx", "p *(int*)&counter", "p/x $cr3",
                                 "info registers eflags", "delete", "detach"])
    assert "0x1000 <start>" in s.values[0]
    assert "Breakpoint 1, " in s.output and "in bump ()" in s.output
    assert "in loop_top ()" in s.output                       # bt: bump's caller
    assert s.values[1:5] == ["10", "9", "1", "0x88000"]   # counter: bump ran once
    assert "[Inferior 1 (Remote target) detached]" in s.output
    assert s.result.ok and s.result.values == [55]


def test_breakpoints_found_by_single_stepping():
    """The fallback where neither int3 nor debug registers stop the guest (kvm_amd under
    QEMU TCG): the stub continues by single steps and stops at the breakpoint. Chosen here
    by handing the stub a weaker DebugSupport; the steps are real."""
    m, payload = _load("debugme")
    with m:
        s = run_gdb(m, payload, ["break bump", "break finish", "continue", "p $rcx",
                                 "continue", "p $rcx", "delete 1", "continue", "p $pc",
                                 "p *(int*)&total", "detach"],
                    support=DebugSupport(False, False, False))
    assert s.values[:2] == ["10", "9"]
    assert "<finish>" in s.values[2] and s.values[3] == "55"
    assert s.result.ok and s.result.values == [55]
    assert s.result.exits["DebugExit"] > 50          # one per instruction stepped


def test_write_registers_and_memory_change_the_result():
    m, payload = _load("debugme")
    with m:
        s = run_gdb(m, payload, ["break bump", "continue", "set var $rcx = 100",
                                 "set var *(int*)&total = 1000", "p *(int*)&total",
                                 "x/2xw &total", "delete", "detach"])
    assert s.values[0] == "1000"
    assert re.search(rf"^{payload.symbol('total'):#x}:\s+0x000003e8\s+0x00000000", s.output,
                     re.MULTILINE)          # total, then counter (bump has not run yet)
    # bump adds 100, the loop then counts 99..1: 1000 + 5050
    assert s.result.ok and s.result.values == [6050]


def test_stepi_into_the_loop():
    m, payload = _load("debugme")
    bump, loop_top = payload.symbol("bump"), payload.symbol("loop_top")
    with m:
        s = run_gdb(m, payload, ["break loop_top", "continue", "delete", "p $pc", "stepi",
                                 "p $pc", "stepi", "stepi", "stepi", "p $pc", "p $rcx",
                                 "stepi", "stepi", "p $pc", "p $rcx", "x/i $pc", "detach"])
    pcs = [int(re.search(r"0x[0-9a-f]+", v).group(), 16) for v in s.values
           if v.startswith("(void")]
    # loop_top: call bump -> bump's three instructions -> back -> decl; jnz loop_top
    assert pcs == [loop_top, bump, loop_top + 5, loop_top]
    numbers = [v for v in s.values if not v.startswith("(void")]
    assert numbers == ["10", "9"]               # RCX back in loop_top, then after decl
    assert re.search(rf"=> {loop_top:#x} <loop_top>:\s+call", s.output)
    assert s.result.ok and s.result.values == [55]


def test_software_watchpoint_by_single_stepping():
    """Where watchpoints never fire (kvm_pvm), gdb's own watchpoints (stepping, comparing)
    still work: the stub single-steps the emulated CPL0 code."""
    m, payload = _load("debugme")
    with m:
        s = run_gdb(m, payload, ["set can-use-hw-watchpoints 0", "watch *(int*)&counter",
                                 "continue", "continue", "p $rcx", "delete", "detach"])
    assert re.search(r"Watchpoint 1: \*\(int\*\)&counter\s+Old value = 0\s+New value = 1",
                     s.output)
    assert re.search(r"Old value = 1\s+New value = 2", s.output)
    assert s.values[-1] == "9"
    assert s.result.ok and s.result.values == [55]


def test_hardware_watchpoint_where_the_host_fires_them():
    """gdb's default watchpoints are hardware ones (Z2). Where this KVM fires data
    breakpoints (probe) they stop gdb; elsewhere the stub refuses Z2 and gdb says so."""
    m, payload = _load("debugme")
    with m:
        s = run_gdb(m, payload, ["watch *(int*)&counter", "continue", "continue", "p $rcx",
                                 "delete", "detach"])
    if probe().watchpoints_fire:
        assert re.search(r"Hardware watchpoint 1: \*\(int\*\)&counter\s+Old value = 0\s+"
                         r"New value = 1", s.output)
        assert re.search(r"Old value = 1\s+New value = 2", s.output)
        assert s.values[0] == "9"
    else:
        assert "Could not insert hardware watchpoint 1." in s.output
        assert s.values[0] == "0"               # the guest never ran: RCX is still 0
    assert s.result.ok and s.result.values == [55]


@pytest.mark.parametrize("name, arch, pc", [("debugme16", "i8086", "eip"),
                                            ("debugme32", "i386", "eip"),
                                            ("debugme", "i386:x86-64", "rip")])
def test_every_cpu_mode(name, arch, pc):
    m, payload = _load(name)
    with m:
        s = run_gdb(m, payload, ["show architecture", f"info registers {pc}", "break bump",
                                 "continue", "p $ecx", "stepi", "p $pc", "x/i $pc",
                                 "delete", "detach"])
    assert f'currently "{arch}"' in s.output or f'set to "{arch}"' in s.output
    assert re.search(rf"^{pc}\s+0x1000\s+0x1000 <start>", s.output, re.MULTILINE)
    assert s.values[0] == "10"
    assert "<bump+" in s.values[1]
    assert "lock incl" in s.output                # 16/32/64-bit disassembly of bump's 2nd insn
    assert s.result.ok and s.result.values == [55]


@pytest.mark.stock_kvm
def test_cpl3_stepping_and_breakpoint(request):
    """64-bit user mode (CPL3). Stock KVM single-steps it; the breakpoint is a debug
    register, an int3 or found by single steps, whichever this KVM can do (kvm_amd under
    QEMU TCG: single steps)."""
    need_cpl3_single_step(request)
    m, payload = _load("debugme_user")
    with m:
        s = run_gdb(m, payload, ["stepi", "stepi", "stepi", "p $pc", "p $rcx", "p $cs & 3",
                                 "break bump", "continue", "p $pc", "stepi", "x/i $pc",
                                 "delete", "detach"])
    assert "<loop_top>" in s.values[0] and s.values[1:3] == ["10", "3"]
    assert "Breakpoint 1, " in s.output and "<bump>" in s.values[3]
    assert re.search(r"=> 0x[0-9a-f]+ <bump\+8>:\s+lock incl", s.output)
    assert s.result.ok and s.result.values == [55]


def test_each_vcpu_is_a_thread():
    m, payload = _load("debugme", vcpus=2)
    with m:
        s = run_gdb(m, payload, ["info threads", "break bump", "continue", "delete",
                                 "thread 1", "p $rcx", "thread 2", "p $rcx",
                                 "thread apply all p $rsp", "detach"])
    assert re.search(r"Thread 1 \(vCPU 0\)", s.output)
    assert re.search(r"Thread 2 \(vCPU 1\)", s.output)
    assert "[Switching to thread 2" in s.output
    # Each vCPU has its own stack (the host starts AP n 0x1000 lower) and its own RCX.
    stacks = re.findall(r"\$\d+ = \(void \*\) (0x[0-9a-f]+)", s.output)
    assert len(set(stacks)) == 2
    assert s.result.ok
    # Both vCPUs add 55 with `lock`: the last of the two reports sees 110.
    assert max(s.result.values) == 110 and len(s.result.values) == 2


@pytest.mark.parametrize("name", ["debugme", "debugme_user"])
def test_ctrl_c_a_spinning_guest_then_release_it(name):
    """ESI=1: the guest spins until `release` is set. gdb's Ctrl-C stops it (a kick), gdb
    sets `release`, detaches, and the guest finishes with its result."""
    m, payload = _load(name, rsi=1)
    with m:
        s = run_gdb(m, payload, ["continue", "info symbol $pc", "p *(int*)&release",
                                 "set var *(int*)&release = 1", "detach"], interrupt=True)
    assert "Program received signal SIGINT" in s.output
    assert re.search(r"^spin( \+ \d+)? in section \.text", s.output, re.MULTILINE)
    assert s.values[0] == "0"
    assert s.result.ok and s.result.values == [55]


def test_kill_leaves_the_guest_unfinished():
    m, payload = _load("debugme")
    with m:
        s = run_gdb(m, payload, ["break bump", "continue", "kill"])
    assert "[Inferior 1 (Remote target) killed]" in s.output
    assert s.result.stop == "stopped" and s.result.values == []
    assert any("killed" in line for line in s.log)


def test_modes_payload_under_gdb_cli(tmp_path):
    """`pyvmm run modes --gdb`: the CLI prints the gdb command line; gdb stops the guest in
    32-bit and 64-bit code it reached on its own, and the guest ends with its four reports."""
    _gdb()
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm.cli", "run", "modes", "--gdb",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        banner = proc.stderr.readline() + proc.stderr.readline()
        command = re.search(r"^  (gdb .*)$", banner, re.MULTILINE).group(1)
        assert "set architecture i8086" in command
        argv = shlex.split(command)
        argv[1:1] = ["-batch", "-nx", "-ex", "set osabi none"]
        argv += ["-ex", "break prot32", "-ex", "break long64", "-ex", "continue",
                 "-ex", "p/x $cr0", "-ex", "continue", "-ex", "p/x $efer", "-ex", "detach"]
        gdb = subprocess.run(argv, capture_output=True, text=True, timeout=GDB_TIMEOUT)
        out, err = proc.communicate(timeout=GDB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "in prot32 ()" in gdb.stdout and "in long64 ()" in gdb.stdout
    assert re.findall(r"^\$\d+ = (.*)$", gdb.stdout, re.MULTILINE) == ["0x60000011", "0x500"]
    assert "report 0x12a06b550 (5000050000) tag 0x3" in out
    assert proc.returncode == 0
