# SPDX-License-Identifier: GPL-2.0-or-later
"""The host side of the guest port protocol ("ucall", after the kernel selftests' idea).

A guest talks to the host with OUT instructions to five ports (``guests/pyvmm.inc`` has the
guest side: macros PUTC, PUTS, REPORT, REPORT_RAX, FAIL, DONE):

==========  ==========================================================================
port        meaning
==========  ==========================================================================
``0xE9``    console: the bytes written (``outb``, or ``rep outsb``) are console output
``0xEA``    report: the 32-bit value written (EAX); the host also captures the general
            registers, so a guest reports several values at once (RBX is by convention
            a tag; RAX has all 64 bits in long mode)
``0xEB``    done: the guest has finished, EAX = status (0 = success)
``0xEC``    fail: a check in the guest failed, EAX = a code; registers are captured
``0xED``    fault: an exception reached the host's stubs (long modes): EAX = vector,
            RBX = error code, RCX = RIP of the faulting instruction, RDX = CR2
==========  ==========================================================================

:func:`decode` turns an exit into one of the events :class:`ConsoleOutput`, :class:`Report`,
:class:`Done`, :class:`Fail`, :class:`Fault`, or ``None`` when the exit is not a ucall, so a
device loop can try it first and fall through to its own dispatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .exits import IoExit

__all__ = [
    "EXCEPTION_NAMES",
    "PORTS",
    "PORT_CONSOLE",
    "PORT_DONE",
    "PORT_FAIL",
    "PORT_FAULT",
    "PORT_REPORT",
    "ConsoleOutput",
    "Done",
    "Event",
    "Fail",
    "Fault",
    "Report",
    "capture_regs",
    "outcome",
    "decode",
]

PORT_CONSOLE = 0xE9
PORT_REPORT = 0xEA
PORT_DONE = 0xEB
PORT_FAIL = 0xEC
PORT_FAULT = 0xED
PORTS = frozenset({PORT_CONSOLE, PORT_REPORT, PORT_DONE, PORT_FAIL, PORT_FAULT})

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")

EXCEPTION_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP",
}


@dataclass(frozen=True)
class ConsoleOutput:
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Report:
    """A value reported on port 0xEA, with the registers at the OUT."""

    value: int
    regs: Mapping[str, int] = field(default_factory=dict, compare=False)

    @property
    def tag(self) -> int:
        """EBX, the conventional tag of a report."""
        return self.regs.get("rbx", 0) & 0xFFFFFFFF

    @property
    def value64(self) -> int:
        """All of RAX (a long-mode guest's 64-bit value)."""
        return self.regs.get("rax", self.value)

    def __getattr__(self, name: str) -> int:
        regs = self.__dict__.get("regs", {})
        if name in regs:
            return regs[name]
        raise AttributeError(name)

    def __str__(self) -> str:
        wide = self.value64
        shown = wide if wide >> 32 and wide & 0xFFFFFFFF == self.value else self.value
        return f"report {shown:#x} ({shown}) tag {self.tag:#x}"


@dataclass(frozen=True)
class Done:
    status: int

    def __str__(self) -> str:
        return f"done, status {self.status}"


@dataclass(frozen=True)
class Fail:
    code: int
    regs: Mapping[str, int] = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        return f"guest check failed, code {self.code:#x} at rip {self.regs.get('rip', 0):#x}"


@dataclass(frozen=True)
class Fault:
    """An exception taken in a long-mode guest, reported by the host-installed stubs."""

    vector: int
    error_code: int
    rip: int
    cr2: int

    @property
    def name(self) -> str:
        return EXCEPTION_NAMES.get(self.vector, f"vector {self.vector}")

    def __str__(self) -> str:
        s = f"guest exception {self.name} (error code {self.error_code:#x}) at rip {self.rip:#x}"
        return s + (f", cr2 {self.cr2:#x}" if self.vector == 14 else "")


Event = ConsoleOutput | Report | Done | Fail | Fault


def outcome(event: Event) -> tuple[str, int | None] | None:
    """How an event ends a run: ("done", status), ("fail", code) or ("fault", None); None
    for console output and reports, which do not (what the run loop asks)."""
    if isinstance(event, Done):
        return "done", event.status
    if isinstance(event, Fail):
        return "fail", event.code
    if isinstance(event, Fault):
        return "fault", None
    return None


def capture_regs(vcpu: Any) -> dict[str, int]:
    r = vcpu.get_regs()
    return {name: int(getattr(r, name)) for name in REG_NAMES}


def decode(exit: Any, vcpu: Any = None) -> Event | None:
    """The ucall event of ``exit``, or ``None`` if it is not one.

    ``vcpu`` is needed for reports, fails and faults (their registers are read); without it
    their ``regs`` are empty and a fault's details are zero.
    """
    if not isinstance(exit, IoExit) or exit.port not in PORTS or not exit.is_write:
        return None
    port = exit.port
    data = bytes(exit.data)
    if port == PORT_CONSOLE:
        return ConsoleOutput(data)
    size = exit.size or len(data)
    value = int.from_bytes(data[:size], "little")
    if port == PORT_DONE:
        return Done(value)
    regs = capture_regs(vcpu) if vcpu is not None else {}
    if port == PORT_REPORT:
        return Report(value, regs)
    if port == PORT_FAIL:
        return Fail(value, regs)
    return Fault(value, regs.get("rbx", 0), regs.get("rcx", 0), regs.get("rdx", 0))
