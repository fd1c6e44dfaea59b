# SPDX-License-Identifier: GPL-2.0-or-later
"""kvm-unit-tests' vmexit.flat as a benchmark: the same test kernel booted under pyvmm and
under QEMU+KVM, alternately in one run, each reporting its own cycles per operation for

    inl_from_qemu    IN from an unassigned port (0x1234): a userspace PIO exit, served by a
                     Python device under pyvmm and by QEMU's C under QEMU
    inl_from_kernel  IN from a port KVM serves itself (in-kernel PIC): no userspace exit
    cpuid            CPUID, handled in the kernel

The guest times each operation with RDTSC; values are converted to seconds with the host's
TSC rate. The "C" column of `pyvmm bench` is QEMU here; "paired" is the median of the
per-boot ratios pyvmm/QEMU (each pair booted back to back, so both see the same load).
Needs a built kvm-unit-tests tree ($PYVMM_KUT_DIR) and qemu-system-x86_64; without them it
says so and measures nothing.

    python bench/bench_kut_vmexit.py --append run.json [--values 3]
    python bench/bench_kut_vmexit.py --paired pairs.json
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import statistics
import sys
from pathlib import Path

#: The vmexit.flat tests measured, and the rows they become.
TESTS = {
    "inl_from_qemu": ("userspace PIO exit (Python device vs QEMU's C)", "ratio<=1.0"),
    "inl_from_kernel": ("in-kernel PIO (no userspace exit)", ""),
    "cpuid": ("CPUID (in the kernel)", ""),
}
#: The port vmexit's inl_from_qemu reads: no device claims it in QEMU.
NOP_PORT = 0x1234
SCRIPT = "bench_kut_vmexit"
_LINE = re.compile(r"^(\w+) (\d+)\s*$", re.MULTILINE)


class NopPort:
    """A Python device answering every read with all ones (what an unassigned port reads as):
    the userspace end of inl_from_qemu under pyvmm."""

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


def tsc_hz() -> float:
    """The host TSC rate (Hz), from /proc/cpuinfo's "cpu MHz" (constant-TSC hosts)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1e6
    raise RuntimeError("no cpu MHz in /proc/cpuinfo")


def cycles(output: str) -> dict[str, int]:
    """{test: cycles per operation} from vmexit's output lines "name cycles"."""
    return {name: int(n) for name, n in _LINE.findall(output) if name in TESTS}


def boot_once(kut_dir: str, qemu: bool) -> dict[str, int]:
    """One boot of vmexit.flat measuring TESTS; {test: cycles}."""
    from pyvmm.kut.config import KutTest
    from pyvmm.kut.runner import run_pyvmm, run_qemu

    test = KutTest("vmexit_bench", "vmexit.flat", test_args=" ".join(TESTS))
    if qemu:
        outcome = run_qemu(kut_dir, test, timeout=300)
    else:
        outcome = run_pyvmm(kut_dir, test, timeout=300, platform_hook=lambda pc:
                            pc.machine.pio.register(NOP_PORT, 4, NopPort()))
    found = cycles(outcome.output)
    if outcome.status != "PASS" or set(found) != set(TESTS):
        raise RuntimeError(f"vmexit.flat under {'QEMU' if qemu else 'pyvmm'}: "
                           f"{outcome.status} {outcome.reason}\n{outcome.output}")
    return found


def measure(kut_dir: str, pairs: int) -> dict[str, dict[str, list[float]]]:
    """`pairs` boots under each VMM, alternating; {test: {"pyvmm": [s], "qemu": [s]}}."""
    hz = tsc_hz()
    out = {name: {"pyvmm": [], "qemu": []} for name in TESTS}
    for _ in range(pairs):
        for side, qemu in (("pyvmm", False), ("qemu", True)):
            for name, n in boot_once(kut_dir, qemu).items():
                out[name][side].append(n / hz)
    return out


def _selected(patterns: list[str]) -> list[str]:
    names = [f"kut.vmexit.{n}" for n in TESTS]
    return [n for n in names if not patterns or any(fnmatch.fnmatch(n, p) for p in patterns)]


def write_pyperf(path: Path, data: dict, cases: list[str]) -> None:
    """Append the measurements to the pyperf file `path` as "[pyvmm]" and "[C]" (QEMU)
    benchmarks with the metadata `pyvmm bench` tables by."""
    import pyperf

    for case in cases:
        test = case.rsplit(".", 1)[1]
        title, target = TESTS[test]
        for impl, side in (("pyvmm", "pyvmm"), ("C", "qemu")):
            meta = {"name": f"{case} [{impl}]", "pyvmm_case": case, "pyvmm_impl": impl,
                    "pyvmm_group": "kut-vmexit", "unit": "second", "loops": 1,
                    "pyvmm_title": f"vmexit {test}: {title}, vs QEMU", "pyvmm_unit": "op"}
            if target:
                meta["pyvmm_target"] = target
            run = pyperf.Run(data[test][side], metadata=meta, collect_metadata=False)
            pyperf.add_runs(str(path), pyperf.Benchmark([run]))


def paired_doc(data: dict, cases: list[str]) -> dict:
    """The paired file's content: per-boot times and ratios pyvmm/QEMU."""
    doc = {}
    for case in cases:
        test = case.rsplit(".", 1)[1]
        py, qe = data[test]["pyvmm"], data[test]["qemu"]
        ratios = [a / b for a, b in zip(py, qe, strict=True)]
        doc[case] = {"pyvmm": py, "c": qe, "ratios": ratios, "loops": [1]}
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--append", metavar="JSON", help="pyperf file to append to")
    parser.add_argument("--paired", metavar="JSON", help="write the paired ratios here")
    parser.add_argument("--values", type=int, default=3, help="boots per VMM (default 3)")
    parser.add_argument("--cases", default="")
    args, _pyperf_options = parser.parse_known_args(argv)
    kut_dir = os.environ.get("PYVMM_KUT_DIR")
    from pyvmm.kut.runner import qemu_binary

    if not kut_dir or not (Path(kut_dir) / "x86" / "vmexit.flat").is_file():
        print(f"{SCRIPT}: skipped: set PYVMM_KUT_DIR to a built kvm-unit-tests tree "
              "(./configure --arch=x86_64 && make -j)", file=sys.stderr)
        return 0
    if qemu_binary() is None:
        print(f"{SCRIPT}: skipped: qemu-system-x86_64 not found", file=sys.stderr)
        return 0
    cases = _selected([p for p in args.cases.split(",") if p])
    if not cases:
        return 0
    if args.paired:
        target = Path(args.paired)
        if target.exists():  # the --append run of this bench run already measured the pairs
            return 0
        doc = paired_doc(measure(kut_dir, max(args.values, 2)), cases)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(doc, indent=1))
        return 0
    if not args.append:
        data = measure(kut_dir, args.values)
        for case, entry in paired_doc(data, cases).items():
            print(f"{case}: pyvmm {statistics.median(entry['pyvmm']) * 1e6:.2f} us, QEMU "
                  f"{statistics.median(entry['c']) * 1e6:.2f} us, paired ratio "
                  f"{statistics.median(entry['ratios']):.2f}")
        return 0
    path = Path(args.append)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = measure(kut_dir, args.values)
    write_pyperf(path, data, cases)
    # The boots above alternated pyvmm and QEMU: they are the paired measurement too, kept
    # where `pyvmm bench` looks for this script's pairs (so they are not measured twice).
    part = path.parent / "paired" / f"{path.stem}.{SCRIPT}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(json.dumps(paired_doc(data, cases), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
