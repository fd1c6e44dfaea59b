# SPDX-License-Identifier: GPL-2.0-or-later
"""The `hello` payload and the runner: console output, done status, exit counts, stop reasons."""

from __future__ import annotations

from pyvmm import exits, guests
from pyvmm.guests import GuestResult, run_loop, ucall

TEXT = "Hello from real mode\n"


def test_hello_prints_and_finishes(kvm):
    r = guests.run("hello", kvm=kvm, timeout=10)
    assert r.stop_reason == "done" and r.status == 0 and r.ok
    assert r.console == TEXT
    assert r.reports == []
    # only port I/O: the console bytes (rep outsb gives one exit per byte or fewer, larger
    # ones; both are valid) and one OUT to the done port
    assert set(r.exits) == {"IoExit"}
    assert isinstance(r.last_exit, exits.IoExit) and r.last_exit.port == ucall.PORT_DONE
    consoles = [e for e in r.events if isinstance(e, ucall.ConsoleOutput)]
    assert b"".join(e.data for e in consoles).decode() == TEXT
    assert r.exits["IoExit"] == len(consoles) + 1
    text = str(r)
    assert text.startswith(TEXT) and "hello: done (status 0)" in text and "IoExit" in text


def test_hello_by_hand(kvm):
    """The building blocks the runner uses: prepare, run, decode; the vCPU really is in real
    mode at the load address."""
    p = guests.build("hello")
    with kvm.create_vm() as vm:
        vcpu = p.prepare(vm, cpuid=kvm.supported_cpuid())
        s = vcpu.get_sregs()
        assert s.cr0 & 1 == 0 and s.cs.base == 0 and s.cs.selector == 0
        assert vcpu.get_regs().rip == p.entry == 0x1000
        assert vm.memory.read(p.load_address, len(p.image)) == p.image
        out = b""
        for _ in range(100):
            ex = vcpu.run(timeout=10)
            ev = ucall.decode(ex, vcpu)
            if isinstance(ev, ucall.ConsoleOutput):
                out += ev.data
            else:
                break
        assert ev == ucall.Done(0)
        assert out.decode() == TEXT
        # RIP is at the OUT to the done port (`outl %eax, $0xeb` = 66 e7 eb) or already past
        # it, at the hlt of the DONE macro: KVM may complete the OUT only on the next KVM_RUN
        # (stock kvm_amd without next-RIP saving does; kvm_pvm skips it before exiting).
        rip = vcpu.get_regs().rip
        at = vm.memory.read(rip, 3)
        assert at == b"\x66\xe7\xeb" or at[:1] == b"\xf4"


def test_timeout_native_loop(kvm, payload_source):
    r = guests.run(payload_source("1: jmp 1b"), kvm=kvm, timeout=0.3)
    assert r.stop_reason == "timeout"
    assert 0.25 < r.elapsed < 5
    assert isinstance(r.last_exit, exits.IntrExit)


def test_timeout_emulated_loop(kvm, payload_source):
    r = guests.run(payload_source(mode="real16", body="1: jmp 1b"), kvm=kvm, timeout=0.3)
    assert r.stop_reason == "timeout"


def test_hlt_ends_a_run(kvm, payload_source):
    r = guests.run(payload_source(mode="real16", body="REPORT $7\nhlt"), kvm=kvm)
    assert r.stop_reason == "hlt" and r.values == [7]
    assert r.exits == {"IoExit": 1, "HltExit": 1}


def test_fail_port(kvm, payload_source):
    r = guests.run(payload_source("movl $0x55, %ebx\nFAIL $0x42", mode="long64"), kvm=kvm)
    assert r.stop_reason == "fail"
    fail = r.events[-1]
    assert isinstance(fail, ucall.Fail) and fail.code == 0x42 and fail.regs["rbx"] == 0x55
    assert "0x42" in r.detail


def test_unhandled_exit_and_handler_stop(kvm, payload_source):
    src = payload_source("movw $0x777, %dx\noutb %al, %dx\noutb %al, %dx\nDONE", mode="long64")
    r = guests.run(src, kvm=kvm)
    assert r.stop_reason == "unhandled" and r.last_exit.port == 0x777

    seen = []

    def handler(ex, vcpu):
        seen.append(ex.port)
        return guests.STOP if len(seen) == 2 else None

    r = guests.run(src, kvm=kvm, handler=handler)
    assert r.stop_reason == "stopped" and seen == [0x777, 0x777]
    assert guests.run(src, kvm=kvm, handler=lambda ex, v: None).ok


def test_max_exits(kvm, payload_source):
    r = guests.run(payload_source("1: PUTC 'x'\njmp 1b", mode="real16"), kvm=kvm, max_exits=5)
    assert r.stop_reason == "max_exits" and r.console == "xxxxx"


def test_run_loop_reuses_a_result(kvm):
    p = guests.build("hello")
    with kvm.create_vm() as vm:
        vcpu = p.prepare(vm)  # CPUID from vcpu.vm.kvm by default
        result = run_loop(vcpu, GuestResult("mine"), timeout=10)
    assert result.ok and result.console == TEXT and result.name == "mine"
