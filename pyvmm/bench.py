# SPDX-License-Identifier: GPL-2.0-or-later
"""`pyvmm bench`: run the pyperf benchmarks of bench/ and print pyvmm against the C reference.

Every `bench/bench_*.py` script is run as a pyperf run appending to one file per run,
`<DIR>/<NAME>.json` (NAME: the UTC start time unless given). DIR holds pyperf's files and
nothing else, one per run, so `python -m pyperf compare_to DIR/*.json` compares the runs in it
(the oldest is the reference). The interleaved pyvmm/C measurements, which are not pyperf files,
go to `<DIR>/paired/<NAME>.json`, only when some case has a C side. The table pairs each
case's "[pyvmm]" and "[C]" benchmarks, gives their medians per operation, the ratio, and
whether the case's target is met. Targets are measured and reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: The seed's 2009 numbers (qemu-kvm on a 2009 host; qemu-pio and hypercall extrapolated),
#: us per operation, beside the rows that measure the same path.
SEED = {
    "exit.mmio.cpl0.machine": 9.09,
    "exit.pio.cpl0.machine": 6.53,
    "ioevent.mmio.cpl0": 5.00,
    "ioevent.pio.cpl0": 2.72,
}
SEED_HYPERCALL = 2.37

#: Fast mode: fewer worker processes and shorter values than pyperf's own --fast, to keep a
#: whole run within a few minutes on a 2-CPU machine.
FAST_ARGS = ["--processes", "4", "--values", "3", "--warmups", "1", "--min-time", "0.05"]

#: Subfolder of the output folder for the interleaved (paired) measurements: not pyperf
#: files, so they are kept out of the folder pyperf's tools glob.
PAIRED_DIR = "paired"


def paired_path(pyperf_json: Path) -> Path:
    """Where the paired measurements of the pyperf file `pyperf_json` are (or go)."""
    return pyperf_json.parent / PAIRED_DIR / pyperf_json.name


def bench_dir() -> Path:
    """bench/ of the source tree this pyvmm was imported from (or $PYVMM_BENCH_DIR)."""
    env = os.environ.get("PYVMM_BENCH_DIR")
    if env:
        return Path(env)
    import pyvmm

    return Path(pyvmm.__file__).resolve().parents[1] / "bench"


def scripts(directory: Path) -> list[Path]:
    found = sorted(directory.glob("bench_*.py"))
    order = {"bench_exits": 0, "bench_cpu": 1, "bench_pingpong": 2, "bench_spawn": 3}
    return sorted(found, key=lambda p: (order.get(p.stem, 9), p.stem))


@dataclass
class Row:
    case: str
    group: str
    title: str
    target: str
    unit: str
    pyvmm: float | None = None   # median seconds per operation
    c: float | None = None
    paired: float | None = None  # median of the interleaved pyvmm/C ratios

    @property
    def ratio(self) -> float | None:
        """pyvmm / C: the paired (interleaved) ratio when measured, else the pyperf medians'."""
        if self.paired is not None:
            return self.paired
        if self.pyvmm is None or self.c is None:
            return None
        return self.pyvmm / self.c


def load_rows(paths: list[Path]) -> list[Row]:
    import json
    import statistics

    import pyperf

    rows: dict[str, Row] = {}
    for path in paths:
        suite = pyperf.BenchmarkSuite.load(str(path))
        for bench in suite.get_benchmarks():
            meta = bench.get_metadata()
            case = meta.get("pyvmm_case")
            if case is None:
                continue
            row = rows.setdefault(case, Row(case, meta.get("pyvmm_group", ""),
                                            meta.get("pyvmm_title", case),
                                            meta.get("pyvmm_target", ""),
                                            meta.get("pyvmm_unit", "op")))
            if meta.get("pyvmm_impl") == "C":
                row.c = bench.median()
            else:
                row.pyvmm = bench.median()
        pairs = paired_path(path)
        if pairs.exists():
            for case, data in json.loads(pairs.read_text()).items():
                if case in rows and data.get("ratios"):
                    rows[case].paired = statistics.median(data["ratios"])
    return list(rows.values())


def evaluate(row: Row, rows: dict[str, Row]) -> tuple[str, bool | None]:
    """(what the target says, with the measured value; met?) for a row's target."""
    target = row.target
    if not target:
        return "", None
    if target.startswith("ratio<="):
        limit = float(target[len("ratio<="):])
        ratio = row.ratio
        if ratio is None:
            return f"pyvmm/C <= {limit:g}", None
        return f"pyvmm/C <= {limit:g}", ratio <= limit
    if target.startswith("max<="):  # an absolute bound on pyvmm's median (seconds per unit)
        limit = float(target[len("max<="):])
        if row.pyvmm is None:
            return f"<= {fmt_time(limit)}", None
        return f"<= {fmt_time(limit)}", row.pyvmm <= limit
    if target.startswith("speedup>="):
        spec = target[len("speedup>="):]
        value, _, other = spec.partition(":")
        need = float(value)
        base = rows.get(other)
        if base is None or base.pyvmm is None or row.pyvmm is None:
            return f">= {need:g}x faster than {other}", None
        speedup = base.pyvmm / row.pyvmm
        return f"{speedup:.1f}x faster than {other} (>= {need:g}x)", speedup >= need
    return target, None


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.2f} us"


def format_table(rows: list[Row]) -> str:
    by_case = {r.case: r for r in rows}
    width = max([len(r.title) for r in rows] + [9])
    head = (f"{'benchmark':<{width}} {'pyvmm':>10} {'C':>10} {'ratio':>7} {'paired':>7} "
            f"{'seed':>8}  target")
    out = [head, "-" * len(head)]
    group = None
    for row in rows:
        if group is not None and row.group != group:
            out.append("")
        group = row.group
        text, met = evaluate(row, by_case)
        verdict = "" if met is None else ("met" if met else "MISSED")
        plain = (None if row.pyvmm is None or row.c is None else row.pyvmm / row.c)
        ratio = "-" if plain is None else f"{plain:.2f}x"
        paired = "-" if row.paired is None else f"{row.paired:.2f}x"
        seed = f"{SEED[row.case]:.2f} us" if row.case in SEED else ""
        target = f"{text}: {verdict}" if text and verdict else text
        out.append(f"{row.title:<{width}} {fmt_time(row.pyvmm):>10} {fmt_time(row.c):>10} "
                   f"{ratio:>7} {paired:>7} {seed:>8}  {target}")
    return "\n".join(out)


def hypercall_line() -> str:
    try:
        from .demo import hypercall_note

        note = hypercall_note()
    except Exception as err:  # informative only
        note = f"hypercall path: not measured ({err})"
    return f"{note} (seed, extrapolated: {SEED_HYPERCALL} us)"


def run_name() -> str:
    """The default name of a run's file: its UTC start time, so names sort in run order."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def newest_run(out_dir: Path) -> Path | None:
    """The most recent run file in `out_dir` (by name, then modification time)."""
    runs = sorted(out_dir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    return runs[-1] if runs else None


def merge_paired(target: Path, part: Path) -> None:
    """Add one script's paired measurements (`part`, deleted afterwards) to the run's."""
    import json

    if not part.exists():  # a script with no C side writes none
        return
    merged = json.loads(target.read_text()) if target.exists() else {}
    merged.update(json.loads(part.read_text()))
    part.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pyvmm bench",
        description="Run the pyperf benchmarks of bench/ (pyvmm against the C reference) and "
                    "print the table. Each run is one pyperf file DIR/NAME.json holding every "
                    "script's benchmarks, so `python -m pyperf compare_to DIR/*.json` compares "
                    "the runs in DIR. Arguments after `--` go to every pyperf script.")
    parser.add_argument("--fast", action="store_true",
                        help=f"fewer, shorter pyperf runs ({' '.join(FAST_ARGS)})")
    parser.add_argument("-o", "--output", default="bench-results", metavar="DIR",
                        help="folder of the runs' pyperf files (default: %(default)s)")
    parser.add_argument("--name", default="", metavar="NAME",
                        help="this run's file name in DIR, without .json (default: the UTC "
                             "start time, YYYYmmdd-HHMMSS); an existing file is replaced")
    parser.add_argument("--only", default="", metavar="NAMES",
                        help="comma-separated scripts to run, e.g. exits,spawn")
    parser.add_argument("--cases", default="", metavar="GLOBS",
                        help="comma-separated globs of case names, e.g. 'exit.pio.*'")
    parser.add_argument("--show", action="store_true",
                        help="run nothing; print the table of the run --name in DIR (default: "
                             "the newest)")
    parser.add_argument("--bench-dir", type=Path, default=None,
                        help="where the bench_*.py scripts are (default: the source tree's "
                             "bench/)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)

    try:
        import pyperf  # noqa: F401
    except ImportError:
        print("pyvmm bench needs pyperf: pip install 'pyvmm[bench]' (or pip install pyperf)",
              file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    if args.show:
        path = out_dir / f"{args.name}.json" if args.name else newest_run(out_dir)
        if path is None or not path.is_file():
            print(f"pyvmm bench: no run {'named ' + args.name + ' ' if args.name else ''}in "
                  f"{out_dir}", file=sys.stderr)
            return 2
    else:
        path = out_dir / f"{args.name or run_name()}.json"
        status = run_scripts(args, extra, path)
        if status:
            return status
    print("pyvmm, C: pyperf medians per operation (ring, round trip or spawn); ratio = pyvmm/C "
          "of those;\npaired = median pyvmm/C of 7 interleaved pairs in one process (equal "
          "machine load),\nwhich the ratio targets use")
    rows = load_rows([path])
    print(format_table(rows))
    if any(r.group == "kut-vmexit" for r in rows):  # bench/bench_kut_vmexit.py
        print("vmexit rows: the C column is QEMU+KVM booting the same kvm-unit-tests "
              "vmexit.flat (guest-timed)")
    print()
    print(hypercall_line())
    return 0


def run_scripts(args: argparse.Namespace, extra: list[str], path: Path) -> int:
    """Run the selected bench_*.py scripts, appending their benchmarks to the run file `path`
    and their paired measurements to `paired_path(path)`; 0, or the exit status to return."""
    directory = args.bench_dir or bench_dir()
    found = scripts(directory) if directory.is_dir() else []
    if not found:
        print(f"pyvmm bench: no bench/bench_*.py scripts at {directory}. The benchmarks "
              "live in pyvmm's source tree (bench/), which a non-editable install does "
              "not contain: run from a checkout (pip install -e .), or pass --bench-dir "
              "or set PYVMM_BENCH_DIR.", file=sys.stderr)
        return 2
    wanted = {n.strip().removeprefix("bench_") for n in args.only.split(",") if n.strip()}
    if wanted:
        found = [p for p in found if p.stem.removeprefix("bench_") in wanted]
        if not found:
            print(f"pyvmm bench: no script matches --only {args.only}", file=sys.stderr)
            return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = paired_path(path)
    path.unlink(missing_ok=True)  # a rerun under the same name starts afresh
    pairs.unlink(missing_ok=True)
    pyperf_args = (FAST_ARGS if args.fast else []) + extra
    if args.cases:
        pyperf_args += ["--cases", args.cases]
    start = time.monotonic()
    for script in found:
        cmd = [sys.executable, str(script), "--quiet", "--append", str(path), *pyperf_args]
        print(f"$ {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=script.parent)
        if proc.returncode != 0:
            print(f"pyvmm bench: {script.name} failed (status {proc.returncode})",
                  file=sys.stderr)
            return 1
        # pyvmm and C once more, alternating in one process: the ratios under equal load
        part = pairs.with_name(f"{path.stem}.{script.stem}.part")
        cmd = [sys.executable, str(script), "--paired", str(part)]
        if args.cases:
            cmd += ["--cases", args.cases]
        print(f"$ {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=script.parent).returncode != 0:
            print(f"pyvmm bench: {script.name} --paired failed", file=sys.stderr)
            return 1
        merge_paired(pairs, part)
    if not path.exists():
        print(f"pyvmm bench: no benchmark ran (--cases {args.cases!r} matched none?)",
              file=sys.stderr)
        return 1
    print(f"\nrun {path.stem} in {path} ({time.monotonic() - start:.0f} s); compare the runs "
          f"in {path.parent} with `python -m pyperf compare_to {path.parent}/*.json`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
