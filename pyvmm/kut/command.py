# SPDX-License-Identifier: GPL-2.0-or-later
"""`pyvmm kut`: run kvm-unit-tests under pyvmm (and, with --qemu, under QEMU+KVM for
comparison) and print a table; --json writes the results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .config import KutTest, load_tests
from .runner import Outcome, not_applicable, run_pyvmm, run_qemu

__all__ = ["add_arguments", "main", "run", "select_tests", "table"]

ENV_DIR = "PYVMM_KUT_DIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pyvmm kut`."""
    parser.add_argument("tests", nargs="*", metavar="TEST",
                        help="test names from x86/unittests.cfg (default: all); a name "
                             "ending in * selects by prefix")
    parser.add_argument("--kut-dir", default=os.environ.get(ENV_DIR),
                        help=f"a built kvm-unit-tests tree (default: ${ENV_DIR})")
    parser.add_argument("--qemu", action="store_true",
                        help="also run each test under QEMU+KVM and show both")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per test (default: the test's own, 90 s if none)")
    parser.add_argument("--list", action="store_true",
                        help="list the tests and what pyvmm would do with each")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="echo each test's serial output as it runs")


def select_tests(tests: list[KutTest], names: Sequence[str]) -> list[KutTest]:
    """The tests named (all when none are); ValueError names the unknown ones."""
    if not names:
        return tests
    chosen, unknown = [], []
    for name in names:
        if name.endswith("*"):
            found = [t for t in tests if t.name.startswith(name[:-1])]
        else:
            found = [t for t in tests if t.name == name]
        if not found:
            unknown.append(name)
        chosen += [t for t in found if t not in chosen]
    if unknown:
        raise ValueError(f"no such kvm-unit-test: {', '.join(unknown)} (see pyvmm kut --list)")
    return chosen


def _cells(outcome: Outcome | None) -> list[str]:
    if outcome is None:
        return ["", "", "", "", ""]
    return [outcome.status, str(outcome.passed), str(outcome.failed), str(outcome.skipped),
            f"{outcome.seconds:.1f}"]


def table(rows: list[tuple[str, Outcome, Outcome | None]], *, qemu: bool) -> str:
    """The results as a Markdown table (the same columns for QEMU when it ran)."""
    head = ["test", "status", "passed", "failed", "skipped", "seconds"]
    if qemu:
        head += ["qemu", "passed", "failed", "skipped", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, mine, theirs in rows:
        cells = [name, *_cells(mine)] + (_cells(theirs) if qemu else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(kut_dir: str, tests: list[KutTest], *, qemu: bool = False, timeout: float | None
        = None, explicit: bool = False, verbose: bool = False, out=sys.stdout):
    """Run each test (under pyvmm, then QEMU when asked: interleaved, so both see the same
    host load), printing one progress line per run; returns [(name, pyvmm, qemu or None)]."""
    def echo(text: str) -> None:
        out.write(text)
        out.flush()

    rows = []
    for test in tests:
        sink = echo if verbose else None
        mine = run_pyvmm(kut_dir, test, timeout=timeout, explicit=explicit, console=sink)
        print(f"{test.name}: pyvmm {mine.status} ({mine.passed} passed, {mine.failed} failed, "
              f"{mine.skipped} skipped, {mine.seconds:.1f} s)"
              + (f" - {mine.reason}" if mine.reason else ""), file=out, flush=True)
        theirs = None
        if qemu:
            theirs = run_qemu(kut_dir, test, timeout=timeout, explicit=explicit)
            print(f"{test.name}: qemu  {theirs.status} ({theirs.passed} passed, "
                  f"{theirs.failed} failed, {theirs.skipped} skipped, {theirs.seconds:.1f} s)"
                  + (f" - {theirs.reason}" if theirs.reason else ""), file=out, flush=True)
        rows.append((test.name, mine, theirs))
    return rows


def to_json(rows) -> dict:
    """The --json document: {"tests": [{name, status, passed, failed, skipped, seconds,
    reason, qemu: {same} or null}]}."""
    return {"tests": [{"name": name, **mine.as_json(),
                       "qemu": theirs.as_json() if theirs is not None else None}
                      for name, mine, theirs in rows]}


def main(args: argparse.Namespace) -> int:
    """Run `pyvmm kut`; exit status 1 when a test pyvmm ran did not PASS or SKIP."""
    if not args.kut_dir:
        raise ValueError(f"no kvm-unit-tests tree: pass --kut-dir DIR or set ${ENV_DIR} "
                         "(build one: ./configure --arch=x86_64 && make -j in a "
                         "kvm-unit-tests checkout)")
    tests = select_tests(load_tests(args.kut_dir), args.tests)
    if args.list:
        from .config import machine_params
        from .cpu import parse_cpu

        for test in tests:
            params = machine_params(test.extra_params)
            skip = (not_applicable(test, explicit=bool(args.tests))
                    or ", ".join(params.unsupported + parse_cpu(params.cpu).unsupported))
            print(f"{test.name:<40} {test.file:<22} smp={test.smp:<2} "
                  f"timeout={test.timeout:g}s" + (f"  SKIP: {skip}" if skip else ""))
        return 0
    rows = run(args.kut_dir, tests, qemu=args.qemu, timeout=args.timeout,
               explicit=bool(args.tests), verbose=args.verbose)
    print()
    print(table(rows, qemu=args.qemu))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rows), f, indent=1)
            f.write("\n")
    return 0 if all(mine.status in ("PASS", "SKIP") for _, mine, _ in rows) else 1
