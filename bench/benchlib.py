# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared machinery of pyvmm's pyperf benchmarks (bench/bench_*.py).

A benchmark script lists `Case`s and calls `main(cases)`. Each case becomes two pyperf
benchmarks run one after the other in the same pyperf run: "<name> [pyvmm]", timed by a Python
function, and "<name> [C]", timed by the C reference (bench/cref.c) running the same guest
state through the same KVM path with a bare KVM_RUN loop. Both report time per operation (a
ring, a round trip, a spawn). VMs are created inside the pyperf worker processes, lazily, and
setup is never inside the timed region.

Adding a benchmark script (e.g. bench_smp.py): name it bench_<topic>.py in this folder, build a
list of `Case`s (a case may have no C side: `c_mode=None`) and end with
`if __name__ == "__main__": main(CASES)`. `pyvmm bench` finds every bench_*.py here and adds
its results to the table; see bench/README.md.
"""

from __future__ import annotations

import atexit
import fnmatch
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
CREF_SOURCE = BENCH_DIR / "cref.c"

#: ucall ports (guests/pyvmm.inc)
PORT_REPORT, PORT_DONE = 0xEA, 0xEB

# The doorbell harness's addresses (the same as pyvmm demo's).
DOORBELL_PORT = 0x510
DOORBELL_MMIO = 0xD0000000
PINGPONG_PORT = 0x520
PINGPONG_GSI = 5

#: Run timeout of the Machine runs (a guard, far above any benchmark run).
RUN_TIMEOUT = 120.0


# -- the C reference --------------------------------------------------------------------------

def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyvmm" / "bench"


def compiler() -> str:
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"the C reference needs a C compiler: {cc!r} not found "
                           "(apt-get install gcc linux-libc-dev, or set CC)")
    return cc


def build_cref() -> Path:
    """Compile bench/cref.c with the system compiler into the cache (keyed by the source and
    the compiler's version); returns the executable. Never writes into the repository."""
    cc = compiler()
    source = CREF_SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    flags = ["-O2", "-Wall", "-pthread"]
    key = hashlib.sha256(source + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    exe = cache_dir() / f"cref-{key}"
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    proc = subprocess.run([cc, *flags, "-o", str(tmp), str(CREF_SOURCE)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the C reference failed:\n{proc.stderr}")
    os.replace(tmp, exe)  # atomic: concurrent workers never see a half-written binary
    return exe


STATE_MAGIC = b"PYVMMST1"
STATE_IRQCHIP = 1


def write_state(path: Path, *, pieces: list[tuple[int, bytes]], mem_size: int,
                reload: tuple[int, int], sregs: bytes, regs: bytes, irqchip: bool) -> None:
    """The guest state file cref.c reads (its load_state() is the other half)."""
    out = bytearray(STATE_MAGIC)
    out += struct.pack("<IIQQQII", STATE_IRQCHIP if irqchip else 0, len(pieces), mem_size,
                       reload[0], reload[1], len(sregs), len(regs))
    out += sregs + regs
    for gpa, data in pieces:
        out += struct.pack("<QQ", gpa, len(data)) + data
    path.write_bytes(bytes(out))


class CRef:
    """One cref process serving counts on stdin: `run(n)` -> (seconds, rings, exits)."""

    def __init__(self, mode: str, state: Path) -> None:
        self.mode = mode
        self.proc = subprocess.Popen([str(build_cref()), mode, str(state)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, n: int) -> tuple[float, int, int]:
        seconds, rings, exits, _user, _sys = self.run_cpu(n)
        return seconds, rings, exits

    def run_cpu(self, n: int) -> tuple[float, int, int, float, float]:
        """(wall seconds, rings, exits, user CPU seconds, system CPU seconds) of one run."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{n}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it has ended: reported below
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"cref {self.mode} ended (status {code}) on count {n}")
        ns, rings, exits, user, system = (int(x) for x in line.split())
        return ns * 1e-9, rings, exits, user * 1e-9, system * 1e-9

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        else:
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass


# -- guest scenarios --------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """A payload with its parameters: what both sides run. `count_reg` carries the loop count."""

    payload: str
    regs: tuple[tuple[str, int], ...]
    irqchip: bool = False
    count_reg: str = "rcx"

    def reg_dict(self, count: int | None = None) -> dict[str, int]:
        regs = dict(self.regs)
        if count is not None:
            regs[self.count_reg] = count
        return regs


def doorbell(mode: str, mmio: bool, width: int = 4) -> Scenario:
    return Scenario("doorbell" if mode == "cpl0" else "doorbell_user",
                    (("rcx", 0), ("rdi", 1 if mmio else 0), ("r10", width), ("rsi", 1),
                     ("r8", DOORBELL_PORT), ("r9", DOORBELL_MMIO)))


PINGPONG = Scenario("pingpong", (("rcx", 0), ("r8", PINGPONG_PORT), ("r9", PINGPONG_GSI)),
                    irqchip=True)


def payload(name: str):
    from pyvmm import guests

    return guests.build(name)


def dump_state(scenario: Scenario, path: Path, count: int = 0) -> Path:
    """Set a VM up for `scenario` with pyvmm (Machine.load, as the pyvmm side does) and write
    what cref needs to start the guest in exactly that state."""
    from pyvmm import Machine
    from pyvmm.guests import layout

    p = payload(scenario.payload)
    with Machine(irqchip=scenario.irqchip, serial=False) as m:
        m.load(p, regs=scenario.reg_dict(count))
        vcpu = m.vcpus[0]
        from pyvmm.guests import modes

        s = vcpu.get_sregs()
        s.tr.type = modes.tr_type(vcpu)  # as loaded, not as KVM reports it (see reset())
        sregs, regs = s.to_bytes(), vcpu.get_regs().to_bytes()
        mem_size = sum(r.size for r in m.vm.memory.regions(0))
    pieces = [*layout.system_area(), (p.load_address, p.image)]
    write_state(path, pieces=pieces, mem_size=mem_size, reload=(p.load_address, len(p.image)),
                sregs=sregs, regs=regs, irqchip=scenario.irqchip)
    return path


_tmpdir: Path | None = None


def tmpdir() -> Path:
    global _tmpdir
    if _tmpdir is None:
        _tmpdir = Path(tempfile.mkdtemp(prefix="pyvmm-bench-"))
        atexit.register(shutil.rmtree, _tmpdir, True)
    return _tmpdir


def c_timer(mode: str, scenario: Scenario, *, per_op: int = 1) -> Callable[[int], float]:
    """A pyperf time function driving cref: `loops` operations, the elapsed cref measured.
    The ring count cref reports must be exact."""
    ref: list[CRef] = []

    def time_func(loops: int) -> float:
        if not ref:
            state = dump_state(scenario, tmpdir() / f"state-{os.getpid()}-{len(ref)}.bin")
            ref.append(CRef(mode, state))
            atexit.register(ref[0].close)
        seconds, rings, _exits = ref[0].run(loops)
        if rings != loops * per_op:
            raise RuntimeError(f"cref {mode}: counted {rings} rings for {loops}")
        return seconds

    return time_func


# -- pyvmm sides ------------------------------------------------------------------------------

class LoadedMachine:
    """A pyvmm Machine with a scenario loaded, restartable: `reset(count)` puts the image,
    sregs and regs back (outside the timed region) so every run starts the guest afresh."""

    def __init__(self, scenario: Scenario) -> None:
        from pyvmm import Kvm, Machine

        self.scenario = scenario
        self.kvm = Kvm()
        self.machine = Machine(kvm=self.kvm, irqchip=scenario.irqchip, serial=False)
        self.payload = payload(scenario.payload)
        self.machine.load(self.payload, regs=scenario.reg_dict(0))
        self.vcpu = self.machine.vcpus[0]
        atexit.register(self.close)

    def reset(self, count: int) -> None:
        self.vcpu.complete_io()  # the last run's DONE, before its state is replaced
        self.machine.vm.memory.write(self.payload.load_address, self.payload.image)
        # The mode set-up again rather than the sregs read back after it: on AMD KVM reports
        # TR as busy, which QEMU's TCG (the nested runner) then refuses for CPL3 port I/O.
        self.payload.setup_vcpu(self.vcpu, regs=self.scenario.reg_dict(count))

    def run(self):
        result = self.machine.run(timeout=RUN_TIMEOUT)
        if not result.ok:
            raise RuntimeError(f"{self.scenario.payload} did not finish:\n{result}")
        return result

    def close(self) -> None:
        self.machine.close()
        self.kvm.close()



def counted_machine(mode: str, path: str) -> tuple[LoadedMachine, Any]:
    """The doorbell scenario on a LoadedMachine whose rings a Counter device on the PIO or
    MMIO bus counts (the userspace-exit path through Machine and the bus)."""
    from pyvmm.devices import Counter

    lm = LoadedMachine(doorbell(mode, path == "mmio"))
    device = Counter()
    if path == "mmio":
        lm.machine.mmio.register(DOORBELL_MMIO, 8, device)
    else:
        lm.machine.pio.register(DOORBELL_PORT, 4, device)
    return lm, device


def serve_rings(vcpu: Any, mmio: bool) -> tuple[int, int, bytes]:
    """The loop cref.c runs, written in Python: `vcpu.run()` until the guest's DONE, counting
    doorbell rings (PIO or MMIO writes) and answering reports. Returns (rings, exits, the last
    ring's data); any other exit is an error. Timed by the caller around the whole loop."""
    from pyvmm.exits import IoExit, MmioExit

    run, get_regs = vcpu.run, vcpu.get_regs
    rings = exits = 0
    last = b""
    while True:
        ex = run()
        exits += 1
        cls = type(ex)
        if cls is IoExit:
            port = ex.port
            if port == DOORBELL_PORT and not mmio:
                last = bytes(ex.data)
                rings += 1
            elif port == PORT_REPORT:
                get_regs()
            elif port == PORT_DONE:
                return rings, exits, last
            else:
                raise RuntimeError(f"unexpected {ex}")
        elif cls is MmioExit and ex.address == DOORBELL_MMIO and ex.is_write:
            last = bytes(ex.data)
            rings += 1
        else:
            raise RuntimeError(f"unexpected {ex}")

def lazy(factory: Callable[[], Callable[[int], float]]) -> Callable[[int], float]:
    """Defer building a time function (and its VM) to its first call, in the worker."""
    made: list[Callable[[int], float]] = []

    def time_func(loops: int) -> float:
        if not made:
            made.append(factory())
        return made[0](loops)

    return time_func


# -- cases and the pyperf runner --------------------------------------------------------------

@dataclass
class Case:
    """One comparison: `pyvmm(loops) -> seconds` against cref's `c_mode` on `scenario`.

    `target` is evaluated by `pyvmm bench` on the medians: "ratio<=X" (pyvmm time / C time at
    most X) or "speedup>=X:<other case>" (the other case's pyvmm time / this case's pyvmm time
    at least X). `group` and `title` lay out the table."""

    name: str
    group: str
    title: str
    pyvmm: Callable[[int], float]
    scenario: Scenario | None = None
    c_mode: str | None = None
    target: str = ""
    unit: str = "op"
    c_per_op: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self, impl: str) -> dict[str, str]:
        meta = {"pyvmm_case": self.name, "pyvmm_impl": impl, "pyvmm_group": self.group,
                "pyvmm_title": self.title, "pyvmm_target": self.target,
                "pyvmm_unit": self.unit}
        return {k: v for k, v in meta.items() if v}  # pyperf rejects empty values


def _runner_args(cmd, args) -> None:
    if args.cases:
        cmd.extend(("--cases", args.cases))


def paired(case: Case, pairs: int = 7, min_time: float = 0.04) -> dict[str, list[float]]:
    """pyvmm and C measured alternately in this process, `pairs` times (each side for about
    `min_time` seconds a turn), so both see the same machine load: per-pair ratios are far
    steadier than two pyperf benchmarks run one after the other on a shared machine."""
    assert case.scenario is not None and case.c_mode is not None
    c_side = c_timer(case.c_mode, case.scenario, per_op=case.c_per_op)
    case.pyvmm(1)
    c_side(1)
    loops = 1
    while case.pyvmm(loops) < min_time and loops < 1 << 24:  # calibrate on the pyvmm side
        loops *= 2
    py, c = [], []
    for _ in range(pairs):
        py.append(case.pyvmm(loops) / loops)
        c.append(c_side(loops) / loops)
    return {"pyvmm": py, "c": c, "ratios": [a / b for a, b in zip(py, c, strict=True)],
            "loops": [loops]}


def main(cases: list[Case]) -> None:
    import pyperf

    runner = pyperf.Runner(add_cmdline_args=_runner_args)
    runner.argparser.add_argument("--cases", default="",
                                  help="run only cases whose name matches this glob "
                                       "(comma-separated globs)")
    runner.argparser.add_argument("--paired", metavar="JSON", default="",
                                  help="instead of pyperf runs, measure pyvmm and C "
                                       "alternately in one process and write the per-pair "
                                       "times and ratios to JSON (not a pyperf file: keep it "
                                       "out of pyperf's folder; no file when no case has a C "
                                       "side)")
    args = runner.parse_args()
    if not args.worker and any(c.c_mode for c in cases):
        build_cref()  # once, in the master, before the workers race for it
    patterns = [p for p in args.cases.split(",") if p]
    if args.paired:
        import json

        out = {}
        for case in cases:
            if patterns and not any(fnmatch.fnmatch(case.name, p) for p in patterns):
                continue
            if case.c_mode is not None and case.scenario is not None:
                out[case.name] = paired(case)
        target = Path(args.paired)
        target.unlink(missing_ok=True)
        if out:  # a script without a C side has nothing to pair: no file, not an empty one
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(out, indent=1))
        return
    runner.metadata["pyvmm_host"] = host_description()
    for case in cases:
        if patterns and not any(fnmatch.fnmatch(case.name, p) for p in patterns):
            continue
        runner.bench_time_func(f"{case.name} [pyvmm]", case.pyvmm,
                               metadata=case.metadata("pyvmm"))
        if case.c_mode is not None and case.scenario is not None:
            runner.bench_time_func(f"{case.name} [C]",
                                   c_timer(case.c_mode, case.scenario, per_op=case.c_per_op),
                                   metadata=case.metadata("C"))


def host_description() -> str:
    try:
        from pyvmm.testing.hostinfo import describe_host

        return f"{describe_host()}, {os.cpu_count()} CPUs"
    except Exception:  # informative only
        return f"{os.uname().release}, {os.cpu_count()} CPUs"


def perf_counter() -> float:
    return time.perf_counter()


if __name__ == "__main__":
    sys.exit("benchlib is imported by the bench_*.py scripts")
