# SPDX-License-Identifier: GPL-2.0-or-later
"""kvm-unit-tests under pyvmm: the unittests.cfg parser, -cpu as CPUID, output parsing, and
real test kernels of a built tree ($PYVMM_KUT_DIR) booted under pyvmm, compared with QEMU,
through `pyvmm kut` and as pytest items."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.kut.command import select_tests, table, to_json
from pyvmm.kut.config import (KutTest, find_tests, load_tests, machine_params, parse_cfg,
                              parse_timeout)
from pyvmm.kut.cpu import FEATURES, apply_cpu, kernel_emulated, parse_cpu
from pyvmm.kut.runner import (Outcome, count_lines, environment, not_applicable, qemu_binary,
                              qemu_command, run_pyvmm, run_qemu, status_from_exit)
from pyvmm.testing.plugin import require_kvm

CFG = '''
# comment
[plain]
file = plain.flat

[full]
file = full.flat
smp = 3
test_args = "a b 'c d'"
qemu_params = -cpu qemu64,+x2apic,-pcid -m 256
groups = apic nodefault
arch = x86_64
timeout = 2m
check = /proc/does-not-exist=Y

[multi]
file = multi.flat
extra_params = """-cpu max
  -machine pit=off"""
accel = tcg
'''


@pytest.fixture
def kut_dir():
    """A built kvm-unit-tests tree from $PYVMM_KUT_DIR (CI builds one and sets it)."""
    path = os.environ.get("PYVMM_KUT_DIR")
    if not path:
        if require_kvm():
            pytest.fail("PYVMM_REQUIRE_KVM=1 but PYVMM_KUT_DIR is not set", pytrace=False)
        pytest.skip("PYVMM_KUT_DIR (a built kvm-unit-tests tree) is not set")
    find_tests(path)
    return path


def by_name(kut_dir, name) -> KutTest:
    return select_tests(load_tests(kut_dir), [name])[0]


def test_parse_cfg_reads_every_key():
    plain, full, multi = parse_cfg(CFG)
    assert plain == KutTest(name="plain", file="plain.flat")
    assert (full.smp, full.timeout, full.arch) == (3, 120.0, "x86_64")
    # shell words, as `eval` gives them to QEMU's -append: the guest splits the text at blanks
    assert full.args == ["a b 'c d'"]
    assert full.groups == ("apic", "nodefault")
    assert full.extra_params == "-cpu qemu64,+x2apic,-pcid -m 256"
    assert multi.extra_params == "-cpu max -machine pit=off"
    assert multi.accel == "tcg"


def test_parse_cfg_refuses_malformed_entries():
    with pytest.raises(ValueError, match="no file"):
        parse_cfg("[x]\nsmp = 2\n")
    with pytest.raises(ValueError, match=r":3: \[x\] smp"):
        parse_cfg("[x]\nfile = a.flat\nsmp = two\n")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_cfg("file = orphan.flat\n")
    with pytest.raises(ValueError, match="unterminated"):
        parse_cfg('[x]\nfile = a\nqemu_params = """-cpu max\n')
    with pytest.raises(ValueError, match="not a timeout"):
        parse_timeout("soon")
    assert parse_timeout("90") == parse_timeout("90s") == 90.0 and parse_timeout("1h") == 3600


def test_machine_params_and_what_pyvmm_cannot_honour():
    p = machine_params("-cpu max,+vmx -m 2048 -machine pit=off")
    assert (p.cpu, p.memory_size, p.pit, p.unsupported) == ("max,+vmx", 2048 << 20, False, [])
    p = machine_params("-M q35,kernel-irqchip=split -device edu -overcommit cpu-pm=on")
    assert p.unsupported == ["-machine q35", "-machine kernel-irqchip=split",
                             "-overcommit cpu-pm=on"]     # q35 only as an intel-iommu's frame
    assert p.devices == ["edu"]
    p = machine_params("-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off")
    assert (p.devices, p.unsupported, len(p.notes)) == (["intel-iommu"], [], 2)
    assert machine_params("-m 4g").memory_size == 4 << 30
    spec = parse_cpu("qemu64,+x2apic,-pcid,vendor=GenuineIntel,hv_passthrough")
    assert (spec.set, spec.clear, spec.vendor) == (["x2apic"], ["pcid"], "GenuineIntel")
    assert spec.unsupported == ["-cpu hv_passthrough"]
    assert parse_cpu("Skylake-Server").unsupported == ["-cpu model Skylake-Server"]


def test_cpu_flags_change_the_cpuid_table(kvm):
    supported = kvm.supported_cpuid()
    leaf = {(e.function, e.index): e for e in supported}
    table, notes = apply_cpu(supported, parse_cpu("max,-pcid,-x2apic,vendor=GenuineIntel"))
    got = {(e.function, e.index): e for e in table}
    for name in ("pcid", "x2apic"):
        fn, sub, reg, bit = FEATURES[name]
        assert getattr(got[(fn, sub)], reg) >> bit & 1 == 0
    assert got[(0, 0)].ebx.to_bytes(4, "little") == b"Genu"
    assert got[(0, 0)].ecx.to_bytes(4, "little") == b"ntel"
    assert leaf[(0, 0)].ebx == supported[0].ebx  # the input table is not changed
    # a +flag KVM does not support here is dropped with a note (vmx on an AMD/nested host)
    fn, sub, reg, bit = FEATURES["vmx"]
    has_vmx = getattr(leaf.get((fn, sub)), reg, 0) >> bit & 1
    _, notes = apply_cpu(supported, parse_cpu("max,+vmx"))
    assert bool(notes) == (not has_vmx)
    # TSC-deadline: KVM emulates it (a capability) though its supported CPUID omits it
    emulated = kernel_emulated(kvm)
    table, notes = apply_cpu(supported, parse_cpu("qemu64,+tsc-deadline"), emulated=emulated)
    fn, sub, reg, bit = FEATURES["tsc-deadline"]
    got = {(e.function, e.index): e for e in table}
    assert getattr(got[(fn, sub)], reg) >> bit & 1 == ("tsc-deadline" in emulated)
    assert not notes or "tsc-deadline" not in emulated


def test_output_counts_and_exit_statuses():
    out = ("PASS: a\nFAIL: b\nSKIP: c\nXFAIL: d\nnot PASS: e\nPASS: f\n"
           "SUMMARY: 5 tests, 1 unexpected failures, 1 skipped\n")
    assert count_lines(out) == (3, 1, 1, "SUMMARY: 5 tests, 1 unexpected failures, 1 skipped")
    assert [status_from_exit(s) for s in (1, 3, 77, None, 0x1FF, 0)] == [
        "PASS", "FAIL", "SKIP", "FAIL", "FAIL", "FAIL"]


def test_not_applicable_follows_the_suite_rules():
    full = parse_cfg(CFG)[1]
    assert "nodefault" in not_applicable(full)
    assert "/proc/does-not-exist" in not_applicable(full, explicit=True)
    assert not_applicable(KutTest("x", "x.flat", arch="i386")) == "i386 only"
    assert not_applicable(KutTest("x", "x.flat", accel="tcg")) == "tcg only"
    assert not_applicable(KutTest("x", "x.flat")) == ""


def test_find_tests_says_how_to_build(tmp_path):
    with pytest.raises(ValueError, match="no kvm-unit-tests directory.*configure"):
        find_tests(tmp_path / "missing")
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "unittests.cfg").write_text("[a]\nfile = a.flat\n")
    with pytest.raises(ValueError, match="not built.*make"):
        find_tests(tmp_path)


def test_environment_module_has_kernel_version_and_errata(tmp_path):
    (tmp_path / "errata.txt").write_text("# c : v : s\nabcdef123456 : 4.9 : old fix\n"
                                         "fedcba654321 : 999.0 : future fix\n")
    env = environment(tmp_path, target="pyvmm").decode()
    assert "KERNEL_VERSION=" in env and "TARGET=pyvmm" in env
    assert "ERRATA_abcdef123456=y" in env and "fedcba654321" not in env


def test_qemu_command_is_the_suites(tmp_path):
    test = parse_cfg("[t]\nfile = t.flat\nsmp = 2\ntest_args = 'x y'\n"
                     "qemu_params = -cpu max,+x2apic\n")[0]
    cmd = qemu_command(tmp_path, test, env_file="/e", qemu="qemu")
    assert cmd[:4] == ["qemu", "--no-reboot", "-nodefaults", "-global"]
    for pair in (["-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"],
                 ["-device", "pc-testdev"], ["-device", "pci-testdev"], ["-smp", "2"],
                 ["-append", "x y"], ["-initrd", "/e"], ["-cpu",
                                                         "max,+x2apic,-arch-capabilities"]):
        i = cmd.index(pair[0], cmd.index(pair[0]) if pair[0] != "-device" else 0)
        assert pair[1] in cmd[i + 1:], (pair, cmd)


def test_table_and_json_shapes():
    rows = [("a", Outcome("PASS", 3, 0, 1, 1.25), Outcome("PASS", 3, 0, 1, 2.5)),
            ("b", Outcome("TIMEOUT", 1, 0, 0, 9.0, reason="no exit"), None)]
    text = table(rows, qemu=True)
    assert "| a | PASS | 3 | 0 | 1 | 1.2 | PASS | 3 | 0 | 1 | 2.5 |" in text
    doc = to_json(rows)
    assert doc["tests"][1]["qemu"] is None and doc["tests"][1]["status"] == "TIMEOUT"
    assert set(doc["tests"][0]) >= {"name", "status", "passed", "failed", "skipped",
                                    "seconds", "qemu"}


# -- real test kernels --------------------------------------------------------------------

def test_setjmp_passes_under_pyvmm(kut_dir):
    outcome = run_pyvmm(kut_dir, by_name(kut_dir, "setjmp"), timeout=60)
    assert outcome.status == "PASS", outcome.output
    assert outcome.passed >= 10 and outcome.failed == 0
    assert outcome.summary.startswith(f"SUMMARY: {outcome.passed} tests")
    assert outcome.exit_status == 1


def test_smp_test_starts_three_cpus(kut_dir):
    # The guest starts its APs with INIT/SIPI; each reports its id.
    outcome = run_pyvmm(kut_dir, by_name(kut_dir, "smptest3"), timeout=60)
    assert outcome.status == "PASS", outcome.output
    assert "found 3 cpus" in outcome.output


def test_test_args_reach_the_guest(kut_dir):
    # vmexit runs only the tests named on its command line: cpuid, and nothing else.
    outcome = run_pyvmm(kut_dir, by_name(kut_dir, "vmexit_cpuid"), timeout=60)
    assert outcome.status == "PASS", outcome.output
    names = [line.split()[0] for line in outcome.output.splitlines()
             if line[:1].isalpha() and line.split()[-1].isdigit()]
    assert "cpuid" in names and "vmcall" not in names, outcome.output


def test_a_timeout_keeps_the_partial_output(kut_dir):
    outcome = run_pyvmm(kut_dir, by_name(kut_dir, "msr"), timeout=2)
    assert outcome.status == "TIMEOUT" and "no exit after 2 s" in outcome.reason
    assert outcome.seconds < 30


def test_same_counts_as_qemu(kut_dir):
    if qemu_binary() is None:
        pytest.fail("qemu-system-x86_64 is needed for the reference run")
    test = by_name(kut_dir, "setjmp")
    mine, theirs = run_pyvmm(kut_dir, test, timeout=60), run_qemu(kut_dir, test, timeout=120)
    assert theirs.status == "PASS", theirs.output + theirs.reason
    assert (mine.status, mine.passed, mine.failed, mine.skipped) == (
        theirs.status, theirs.passed, theirs.failed, theirs.skipped)


def test_cli_list_run_and_json(kut_dir, tmp_path):
    env = {**os.environ, "PYVMM_KUT_DIR": kut_dir}
    listing = subprocess.run([sys.executable, "-m", "pyvmm.cli", "kut", "--list"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "msr" in listing and "SKIP: i386 only" in listing
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "pyvmm.cli", "kut", "setjmp", "cmpxchg8b",
                           "--json", str(out), "--timeout", "60"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| setjmp | PASS |" in proc.stdout
    doc = json.loads(out.read_text())
    assert [(t["name"], t["status"], t["qemu"]) for t in doc["tests"]] == [
        ("setjmp", "PASS", None), ("cmpxchg8b", "SKIP", None)]


def test_cli_without_a_tree_says_how_to_build(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYVMM_KUT_DIR"}
    proc = subprocess.run([sys.executable, "-m", "pyvmm.cli", "kut"], env=env,
                          capture_output=True, text=True)
    last = proc.stderr.splitlines()[-1]   # one line (after any unrelated warning)
    assert proc.returncode == 2 and last.startswith("pyvmm: no kvm-unit-tests tree")
    assert "--kut-dir" in last and "configure" in last
    proc = subprocess.run([sys.executable, "-m", "pyvmm.cli", "kut", "--kut-dir",
                           str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "not an x86 kvm-unit-tests tree" in proc.stderr


def test_pytest_items_pass_and_show_serial_output_on_failure(kut_dir, tmp_path):
    # A tree of our own: setjmp as-is, and msr given too little time (a failing item).
    tree = tmp_path / "kut"
    (tree / "x86").mkdir(parents=True)
    for name in ("setjmp.flat", "msr.flat"):
        (tree / "x86" / name).symlink_to(Path(kut_dir) / "x86" / name)
    (tree / "x86" / "unittests.cfg").write_text(
        "[setjmp]\nfile = setjmp.flat\n\n[msr_short]\nfile = msr.flat\ntimeout = 3\n")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--kut-dir", str(tree), "-k", "setjmp or msr_short", "-rA"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert "1 passed" in out and "1 failed" in out, out
    assert "msr_short (msr.flat, smp 1): TIMEOUT" in out
    assert "--- serial output ---" in out and "PASS: " in out



def test_platform_hook_instruments_a_device(kut_dir):
    # As docs/KVM-UNIT-TESTS.md shows: wrap fw_cfg and see the guest read its CPU count.
    accesses = []

    class Trace:
        def __init__(self, inner):
            self.inner = inner

        def read(self, offset, size):
            data = self.inner.read(offset, size)
            accesses.append(("r", offset, data))
            return data

        def write(self, offset, data):
            accesses.append(("w", offset, bytes(data)))
            self.inner.write(offset, data)

    def hook(pc):
        pc.machine.pio.unregister(pc.fw_cfg)
        pc.machine.pio.register(0x510, type(pc.fw_cfg).length, Trace(pc.fw_cfg))

    outcome = run_pyvmm(kut_dir, by_name(kut_dir, "smptest"), timeout=60, platform_hook=hook)
    assert outcome.status == "PASS", outcome.output
    # the selector write of FW_CFG_NB_CPUS (5), then reads of the data port
    assert ("w", 0, (5).to_bytes(2, "little")) in accesses
    assert any(kind == "r" and offset == 1 for kind, offset, _ in accesses)


def test_qemu_that_cannot_start_is_an_error_not_a_pass(kut_dir):
    # QEMU exits with 1 both for a passing test ((0 << 1) | 1) and when it cannot start.
    if qemu_binary() is None:
        pytest.fail("qemu-system-x86_64 is needed for the reference run")
    test = KutTest("bad", "setjmp.flat", extra_params="-cpu max,+no-such-feature-here")
    outcome = run_qemu(kut_dir, test, timeout=60)
    assert outcome.status == "ERROR" and "failed to start" in outcome.reason, outcome
