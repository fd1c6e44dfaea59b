# SPDX-License-Identifier: GPL-2.0-or-later
"""Typed exits from real guests: port I/O (single and string), MMIO, HLT, shutdown, and a
read-only memslot. Every test checks what the guest computed or stored, not only the exit."""

from __future__ import annotations

from helpers import LOAD, code, expect, guest, protected_mode, run_to

from pyvmm import exits
from pyvmm.exits import ExitReason


def test_out_1_2_4_bytes(vm):
    vcpu = guest(vm, """
        mov $0x12, %al
        out %al, $0x10
        mov $0x3456, %ax
        out %ax, $0x11
        mov $0x789abcde, %eax
        out %eax, $0x12
        mov $0x3f8, %dx
        mov $0x21, %al
        out %al, (%dx)
        hlt
    """)
    want = [(0x10, 1, b"\x12"), (0x11, 2, b"\x56\x34"), (0x12, 4, b"\xde\xbc\x9a\x78"),
            (0x3F8, 1, b"!")]
    for port, size, data in want:
        ex = expect(vcpu, exits.IoExit)
        assert (ex.port, ex.size, ex.count, ex.is_write) == (port, size, 1, True)
        assert bytes(ex.data) == data
        assert ex.value == int.from_bytes(data, "little")
        assert ex.exit_reason == ExitReason.IO == 2
    expect(vcpu, exits.HltExit)


def test_in_1_2_4_bytes_reach_the_guest(vm):
    vcpu = guest(vm, """
        in $0x20, %al
        mov %eax, %ebx
        in $0x22, %ax
        mov %eax, %ecx
        in $0x24, %eax
        mov %eax, %esi
        hlt
    """, rax=0xFFFFFFFF)
    for port, size, value in ((0x20, 1, 0xAB), (0x22, 2, 0xCDEF), (0x24, 4, 0x01234567)):
        ex = expect(vcpu, exits.IoExit)
        assert (ex.port, ex.size, ex.count, ex.is_write) == (port, size, 1, False)
        assert len(ex.data) == size and not ex.data.readonly
        ex.data[:] = value.to_bytes(size, "little")
    expect(vcpu, exits.HltExit)
    regs = vcpu.get_regs()
    # IN AL replaces only the low byte, IN AX the low word.
    assert regs.rbx & 0xFFFFFFFF == 0xFFFFFFAB
    assert regs.rcx & 0xFFFFFFFF == 0xFFFFCDEF
    assert regs.rsi & 0xFFFFFFFF == 0x01234567


def test_rep_outsb(vm):
    """docs/HOSTS.md: on kvm_pvm `rep outsb` of 5 bytes is 5 exits of count 1; stock KVM may batch
    them (count > 1). Either way the bytes, their order and the final registers agree."""
    vm.add_memory(0, 0x10000)
    vm.memory.write(0x2000, b"hello")
    vcpu = guest(vm, """
        mov $0x2000, %si
        mov $5, %cx
        mov $0xe9, %dx
        cld
        rep outsb
        hlt
    """)
    got, counts = [], []

    def record(ex):
        # ex.data points into kvm_run and is only valid until the next run(): copy it now.
        assert isinstance(ex, exits.IoExit)
        assert (ex.port, ex.size, ex.is_write) == (0xE9, 1, True)
        assert len(ex.data) == ex.size * ex.count
        got.append(bytes(ex.data))
        counts.append(ex.count)

    run_to(vcpu, exits.HltExit, handler=record)
    assert b"".join(got) == b"hello"
    assert sum(counts) == 5
    regs = vcpu.get_regs()
    assert regs.rcx & 0xFFFF == 0 and regs.rsi & 0xFFFF == 0x2005


def test_rep_insw(vm):
    """`rep insw` of 3 words (docs/HOSTS.md: one exit, count 3, 6 bytes): what the host puts in the
    buffer lands in guest memory, in order."""
    vcpu = guest(vm, """
        mov $0x3000, %di
        mov $3, %cx
        mov $0x22, %dx
        cld
        rep insw
        hlt
    """)
    words = iter(range(0x1111, 0x10000, 0x1111))
    supplied = []

    def fill(ex):
        assert isinstance(ex, exits.IoExit)
        assert (ex.port, ex.size, ex.is_write) == (0x22, 2, False)
        assert len(ex.data) == 2 * ex.count
        for i in range(ex.count):
            w = next(words)
            supplied.append(w)
            ex.data[2 * i: 2 * i + 2] = w.to_bytes(2, "little")

    _, seen = run_to(vcpu, exits.HltExit, handler=fill)
    assert sum(ex.count for ex in seen) == 3
    assert supplied == [0x1111, 0x2222, 0x3333]
    assert vm.memory.read(0x3000, 8) == bytes.fromhex("111122223333") + b"\0\0"
    regs = vcpu.get_regs()
    assert regs.rcx & 0xFFFF == 0 and regs.rdi & 0xFFFF == 0x3006


def test_mmio_stores_and_loads(vm):
    vm.add_memory(0, 0x8000)             # 0x8000.. is not backed: MMIO
    vcpu = guest(vm, """
        movb $0x5a, 0x9000
        movw $0x1234, 0x9002
        movl $0xdeadbeef, 0x9004
        movb 0x9010, %bl
        movw 0x9012, %cx
        movl 0x9014, %edx
        movl %edx, 0x4000        # into RAM, for the host to check
        hlt
    """, mem_size=0x8000)
    for addr, data in ((0x9000, b"\x5a"), (0x9002, b"\x34\x12"), (0x9004, b"\xef\xbe\xad\xde")):
        ex = expect(vcpu, exits.MmioExit)
        assert (ex.address, ex.length, ex.is_write) == (addr, len(data), True)
        assert bytes(ex.data) == data and ex.value == int.from_bytes(data, "little")
    for addr, value in ((0x9010, b"\xa5"), (0x9012, b"\x0d\xf0"), (0x9014, b"\x78\x56\x34\x12")):
        ex = expect(vcpu, exits.MmioExit)
        assert (ex.address, ex.length, ex.is_write) == (addr, len(value), False)
        ex.data[:] = value
    expect(vcpu, exits.HltExit)
    regs = vcpu.get_regs()
    assert (regs.rbx & 0xFF, regs.rcx & 0xFFFF, regs.rdx & 0xFFFFFFFF) == (
        0xA5, 0xF00D, 0x12345678)
    assert vm.memory.read(0x4000, 4) == b"\x78\x56\x34\x12"


def test_hlt_exit_leaves_rip_after_the_hlt(vm):
    vcpu = guest(vm, "nop\nnop\nhlt\nhlt")
    expect(vcpu, exits.HltExit)
    assert vcpu.get_regs().rip == LOAD + 3
    ex = expect(vcpu, exits.HltExit)          # the second HLT: the guest continued
    assert vcpu.get_regs().rip == LOAD + 4
    assert ex == exits.HltExit() and ex.exit_reason == ExitReason.HLT


def test_triple_fault_is_shutdown(vm):
    """32-bit protected mode with an empty IDT: #UD cannot be delivered, #GP neither, #DF
    neither: triple fault, KVM_EXIT_SHUTDOWN."""
    vm.add_memory(0, 0x10000)
    vm.memory.write(LOAD, code("mov $0x42, %eax\nout %al, $0x10\nud2", bits=32))
    vcpu = vm.create_vcpu()
    protected_mode(vcpu, idt_limit=0)
    assert expect(vcpu, exits.IoExit).data == b"\x42"   # the guest ran up to the fault
    ex = expect(vcpu, exits.ShutdownExit, timeout=5)
    assert ex.exit_reason == ExitReason.SHUTDOWN == 8
    # (No register check after it: on AMD, KVM reinitialises the VMCB after a shutdown.)


def test_readonly_slot(vm):
    vm.add_memory(0, 0x8000)
    rom = vm.add_memory(0x8000, 0x1000, readonly=True)
    vm.memory.write(0x8000, b"\x11\x22\x33\x44\x55\x66\x77\x88")   # the host may fill it
    vcpu = guest(vm, """
        movl 0x8000, %ebx        # reads: no exit
        movl 0x8004, %ecx
        movl $0xcafebabe, 0x8004 # write: MMIO exit, memory unchanged
        movl 0x8004, %edx        # still the old value
        hlt
    """, mem_size=0x8000)
    ex = expect(vcpu, exits.MmioExit)
    assert (ex.address, ex.length, ex.is_write) == (0x8004, 4, True)
    assert bytes(ex.data) == b"\xbe\xba\xfe\xca"
    expect(vcpu, exits.HltExit)
    regs = vcpu.get_regs()
    assert regs.rbx & 0xFFFFFFFF == 0x44332211
    assert regs.rcx & 0xFFFFFFFF == 0x88776655
    assert regs.rdx & 0xFFFFFFFF == 0x88776655
    assert vm.memory.read(0x8000, 8) == b"\x11\x22\x33\x44\x55\x66\x77\x88"
    assert rom.readonly


def test_exit_reasons_enum():
    assert ExitReason.IO == 2 and ExitReason.MMIO == 6 and ExitReason.X86_RDMSR == 29
    assert exits.IntrExit(True).exit_reason == ExitReason.INTR == 10
    assert repr(exits.IntrExit(True)) == "IntrExit(timed_out=True)"
    assert exits.UnknownExit(1234).exit_reason == 1234


def test_exit_data_outlives_the_vcpu(kvm):
    """An exit's data view keeps the kvm_run mapping alive: reading it after the VM (and its
    vCPU) closed returns the bytes instead of touching unmapped memory."""
    vm = kvm.create_vm()
    vcpu = guest(vm, "mov $0x77, %al\nout %al, $0x10\nhlt")
    ex = expect(vcpu, exits.IoExit)
    vm.close()
    assert vcpu.closed
    assert bytes(ex.data) == b"\x77"
