# SPDX-License-Identifier: GPL-2.0-or-later
"""Run a command on stock KVM: a Debian kernel booted under QEMU TCG with kvm_amd loaded.

This host's /dev/kvm is kvm_pvm, which has no SMM and sends no hypercalls to userspace. QEMU's
software CPU emulates AMD SVM, so a stock kernel booted under ``-accel tcg -cpu max`` loads
``kvm_amd`` and its /dev/kvm has both. The guest mounts the host's root read-only over 9p,
the project checkout read-write, chroots into the host filesystem and runs the command there
with the host's own Python, so the installed packages are the ones the host has.

Command line (also ``pyvmm nested``)::

    python -m pyvmm.testing.nested [options] [-- command ...]
    python -m pyvmm.testing.nested --check-skips LOCAL.json NESTED.json
    python -m pyvmm.testing.nested --prepare

With no command, runs ``python -m pytest -m stock_kvm``. Exit status is the command's; 124 on
timeout, 125 when the VM failed before the command finished.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import initramfs as _initramfs
from . import kernel as _kernel
from .initramfs import GUEST_CTL
from .kernel import NestedSetupError
from .skipcheck import check_skips, load_json  # noqa: F401  (CI's --check-skips)
from .nested_guest import (  # noqa: F401  (re-exported: the runner's public helpers)
    GuestConsole,
    ENV_NAMES,
    ENV_PREFIXES,
    EXIT_VM_FAILED,
    KERNEL_CMDLINE,
    OUTPUT_ENV,
    PROBE,
    guest_env,
    pdeathsig_setter,
    qemu_command,
    resolve_command,
    run_script,
)

DEFAULT_COMMAND = ["python", "-m", "pytest", "-m", "stock_kvm"]
DEFAULT_TIMEOUT = 3600.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_SMP = 1
EXIT_TIMEOUT = 124

@dataclass
class NestedResult:
    """What one nested run produced. Times are seconds, measured on the host."""

    returncode: int
    output: str                     # the command's own output (console lines between markers)
    boot_s: float = 0.0             # QEMU start until /init runs
    setup_s: float = 0.0            # modules, mounts, the KVM probe
    command_s: float = 0.0          # the command itself
    total_s: float = 0.0
    kvm_module: str = "none"
    caps: dict[str, int] = field(default_factory=dict)
    console: str = ""               # everything the guest printed
    timed_out: bool = False

    def summary(self) -> str:
        smm = self.caps.get("SMM", "?")
        return (f"pyvmm nested: {self.kvm_module} SMM={smm} boot {self.boot_s:.1f}s "
                f"setup {self.setup_s:.1f}s command {self.command_s:.1f}s "
                f"exit {self.returncode}" + (" (timed out)" if self.timed_out else ""))


# --------------------------------------------------------------------------------------- helpers

def project_root(cwd: str | os.PathLike) -> Path:
    """The nearest folder at or above ``cwd`` with a pyproject.toml, setup.py or .git."""
    cwd = Path(cwd).resolve()
    for d in (cwd, *cwd.parents):
        if any((d / marker).exists() for marker in ("pyproject.toml", "setup.py", ".git")):
            return d
    return cwd


@dataclass
class Prepared:
    qemu: str
    kernel: str
    initrd: str
    bios: str | None
    release: str


def prepare(cache: Path | None = None) -> Prepared:
    """Find or install everything a boot needs; cheap once cached."""
    cache = cache or _kernel.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runners: one downloads, the others wait
        tools = _kernel.ensure_host_tools()
        kern = _kernel.ensure_kernel(cache)
        initrd = _initramfs.build_initramfs(kern, tools["busybox"], cache)
    if kern.vmlinux is not None and tools["qboot"]:
        return Prepared(tools["qemu"], str(kern.vmlinux), str(initrd), tools["qboot"],
                        kern.release)
    return Prepared(tools["qemu"], str(kern.vmlinuz), str(initrd), None, kern.release)


def run_nested(command: list[str] | None = None, *, cwd: str | os.PathLike | None = None,
               timeout: float = DEFAULT_TIMEOUT, smp: int = DEFAULT_SMP,
               memory_mb: int = DEFAULT_MEMORY_MB, stream: TextIO | None | str = "stdout",
               env: dict[str, str] | None = None, overlay: bool = True, probe: bool = True,
               python: str | None = None, accel: str = "tcg", cpu: str = "max",
               cache: Path | None = None) -> NestedResult:
    """Boot the nested VM, run ``command`` in ``cwd`` there, and return what happened.

    ``stream`` gets the console live (default sys.stdout; None: quiet). ``env`` adds variables
    to the guest environment. ``overlay`` puts a tmpfs overlay over the read-only host root, so
    writes outside the checkout (caches in $HOME, /tmp) succeed and are discarded at the end.

    $PYVMM_PASSED (inherited or in ``env``) is written back to the host path after the run; an
    inherited $PYVMM_CAP_SKIPS is dropped, so the local run's file is not overwritten.
    """
    if isinstance(stream, str):  # "stdout": resolved now, not at import (pytest swaps sys.stdout)
        stream = sys.stdout
    command = list(command or DEFAULT_COMMAND)
    python = python or sys.executable
    cwd = Path(cwd or os.getcwd()).resolve()
    work = project_root(cwd)
    if work == Path("/"):
        raise NestedSetupError("the project folder cannot be / (it is shared read-write)")
    t_prep = time.monotonic()
    prep = prepare(cache)
    prep_s = time.monotonic() - t_prep
    if stream is not None and prep_s > 1:
        print(f"pyvmm nested: prepared kernel {prep.release} in {prep_s:.1f}s", file=stream)

    tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
    extra = dict(env or {})
    if tty and "COLUMNS" not in extra:
        extra["COLUMNS"] = str(shutil.get_terminal_size().columns)
    genv = guest_env(dict(os.environ), python=python, extra=extra, tty=tty)
    if "PYVMM_CAP_SKIPS" not in extra:
        genv.pop("PYVMM_CAP_SKIPS", None)
    outputs = {}
    for var in OUTPUT_ENV:
        if genv.get(var):
            outputs[var] = Path(cwd, genv[var])
            genv[var] = f"{GUEST_CTL}/out/{var}.json"

    with tempfile.TemporaryDirectory(prefix="pyvmm-nested-") as ctl:
        ctl_path = Path(ctl)
        (ctl_path / "out").mkdir()
        (ctl_path / "config.sh").write_text(
            f"WORK={shlex.quote(str(work))}\nOVERLAY={1 if overlay else 0}\n")
        (ctl_path / "run.sh").write_text(
            run_script(resolve_command(command, python), cwd=str(cwd), env=genv, python=python,
                       probe=probe))
        qcmd = qemu_command(qemu=prep.qemu, kernel=prep.kernel, initrd=prep.initrd,
                            bios=prep.bios, work=str(work), ctl=ctl, smp=smp,
                            memory_mb=memory_mb, accel=accel, cpu=cpu)
        result = _boot(qcmd, timeout=timeout, stream=stream)
        status_file = ctl_path / "status"
        if status_file.exists() and not result.timed_out:
            try:
                result.returncode = int(status_file.read_text().strip())
            except ValueError:
                pass
        for var, host_path in outputs.items():
            produced = ctl_path / "out" / f"{var}.json"
            if produced.exists():
                host_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(produced, host_path)
    if stream is not None:
        print(result.summary(), file=stream, flush=True)
    return result


def _boot(qcmd: list[str], *, timeout: float, stream: TextIO | None) -> NestedResult:
    console = GuestConsole(stream)
    t0 = time.monotonic()
    deadline = t0 + timeout
    timed_out = False
    proc = subprocess.Popen(qcmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            preexec_fn=pdeathsig_setter())  # noqa: PLW1509
    assert proc.stdout is not None  # stdout=PIPE
    try:
        fd = proc.stdout.fileno()
        decoder = _decoder()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            console.feed(decoder.decode(chunk), time.monotonic())
        console.feed(decoder.decode(b"", final=True), time.monotonic())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    end = time.monotonic()
    console.close(end)
    if timed_out and stream is not None:
        print(f"\npyvmm nested: timed out after {timeout:.0f}s; QEMU killed", file=stream)
    return _result_from_events(console, t0, end, timed_out, proc.returncode)


def _decoder():
    import codecs
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _result_from_events(console: GuestConsole, t0: float, end: float, timed_out: bool,
                        qemu_rc: int | None) -> NestedResult:
    times: dict[str, float] = {}
    kvm_module = "none"
    caps: dict[str, int] = {}
    code = None
    for now, words in console.events:
        if not words:
            continue
        kind = words[0]
        times.setdefault(kind, now)
        if kind == "setup" and len(words) > 1:
            kvm_module = words[1]
        elif kind == "probe":
            for w in words[1:]:
                if "=" in w:
                    name, value = w.split("=", 1)
                    if value.isdigit():
                        caps[name] = int(value)
        elif kind == "end" and len(words) > 1 and words[1].lstrip("-").isdigit():
            code = int(words[1])
    boot = times.get("boot", end)
    start = times.get("start", end)
    finish = times.get("end", end)
    if timed_out:
        rc = EXIT_TIMEOUT
    elif code is not None:
        rc = code
    else:
        rc = EXIT_VM_FAILED
    return NestedResult(
        returncode=rc, output="\n".join(console.command_lines) + (
            "\n" if console.command_lines else ""),
        boot_s=boot - t0, setup_s=max(0.0, start - boot), command_s=max(0.0, finish - start),
        total_s=end - t0, kvm_module=kvm_module, caps=caps,
        console="\n".join(console.lines) + "\n", timed_out=timed_out)


# ------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyvmm nested",
        description="Run a command on stock kvm_amd inside QEMU TCG (default: "
                    "python -m pytest -m stock_kvm).",
        epilog="Exit status: the command's; 124 on timeout; 125 if the VM failed first.")
    p.add_argument("--timeout", type=float,
                   default=float(os.environ.get("PYVMM_NESTED_TIMEOUT", DEFAULT_TIMEOUT)),
                   help="seconds before QEMU is killed (default %(default)s, "
                        "env PYVMM_NESTED_TIMEOUT)")
    p.add_argument("--smp", type=int, default=int(os.environ.get("PYVMM_NESTED_SMP", DEFAULT_SMP)))
    p.add_argument("--memory", type=int, metavar="MB",
                   default=int(os.environ.get("PYVMM_NESTED_MEMORY", DEFAULT_MEMORY_MB)))
    p.add_argument("--cwd", default=None, help="where to run the command (default: here)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the command")
    p.add_argument("--passed", metavar="PATH",
                   help="write the passed/failed/skipped test ids here (sets PYVMM_PASSED)")
    p.add_argument("--no-overlay", action="store_true",
                   help="keep the host root strictly read-only (no tmpfs overlay)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="do not stream the console; print the command's output and the "
                        "summary at the end")
    p.add_argument("--prepare", action="store_true",
                   help="install/download/build everything, boot nothing")
    p.add_argument("--check-skips", nargs=2, metavar=("LOCAL", "NESTED"),
                   help="check that every test LOCAL ($PYVMM_CAP_SKIPS) skipped for a missing "
                        "capability passed in NESTED ($PYVMM_PASSED)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        # a CI timeout's SIGTERM unwinds like Ctrl-C: QEMU killed, temporary files removed
        signal.signal(signal.SIGTERM, _terminate)
    if "--" in argv:
        i = argv.index("--")
        opts, command = argv[:i], argv[i + 1:]
        args = _parser().parse_args(opts)
        if args.command:
            _parser().error(f"unexpected arguments before --: {' '.join(args.command)}")
    else:
        args = _parser().parse_args(argv)
        command = args.command
    try:
        if args.check_skips:
            ok, lines = check_skips(load_json(args.check_skips[0]),
                                    load_json(args.check_skips[1]))
            print("\n".join(lines))
            return 0 if ok else 1
        if args.prepare:
            prep = prepare()
            print(f"pyvmm nested: ready: kernel {prep.release}, {prep.kernel}, {prep.initrd}")
            return 0
        extra = {}
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep:
                _parser().error(f"--env wants NAME=VALUE, not {item!r}")
            extra[name] = value
        if args.passed:
            extra["PYVMM_PASSED"] = args.passed
        quiet_stream = None
        result = run_nested(command or None, cwd=args.cwd, timeout=args.timeout, smp=args.smp,
                            memory_mb=args.memory, env=extra, overlay=not args.no_overlay,
                            stream=quiet_stream if args.quiet else sys.stdout)
        if args.quiet:
            sys.stdout.write(result.output)
            print(result.summary())
        return result.returncode
    except NestedSetupError as e:
        print(f"pyvmm nested: {e}", file=sys.stderr)
        return EXIT_VM_FAILED
    except KeyboardInterrupt:
        print("\npyvmm nested: interrupted; QEMU stopped", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
