# SPDX-License-Identifier: GPL-2.0-or-later
"""Run one kvm-unit-test: under pyvmm (a `PcPlatform` with the multiboot loader) or, as the
reference, under QEMU with KVM, the way the suite's own x86/run starts QEMU. Both read the
same serial output and the same exit status, so their results compare line for line.

A test prints `PASS: ...`, `FAIL: ...`, `SKIP: ...` lines and `SUMMARY: ...`, then writes its
exit code to the debug-exit port 0xf4, which reports `(code << 1) | 1`: 1 is success, 77 is
"everything skipped", any other odd value a failure. QEMU exits with that value; pyvmm's
platform gives it as `exit_status`.
"""

from __future__ import annotations

import os
import platform as host_platform
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..exits import InternalErrorExit
from .config import KutTest, machine_params
from .cpu import apply_cpu, kernel_emulated, parse_cpu

__all__ = ["STATUSES", "Outcome", "count_lines", "environment", "not_applicable",
           "qemu_command", "run_pyvmm", "run_qemu", "status_from_exit"]

STATUSES = ("PASS", "FAIL", "SKIP", "TIMEOUT", "ERROR")
#: The exit status of a test that skipped everything: (38 << 1) | 1.
SKIP_STATUS = 77

_LINE = re.compile(r"^(PASS|FAIL|SKIP|XFAIL|XPASS|KFAIL): ", re.MULTILINE)


@dataclass
class Outcome:
    """One run of one test. `passed`/`failed`/`skipped` count its PASS (and XFAIL), FAIL
    (and XPASS, KFAIL) and SKIP lines; `reason` says why a test was not run or how it
    ended when the status alone does not."""

    status: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    output: str = ""
    exit_status: int | None = None
    reason: str = ""
    summary: str = ""
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        """The fields `pyvmm kut --json` writes for a run."""
        data = asdict(self)
        return {key: data[key] for key in ("status", "passed", "failed", "skipped",
                                           "seconds", "reason", "exit_status")}


def count_lines(output: str) -> tuple[int, int, int, str]:
    """(passed, failed, skipped, summary line) of a test's serial output."""
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for kind in _LINE.findall(output):
        counts[{"XFAIL": "PASS", "XPASS": "FAIL", "KFAIL": "FAIL"}.get(kind, kind)] += 1
    summary = next((line.strip() for line in output.splitlines()
                    if line.startswith("SUMMARY:")), "")
    return counts["PASS"], counts["FAIL"], counts["SKIP"], summary


def status_from_exit(exit_status: int | None) -> str:
    """A test's status from its debug-exit value ((code << 1) | 1, 8 bits as a process
    exit status); None (no debug-exit write) is a failure: the test never reached exit()."""
    if exit_status is None:
        return "FAIL"
    exit_status &= 0xFF
    if exit_status == 1:
        return "PASS"
    if exit_status == SKIP_STATUS:
        return "SKIP"
    return "FAIL"


def _finish(outcome: Outcome) -> Outcome:
    outcome.passed, outcome.failed, outcome.skipped, outcome.summary = count_lines(
        outcome.output)
    return outcome


def environment(kut_dir: str | os.PathLike, *, target: str) -> bytes:
    """The environment the suite hands a test as its one multiboot module (KEY=value
    lines): the host kernel version, and an ERRATA_<commit>=y for every fix in errata.txt
    that this kernel version has, as scripts/arch-run.bash makes it."""
    release = host_platform.release()
    numbers = [int(n) for n in re.findall(r"\d+", release)[:3]] + [0, 0, 0]
    version, patchlevel, sublevel = numbers[:3]
    lines = [f"TARGET={target}", f"KERNEL_VERSION_STRING={release}",
             f"KERNEL_VERSION={version}", f"KERNEL_PATCHLEVEL={patchlevel}",
             f"KERNEL_SUBLEVEL={sublevel}", "KERNEL_EXTRAVERSION="]
    errata = Path(kut_dir) / "errata.txt"
    if errata.is_file():
        for line in errata.read_text().splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            commit, minimum = (part.strip() for part in line.split(":")[:2])
            found = re.findall(r"\d+", minimum)
            if not commit or len(found) < 2:
                continue
            want = [int(n) for n in found[:3]] + [0]
            if (version, patchlevel, sublevel) >= tuple(want[:3]):
                lines.append(f"ERRATA_{commit}=y")
    return ("\n".join(lines) + "\n").encode()


def not_applicable(test: KutTest, *, explicit: bool = False) -> str:
    """Why the suite's own runner would not run `test` on an x86_64 KVM host ("" when it
    would): another arch, another accelerator, a manual-only test (unless named
    `explicit`ly), a host check that fails."""
    if test.arch and test.arch != "x86_64":
        return f"{test.arch} only"
    if test.accel and test.accel != "kvm":
        return f"{test.accel} only"
    if "nodefault" in test.groups and not explicit:
        return "manual run only (group nodefault)"
    for check in test.check:
        path, _, value = check.partition("=")
        try:
            actual = Path(path).read_text().strip()
        except OSError:
            actual = None
        if actual != value:
            return f"{path} not equal to {value}"
    if test.disabled_if:
        return f"disabled_if: {test.disabled_if}"
    return ""


def _guest_cmdline(test: KutTest) -> str:
    # As QEMU builds a multiboot command line: the kernel's file name, then -append's text.
    kernel = f"x86/{test.file}"
    return " ".join([kernel, *test.args])


def _per_vcpu_cpuid(table: list, apic_id: int) -> list:
    """The CPUID table for one vCPU: its APIC id in leaf 1 EBX[31:24] and the x2APIC id in
    leaves 0xb and 0x1f EDX, as firmware/QEMU present each CPU."""
    import dataclasses

    out = []
    for e in table:
        e = dataclasses.replace(e)
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (apic_id << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
        out.append(e)
    return out


def _insn_bytes(data: tuple[int, ...], shown: int = 8) -> str:
    # An emulation failure with flag 1 carries the bytes KVM fetched at RIP: data[0] the
    # flags, then a u8 length and up to 15 bytes from the low byte of data[1] on.
    if len(data) < 3 or not data[0] & 1:
        return ""
    raw = b"".join(int(word).to_bytes(8, "little") for word in data[1:3])
    size = min(raw[0], len(raw) - 1, shown)
    return f", bytes {raw[1:1 + size].hex(' ')}" if size else ""


def run_pyvmm(kut_dir: str | os.PathLike, test: KutTest, *, timeout: float | None = None,
              explicit: bool = False, console: Callable[[str], None] | None = None,
              platform_hook: Callable | None = None) -> Outcome:
    """Boot `test` on a pyvmm PC platform and report how it ended. `timeout` overrides the
    test's own; `console` receives the serial output as it comes; `platform_hook(pc)` may
    add or instrument devices before the boot."""
    from ..platform import DEFAULT_MEMORY, PcPlatform

    reason = not_applicable(test, explicit=explicit)
    if reason:
        return Outcome("SKIP", reason=reason)
    params = machine_params(test.extra_params)
    spec = parse_cpu(params.cpu)
    unsupported = params.unsupported + spec.unsupported
    if unsupported:
        return Outcome("SKIP", reason="pyvmm cannot honour " + ", ".join(unsupported))
    kernel = Path(kut_dir) / "x86" / test.file
    if not kernel.is_file():
        return Outcome("SKIP", reason=f"test file {kernel} not built")
    limit = test.timeout if timeout is None else timeout
    start = time.perf_counter()
    outcome = Outcome("ERROR")
    try:
        memory = params.memory_size or DEFAULT_MEMORY
        with PcPlatform.create(vcpus=test.smp, memory_size=memory, pit=params.pit) as pc:
            machine = pc.machine
            kvm = machine.kvm
            assert kvm is not None  # an open machine has its Kvm
            table, outcome.notes = apply_cpu(kvm.supported_cpuid(), spec,
                                             emulated=kernel_emulated(kvm))
            outcome.notes += params.notes
            for vcpu in machine.vcpus:
                vcpu.set_cpuid(_per_vcpu_cpuid(table, vcpu.id))
            if console is not None:
                machine.console_sink = lambda data: console(data.decode("utf-8", "replace"))
            if params.devices:
                from .iommu import add_devices

                add_devices(pc, params.devices)
            if platform_hook is not None:
                platform_hook(pc)
            machine.load_multiboot(kernel, cmdline=_guest_cmdline(test),
                                   modules=[(environment(kut_dir, target="pyvmm"), "env")])
            result = pc.run(timeout=limit)
            outcome.output = result.console
            outcome.exit_status = pc.exit_status
            if pc.exit_status is not None:
                outcome.status = status_from_exit(pc.exit_status)
            elif result.stop == "timeout":
                outcome.status, outcome.reason = "TIMEOUT", f"no exit after {limit:g} s"
            elif result.stop == "error":
                outcome.reason = f"pyvmm error: {result.error!r}"
            else:
                outcome.status = "FAIL"
                outcome.reason = f"ended without debug-exit: {result.stop}"
                event = result.event
                if isinstance(event, InternalErrorExit) and event.suberror == 1:
                    rip = machine.vcpus[result.vcpu or 0].get_regs().rip
                    outcome.reason += (f" (KVM's instruction emulator failed at RIP "
                                       f"{rip:#x}{_insn_bytes(event.data)}: "
                                       f"KVM_INTERNAL_ERROR_EMULATION)")
                elif event is not None:
                    outcome.reason += f" ({event})"
    except Exception as err:  # a broken image or device: this test's ERROR, not the run's
        outcome.status, outcome.reason = "ERROR", f"{type(err).__name__}: {err}"
    outcome.seconds = time.perf_counter() - start
    return _finish(outcome)


def qemu_binary() -> str | None:
    """qemu-system-x86_64 on $PATH (or $QEMU), None when absent."""
    return os.environ.get("QEMU") or shutil.which("qemu-system-x86_64")


def _qemu_params(extra_params: str) -> list[str]:
    # -cpu host/max abort on some nested hosts setting IA32_ARCH_CAPABILITIES (MSR 0x10a);
    # without that feature they start, and no x86 test depends on it being visible.
    words = shlex.split(extra_params)
    for i, word in enumerate(words[:-1]):
        if word == "-cpu" and words[i + 1].split(",")[0] in ("host", "max") and \
                "arch-capabilities" not in words[i + 1]:
            words[i + 1] += ",-arch-capabilities"
    return words


def qemu_command(kut_dir: str | os.PathLike, test: KutTest, *, env_file: str,
                 qemu: str = "qemu-system-x86_64") -> list[str]:
    """The QEMU+KVM command line the suite's x86/run would use for `test`."""
    command = [qemu, "--no-reboot", "-nodefaults", "-global",
               "kvm-pit.lost_tick_policy=discard", "-device", "pc-testdev", "-device",
               "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial",
               "stdio", "-device", "pci-testdev", "-machine", "accel=kvm", "-kernel",
               str(Path(kut_dir) / "x86" / test.file), "-smp", str(test.smp)]
    command += _qemu_params(test.extra_params)
    if test.args:
        command += ["-append", " ".join(test.args)]
    return command + ["-initrd", env_file]


def run_qemu(kut_dir: str | os.PathLike, test: KutTest, *, timeout: float | None = None,
             explicit: bool = False, qemu: str | None = None) -> Outcome:
    """Run `test` under QEMU with KVM, as the reference for `run_pyvmm`."""
    reason = not_applicable(test, explicit=explicit)
    if reason:
        return Outcome("SKIP", reason=reason)
    qemu = qemu or qemu_binary()
    if qemu is None:
        return Outcome("ERROR", reason="qemu-system-x86_64 not found (install QEMU or set "
                                       "$QEMU)")
    kernel = Path(kut_dir) / "x86" / test.file
    if not kernel.is_file():
        return Outcome("SKIP", reason=f"test file {kernel} not built")
    limit = test.timeout if timeout is None else timeout
    with tempfile.NamedTemporaryFile(prefix="pyvmm-kut-env-") as env:
        env.write(environment(kut_dir, target="qemu"))
        env.flush()
        command = qemu_command(kut_dir, test, env_file=env.name, qemu=qemu)
        start = time.perf_counter()
        try:
            # Run from the tree, as x86/run does; stdin closed so QEMU never waits on it.
            proc = subprocess.run(command, cwd=kut_dir, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=limit)
        except subprocess.TimeoutExpired as err:
            output = (err.stdout or b"").decode("utf-8", "replace")
            stderr = (err.stderr or b"").decode("utf-8", "replace")
            reason = f"no exit after {limit:g} s"
            internal = re.search(r"KVM internal error\. Suberror: (\d+)", stderr)
            if internal:
                # QEMU pauses the VM on an emulation failure and waits: say what happened.
                reason += (f" (QEMU paused on a KVM internal error, suberror "
                           f"{internal.group(1)})")
            return _finish(Outcome("TIMEOUT", output=output, seconds=time.perf_counter() - start,
                                   reason=reason))
        seconds = time.perf_counter() - start
    output = proc.stdout.decode("utf-8", "replace")
    outcome = Outcome("FAIL", output=output, seconds=seconds, exit_status=proc.returncode)
    errors = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode == 1 and not output.strip():
        # 1 is also how QEMU itself fails (a bad option): nothing ran when nothing was printed
        outcome.status = "ERROR"
        outcome.reason = "QEMU failed to start" + (f": {errors[-1]}" if errors else "")
    elif proc.returncode > 0 and proc.returncode & 1:
        outcome.status = status_from_exit(proc.returncode)
    else:
        outcome.status = "ERROR" if proc.returncode != 0 and not output else "FAIL"
        outcome.reason = (f"QEMU exited with {proc.returncode}"
                          + (f": {errors[-1]}" if errors else ""))
    return _finish(outcome)
